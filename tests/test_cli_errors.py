"""Every user error is one line and exit 2, with no traceback, and leaves nothing on disk.

Each case runs ``python -m ldm.cli`` as a real subprocess in a folder of prepared bad inputs,
and compares the folder's files before and after."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.config import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]

# (name, arguments, words the error line must contain)
CASES = [
    # weights, images and PNG settings that cannot be read
    (
        "truncated weights",
        ["generate", "x", "--model", "truncated"],
        ["truncated/unet/diffusion_pytorch_model.safetensors", "truncated"],
    ),
    (
        "garbage weights",
        ["generate", "x", "--model", "garbage"],
        ["garbage/vae/diffusion_pytorch_model.safetensors", "not a safetensors file"],
    ),
    (
        "init image not an image",
        ["generate", "x", "--init-image", "notes.txt"],
        ["--init-image", "notes.txt", "not an image"],
    ),
    (
        "from-png not a png",
        ["generate", "--from-png", "notes.txt"],
        ["--from-png", "notes.txt", "not a PNG"],
    ),
    (
        "from-png without settings",
        ["generate", "--from-png", "plain.png"],
        ["--from-png", "plain.png", "parameters"],
    ),
    ("from-png missing", ["generate", "--from-png", "nowhere.png"], ["--from-png", "nowhere.png"]),
    (
        "init image missing",
        ["generate", "x", "--init-image", "nowhere.png"],
        ["--init-image", "nowhere.png"],
    ),
    ("model folder missing", ["generate", "x", "--model", "nowhere"], ["--model", "nowhere"]),
    (
        "model folder not a model",
        ["generate", "x", "--model", "empty_folder"],
        ["--model", "empty_folder", "model_index.json"],
    ),
    # devices
    ("device tpu", ["generate", "x", "--device", "tpu"], ["--device", "tpu", "cpu"]),
    (
        "device cuda without a GPU",
        ["generate", "x", "--device", "cuda"],
        ["--device", "cuda", "cpu"],
    ),
    ("device cuda index", ["generate", "x", "--device", "cuda:9"], ["--device", "cuda:9"]),
    # sizes, counts and seeds
    (
        "huge size",
        ["generate", "x", "--width", "100000", "--height", "100000"],
        ["--width", "GB", "estimate"],
    ),
    ("width 0", ["generate", "x", "--width", "0"], ["--width", "0", "multiple of"]),
    (
        "width not a multiple",
        ["generate", "x", "--width", "65"],
        ["--width", "65", "multiple of 4"],
    ),
    ("height negative", ["generate", "x", "--height", "-64"], ["--height", "-64"]),
    ("seed negative", ["generate", "x", "--seed", "-1"], ["--seed", "-1", "2**63"]),
    ("seed too large", ["generate", "x", "--seed", str(2**64)], ["--seed", "2**63"]),
    ("steps 0", ["generate", "x", "--steps", "0"], ["--steps", "0"]),
    ("steps above T", ["generate", "x", "--steps", "5000"], ["--steps", "5000", "1000"]),
    ("n 0", ["generate", "x", "--n", "0"], ["--n", "0"]),
    ("batch size 0", ["generate", "x", "--batch-size", "0"], ["--batch-size", "0"]),
    ("guidance nan", ["generate", "x", "--guidance-scale", "nan"], ["--guidance-scale", "nan"]),
    ("eta negative", ["generate", "x", "--eta", "-1"], ["--eta", "-1"]),
    (
        "strength above 1",
        ["generate", "x", "--init-image", "plain.png", "--strength", "1.5"],
        ["--strength", "1.5", "0 to 1"],
    ),
    (
        "strength without init image",
        ["generate", "x", "--strength", "0.5"],
        ["--strength", "--init-image"],
    ),
    ("max memory unreadable", ["generate", "x", "--max-memory", "lots"], ["--max-memory", "lots"]),
    ("no prompt", ["generate"], ["prompt", "--from-file"]),
    (
        "prompt file missing",
        ["generate", "--from-file", "nowhere.txt"],
        ["--from-file", "nowhere.txt"],
    ),
    (
        "prompt file empty",
        ["generate", "--from-file", "empty.txt"],
        ["--from-file", "empty.txt", "no prompts"],
    ),
    (
        "unknown sampler",
        ["generate", "x", "--sampler", "nonesuch"],
        ["--sampler", "nonesuch", "ddim"],
    ),
    ("steps not a number", ["generate", "x", "--steps", "abc"], ["--steps", "abc"]),
    # configs
    (
        "broken yaml",
        ["train", "broken.yaml"],
        ["broken.yaml", "line 2, column 16", "mapping values"],
    ),
    ("config missing", ["train", "nowhere.yaml"], ["nowhere.yaml"]),
    (
        "set not a number",
        ["train", "good.yaml", "--set", "train.max_steps=abc"],
        ["train.max_steps", "abc", "integer"],
    ),
    (
        "set a fraction for an integer",
        ["train", "good.yaml", "--set", "train.max_steps=1.5"],
        ["train.max_steps", "1.5", "integer"],
    ),
    (
        "set a list for a number",
        ["train", "good.yaml", "--set", "train.learning_rate=[1, 2]"],
        ["train.learning_rate", "number"],
    ),
    (
        "set a word for a switch",
        ["train", "good.yaml", "--set", "train.cache_latents=maybe"],
        ["train.cache_latents", "maybe", "true or false"],
    ),
    (
        "set an unknown key",
        ["train", "good.yaml", "--set", "train.max_stepz=5"],
        ["train.max_stepz", "max_steps"],
    ),
    (
        "set without a value",
        ["train", "good.yaml", "--set", "train.max_steps"],
        ["train.max_steps", "KEY=VALUE"],
    ),
    ("resume path missing", ["train", "good.yaml", "--resume", "nowhere"], ["--resume", "nowhere"]),
    (
        "resume latest without a checkpoint",
        ["train", "good.yaml", "--resume", "latest"],
        ["--resume latest", "no checkpoint"],
    ),
    ("train-vae config missing", ["train-vae", "nowhere.yaml"], ["nowhere.yaml"]),
    # the other commands
    (
        "convert source missing",
        ["convert", "nowhere.safetensors", "out_model"],
        ["nowhere.safetensors"],
    ),
    (
        "convert garbage",
        ["convert", "garbage/vae/diffusion_pytorch_model.safetensors", "out_model"],
        ["not a safetensors file"],
    ),
    ("check-data folder missing", ["check-data", "nowhere"], ["nowhere"]),
    (
        "check-data resolution 0",
        ["check-data", "images", "--resolution", "0", "--model", "none"],
        ["resolution", "0"],
    ),
    ("make-shapes n 0", ["make-shapes", "--n", "0", "--out", "shapes"], ["--n", "0"]),
    (
        "make-shapes into a full folder",
        ["make-shapes", "--n", "2", "--out", "images"],
        ["images", "empty"],
    ),
    ("train-recipe data missing", ["train-recipe", "nowhere", "--out", "recipe"], ["nowhere"]),
    ("eval data missing", ["eval", "default", "nowhere"], ["nowhere"]),
    ("schedule steps 0", ["schedule", "--steps", "0"], ["--steps", "0"]),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A folder of prepared bad inputs (and a few good ones that a case needs)."""
    work = tmp_path_factory.mktemp("bad")
    for name in ("truncated", "garbage"):
        shutil.copytree(DEFAULT_MODEL, work / name)
    unet = work / "truncated" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:100_000])
    (work / "garbage" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    (work / "notes.txt").write_text("not an image\n")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(work / "plain.png")
    (work / "empty.txt").write_text("\n\n")
    (work / "empty_folder").mkdir()
    (work / "broken.yaml").write_text("model: default\noutput_dir: run: x\n")
    (work / "images").mkdir()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(work / "images" / "blue.png")
    (work / "images" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "blue.png", "text": "blue"}) + "\n"
    )
    (work / "good.yaml").write_text(
        "model: default\noutput_dir: run\ndata:\n  path: images\ntrain:\n  max_steps: 2\n"
    )
    return work


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# One case per command family runs as a real process (an import of ldm costs ~8 s here);
# the others run `ldm.cli.main` in this process, with the same checks.
AS_A_PROCESS = {
    "truncated weights",
    "broken yaml",
    "convert garbage",
    "check-data folder missing",
    "eval data missing",
}


