"""Checks on the project itself: layering, README and CI, docs, lint."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldm"

# Which parts of ldm each part may import: a part is a subpackage or a top-level module, and
# imports go downward only (docs/architecture.md draws these layers).
BASE = {"config", "errors", "files", "images", "seeds"}
MODELS = BASE | {"diffusion", "nn", "encoders", "formats"}
ALLOWED_IMPORTS = {
    "errors": set(),
    "files": set(),
    "images": {"config"},
    "seeds": set(),
    "config": set(),
    "diffusion": {"config"},
    "nn": {"config", "files"},
    "encoders": {"config"},
    "formats": {"config", "files", "nn", "encoders"},
    "data": {"config", "images", "encoders"},
    "pipeline": MODELS,
    "shapes": MODELS | {"pipeline"},
    "testing": {"config", "encoders"},
    "training": MODELS | {"data", "pipeline", "shapes"},
    "cli": MODELS | {"data", "pipeline", "shapes", "training", "__init__"},
    "__init__": MODELS | {"pipeline", "training"},  # the heavy ones lazily, on first use
}
# Third-party packages a part may import, beyond torch, numpy, tqdm and the standard library.
EXTRA_PACKAGES = {
    "config": {"yaml"},
    "images": {"PIL"},
    "nn": {"safetensors"},
    "encoders": {"diffusers", "transformers", "open_clip", "safetensors"},
    "formats": {"safetensors", "diffusers", "transformers"},
    "data": {"PIL", "datasets", "transformers"},  # transformers: a type hint only
    "pipeline": {"PIL", "safetensors", "peft"},
    "shapes": {"PIL"},
    "testing": {"diffusers", "transformers", "yaml"},
    "training": {
        "accelerate",
        "diffusers",
        "open_clip",
        "peft",
        "PIL",
        "safetensors",
        "transformers",
    },
}
ALWAYS = {"torch", "numpy", "tqdm"}
MODULES = sorted(PACKAGE.rglob("*.py"))


def part_of(path: Path) -> str:
    """``ldm/diffusion/samplers.py`` -> ``diffusion``; ``ldm/images.py`` -> ``images``."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, as dotted names (``from ldm import images`` -> ldm.images)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: use absolute imports"
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            submodules = {name for name in submodules if ldm_module(name) is not None}
            names.update(submodules)
            if len(submodules) < len(node.names):  # names defined in node.module itself
                names.add(node.module)
    return names


def ldm_module(name: str) -> Path | None:
    """The file behind a dotted ldm name, or None when it is not a module of ldm."""
    parts = name.split(".")
    if parts[0] != "ldm":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_imports_go_downward_only(path):
    part = part_of(path)
    assert part in ALLOWED_IMPORTS, f"ldm/{part} is new: add its allowed imports to ALLOWED_IMPORTS"
    imported = imports_of(path)
    parts = {part_of(m) for m in map(ldm_module, imported) if m is not None} - {part}
    assert parts <= ALLOWED_IMPORTS[part], f"{path} imports {parts - ALLOWED_IMPORTS[part]}"
    external = {name.split(".")[0] for name in imported} - {"ldm"} - set(sys.stdlib_module_names)
    allowed = ALWAYS | EXTRA_PACKAGES.get(part, set())
    assert external <= allowed, f"{path} imports {external - allowed}"


def test_no_module_imports_itself_in_a_circle():
    graph = {
        path: {m for m in map(ldm_module, imports_of(path)) if m is not None and m != path}
        for path in MODULES
    }
    graph = {
        path: {m for m in deps if m.name != "__init__.py" or m.parent != path.parent}
        for path, deps in graph.items()
    }
    done, active = set(), []

    def visit(path):
        assert path not in active, " -> ".join(str(p.relative_to(PACKAGE)) for p in active)
        if path in done:
            return
        active.append(path)
        for dep in graph[path]:
            visit(dep)
        active.pop()
        done.add(path)

    for path in MODULES:
        visit(path)


def test_only_the_training_loop_imports_accelerate():
    importers = {p for p in MODULES if any(n.split(".")[0] == "accelerate" for n in imports_of(p))}
    assert importers == {PACKAGE / "training" / "loop.py"}, importers


