"""A non-editable install works: every file the package reads is package data.

`pip install .` into a fresh virtual environment (its dependencies seen from this one, so
nothing is downloaded), then ldm's commands run from a folder outside the repository: they
must find the shipped model, the recipe configs and the presets inside the installed package.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with ldm installed from a wheel built off the working tree: its ``bin`` folder."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
        check=True,
        capture_output=True,
    )
    return venv / "bin"


def run(bin_dir: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_the_installed_package_is_not_the_working_tree(installed, tmp_path):
    code = "import ldm, ldm.config as c; print(ldm.__file__); print(c.DEFAULT_MODEL)"
    out = run(installed, tmp_path, "python", "-c", code)
    assert out.returncode == 0, out.stderr
    package_file, model = out.stdout.split()
    assert "site-packages" in package_file and not package_file.startswith(str(ROOT))
    assert Path(model, "model_index.json").is_file()
    listing = run(installed, tmp_path, "python", "-c", "import benchmarks")
    assert listing.returncode != 0, "the developer benchmarks must not ship in the wheel"


@pytest.mark.slow
def test_installed_commands_start(installed, tmp_path):
    out = run(installed, tmp_path, "ldm", "make-shapes", "--n", "4", "--out", "shapes")
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "shapes" / "metadata.jsonl").read_text().splitlines()) == 4
    prompt = "a large red circle in the center on a blue background"
    out = run(installed, tmp_path, "ldm", "generate", prompt, "--steps", "4", "--out", "images")
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    out = run(installed, tmp_path, "ldm", "eval-shapes", "--n", "2", "--steps", "4")
    assert out.returncode == 0, out.stderr
    assert "all" in out.stdout + out.stderr


@pytest.mark.slow
def test_installed_train_default_loads_its_configs_and_writes_its_first_stage(installed, tmp_path):
    """``ldm train-default`` reads the recipe configs from the installed package, then makes
    the shapes data (the first stage); it is stopped once that stage is written."""
    env = {**os.environ, "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    process = subprocess.Popen(
        [str(installed / "ldm"), "train-default", "--out", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    heldout = tmp_path / "run" / "data" / "heldout" / "metadata.jsonl"
    deadline = time.monotonic() + 900
    try:
        while not heldout.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    assert heldout.exists(), stderr[-3000:]
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    assert len(rows) == 1000 and {"file_name", "text"} <= set(rows[0])
    assert (tmp_path / "run" / "data" / "train" / "metadata.jsonl").is_file()