def run_cli(folder: Path, args: list[str], in_process: bool, capsys, monkeypatch):
    """(exit status, stderr, stdout) of ``ldm ARGS`` run in ``folder``."""
    if not in_process:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "ldm.cli", *args],
            cwd=folder,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        return result.returncode, result.stderr, result.stdout
    from ldm.cli import main

    monkeypatch.chdir(folder)
    capsys.readouterr()
    try:
        status = main(args)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.err, captured.out


@pytest.mark.parametrize(("name", "args", "words"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_exit_2(bad_inputs, name, args, words, capsys, monkeypatch):
    if name == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = tree(bad_inputs)
    status, stderr, stdout = run_cli(
        bad_inputs, args, name not in AS_A_PROCESS, capsys, monkeypatch
    )
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"ldm {args[0]}: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert stdout == ""
    assert tree(bad_inputs) == before, "a refused command changed the folder"


def test_the_table_covers_every_case_the_issue_lists():
    assert len(CASES) >= 30
    names = {c[0] for c in CASES}
    assert {"truncated weights", "garbage weights", "init image not an image"} <= names
    assert {"from-png not a png", "device tpu", "broken yaml", "set not a number"} <= names


def test_an_internal_error_prints_its_traceback_and_asks_for_a_report(
    tmp_path, monkeypatch, capsys
):
    from ldm import cli
    from ldm.cli import generate as cli_generate

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_generate, "schedule_command", broken)
    assert cli.main(["schedule"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err
    assert "this is a bug in ldm" in err and "please report it" in err