def test_import_ldm_loads_no_heavy_dependency():
    code = (
        "import sys, ldm, ldm.cli, ldm.diffusion.samplers, ldm.diffusion.analytic;"
        " print(sorted(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for heavy in ("accelerate", "diffusers", "transformers", "open_clip", "datasets"):
        assert f"'{heavy}'" not in loaded, heavy


def test_the_public_api_is_at_the_top_level():
    code = (
        "import sys, ldm\n"
        "from ldm import DEFAULT_MODEL, GENERATION, SAMPLERS, NoiseSchedule, TrainConfig, UNet\n"
        "from ldm import gaussian_model_fn, guided_eps_fn\n"
        "assert {'ddim', 'ddpm', 'dpmpp_2m', 'unipc'} <= set(SAMPLERS) and DEFAULT_MODEL.is_dir()\n"
        "assert NoiseSchedule().num_train_timesteps == 1000 and GENERATION.sampler in SAMPLERS\n"
        "assert 'accelerate' not in sys.modules and 'diffusers' not in sys.modules\n"
        "from ldm import LatentDiffusionPipeline, train\n"
        "import ldm.pipeline, ldm.training.denoiser\n"
        "assert LatentDiffusionPipeline is ldm.pipeline.LatentDiffusionPipeline\n"
        "assert train is ldm.training.denoiser.train\n"
        "print(sorted(ldm.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in (
        "LatentDiffusionPipeline",
        "UNet",
        "NoiseSchedule",
        "gaussian_model_fn",
        "SAMPLERS",
        "TrainConfig",
        "train",
        "DEFAULT_MODEL",
    ):
        assert f"'{name}'" in out.stdout, name
    import ldm

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ldm.nonexistent  # noqa: B018


def test_the_unet_needs_only_torch_safetensors_and_json():
    code = "import sys, ldm.nn.unet; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for module in (
        "diffusers",
        "transformers",
        "accelerate",
        "open_clip",
        "ldm.diffusion",
        "ldm.encoders",
        "ldm.formats",
    ):
        assert f"'{module}'" not in loaded, module


# Values that have one home: a number here may appear in no other module of ldm.
HOMES = {
    7.5: "config/generation.py",  # guidance scale
    0.8: "config/generation.py",  # img2img strength
    0.00085: "config/model.py",  # Stable Diffusion's betas
    0.012: "config/model.py",
    77: "encoders/tokenizer.py",  # CLIP's token length
    7919: "seeds.py",  # seed mixing: derive_seed alone
    100_003: "seeds.py",
    1_000_003: "seeds.py",
}
# Names that have one home, config/names.py: no other module lists two or more of them (as
# choices, or in an error message's "allowed" list); they import the tuple instead.
NAMES = {
    "ddim",
    "ddpm",
    "epsilon",
    "v_prediction",
    "fixed_small",
    "fixed_large",
    "leading",
    "trailing",
    "linspace",
    "linear",
    "scaled_linear",
    "cosine",
    "pil",
    "np",
    "pt",
    "latent",
}


def test_defaults_and_names_are_written_in_one_place():
    found = []
    for path in MODULES:
        where = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and where != "config/names.py":
                names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(names) >= 2 and len(names) == len(node.elts) and set(names) <= NAMES:
                    found.append(f"ldm/{where}:{node.lineno} {names} (import config/names.py's)")
            if not isinstance(node, ast.Constant) or id(node) in docstrings:
                continue
            value = node.value
            if type(value) in (int, float) and value in HOMES and HOMES[value] != where:
                found.append(f"ldm/{where}:{node.lineno} {value!r} (its home: {HOMES[value]})")
    assert not found, "\n".join(found)


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def test_modules_and_functions_read_in_one_sitting():
    """No module over 400 lines, no function (or method) over 80, outside tests."""
    too_long = []
    for path in MODULES:
        text = path.read_text()
        name = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "\n".join(too_long)


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
    for module in ("schedule", "samplers"):
        for eq in set(
            re.findall(
                r"(DDPM|DDIM) eqs?\. \((\d+)\)",
                (PACKAGE / "diffusion" / f"{module}.py").read_text(),
            )
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
