"""Checks on the project itself: layering, README and CI, docs, lint."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldm"

# Which ldm modules each module may import: imports go downward only (../shared/STYLE.md).
ALLOWED_IMPORTS = {
    "__init__": {"config", "pipeline"},  # the pipeline lazily, on first use
    "config": {"config_io"},
    "config_io": set(),
    "shapes": set(),
    "evaluation": {"images", "shapes"},
    "pretrain": {"config", "files", "images", "loop", "text_encoder"},
    "recipe": {
        "config",
        "data",
        "errors",
        "evaluation",
        "images",
        "metrics",
        "pipeline",
        "pretrain",
        "shapes",
        "training",
    },
    "default_model": {"checkpoint", "config", "evaluation", "pipeline", "recipe"},
    "layers": set(),
    "schedule": set(),
    "attention": {"layers"},
    "sampling": {"schedule"},
    "losses": {"schedule"},
    "checkpoint": set(),
    "cache": {"config"},
    "loop": {"checkpoint", "config", "errors"},
    "training": {
        "cache",
        "config",
        "data",
        "images",
        "loop",
        "losses",
        "pipeline",
        "unet",
        "autoencoder",
        "text_encoder",
    },
    "unet": {"attention", "config", "files", "layers"},
    "analytic": {"schedule", "sampling"},
    "convert": {"autoencoder", "config", "text_encoder", "unet"},
    "conversion": {"convert", "files", "pipeline", "unet"},
    "autoencoder": set(),
    "text_encoder": set(),
    "images": set(),
    "data": {"config", "images"},
    "model_fit": {"autoencoder", "config", "data", "images", "text_encoder"},
    "metrics": {"config", "data", "images", "model_fit", "text_encoder"},
    "icon_theme": set(),
    "pipeline": {
        "autoencoder",
        "config",
        "convert",
        "files",
        "images",
        "sampling",
        "schedule",
        "text_encoder",
        "unet",
    },
    "generate": {"config", "images", "pipeline"},
    "experiments": {"evaluation", "images", "pipeline", "sampling", "schedule", "shapes"},
    "testing": {"config", "text_encoder"},
    "benchmark": {"config", "data", "layers", "pipeline", "testing", "training", "unet"},
    "errors": set(),
    "files": set(),
    "cli": {"cli_parser", "errors"},
    "cli_parser": {"__init__", "cli_commands", "config", "sampling", "schedule"},
    "cli_commands": {
        "checkpoint",
        "autoencoder",
        "config",
        "conversion",
        "data",
        "default_model",
        "evaluation",
        "metrics",
        "model_fit",
        "pretrain",
        "recipe",
        "shapes",
        "generate",
        "pipeline",
        "schedule",
        "sampling",
        "text_encoder",
        "training",
    },
}
# Third-party packages a module may import, beyond torch, numpy and the standard library.
EXTRA_PACKAGES = {
    "sampling": {"tqdm"},
    "generate": {"PIL", "tqdm"},
    "unet": {"safetensors"},
    "convert": {"safetensors", "diffusers", "transformers"},
    "conversion": {"safetensors"},
    "benchmark": {"diffusers", "accelerate", "transformers", "PIL"},
    "autoencoder": {"diffusers"},
    "text_encoder": {"transformers", "open_clip", "safetensors"},
    "images": {"PIL"},
    "data": {"PIL", "datasets"},
    "config": {"yaml"},
    "config_io": {"yaml"},
    "loop": {"accelerate", "tqdm", "PIL"},
    "training": {"PIL"},
    "cache": {"safetensors"},
    "pipeline": {"PIL"},
    "testing": {"diffusers", "transformers", "yaml"},
    "shapes": {"PIL", "tqdm"},
    "evaluation": {"PIL", "tqdm"},
    "experiments": {"PIL"},
    "pretrain": {"diffusers", "open_clip", "PIL", "safetensors", "tqdm", "transformers"},
    "recipe": {"PIL", "tqdm"},
    "metrics": {"tqdm"},
}
ALWAYS = {"torch", "numpy"}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "ldm":
                names.add(node.module)
                continue
            for alias in node.names:  # `from ldm import images` imports ldm/images.py
                is_module = (PACKAGE / f"{alias.name}.py").exists()
                names.add(f"ldm.{alias.name}" if is_module else "ldm")
    return names


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_imports_go_downward_only(module):
    assert module in ALLOWED_IMPORTS, (
        f"ldm/{module}.py is new: add its allowed imports to ALLOWED_IMPORTS"
    )
    imported = imports_of(PACKAGE / f"{module}.py")
    internal = {
        name.split(".")[1] if name.count(".") else "__init__"
        for name in imported
        if name.split(".")[0] == "ldm"
    }
    internal = {
        name for name in internal if (PACKAGE / f"{name}.py").exists() or name == "__init__"
    }
    assert internal <= ALLOWED_IMPORTS[module], (
        f"ldm/{module}.py imports {internal - ALLOWED_IMPORTS[module]}"
    )
    external = {name.split(".")[0] for name in imported} - {"ldm"} - set(sys.stdlib_module_names)
    allowed = ALWAYS | EXTRA_PACKAGES.get(module, set())
    assert external <= allowed, f"ldm/{module}.py imports {external - allowed}"


def test_import_ldm_loads_no_heavy_dependency():
    code = "import sys, ldm, ldm.cli, ldm.sampling, ldm.analytic; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for heavy in ("accelerate", "diffusers", "transformers", "open_clip", "datasets"):
        assert f"'{heavy}'" not in loaded, heavy


def test_the_unet_needs_only_torch_safetensors_and_json():
    code = "import sys, ldm.unet; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for module in (
        "diffusers",
        "transformers",
        "accelerate",
        "open_clip",
        "ldm.schedule",
        "ldm.sampling",
        "ldm.convert",
    ):
        assert f"'{module}'" not in loaded, module


def test_modules_read_in_one_sitting():
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 600, path


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [blocks[0].strip(), blocks[1].strip()]


def test_readme_opens_with_the_two_commands_that_ci_runs():
    install, test = readme_commands()
    assert install.startswith('pip install -e ".[dev]"') and test == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci, "README's install command must appear verbatim in .ci/run"
    assert any(line.startswith(test) for line in ci), "README's test command must appear in .ci/run"
    assert "5" in (ROOT / ".ci" / "run").read_text(), (
        ".ci/run must treat pytest's exit code 5 as failure"
    )
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_docs_build_strict(tmp_path):
    # no -q: mkdocs 1.6 then hides the warnings that --strict turns into a failure
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "sampling" / "index.html").exists()


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=[p.name for p in DOC_PAGES])
def test_python_snippets_in_the_docs_run(page, tmp_path, monkeypatch):
    """A page's snippets run in order in one namespace, as a reader would run them; a snippet
    whose first line is ``# requires: ...`` needs what a test machine lacks and is skipped."""
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands here
    namespace: dict = {}
    skipped = []
    for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        first_line = code.splitlines()[0]
        if first_line.startswith("# requires:"):
            skipped.append(first_line.removeprefix("# requires:").strip())
            continue
        exec(compile(code, f"<{page.name}>", "exec"), namespace)
    if skipped and not namespace:
        pytest.skip("; ".join(skipped))


def test_docs_cite_every_equation_the_code_cites():
    docs = (ROOT / "docs" / "sampling.md").read_text()
    for module in ("schedule", "sampling"):
        for eq in set(
            re.findall(r"(DDPM|DDIM) eqs?\. \((\d+)\)", (PACKAGE / f"{module}.py").read_text())
        ):
            assert re.search(rf"{eq[0]} eqs?\. .*?\({eq[1]}\)", docs), (
                f"docs/sampling.md lacks {eq[0]} eq. ({eq[1]})"
            )


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
