"""The documentation covers the code: every CLI flag, every training config field, and the
quickstart's config loads."""

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from ldm.cli import build_parser
from ldm.config import DEFAULT_MODEL, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def sub_commands() -> dict[str, argparse.ArgumentParser]:
    """``ldm``'s sub-command parsers by name, as `ldm.cli.build_parser` builds them."""
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [
        option
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    ]


def mentioned(flag: str, text: str) -> bool:
    """Whether ``flag`` appears as a whole flag: ``--n`` is not found inside ``--n-eval``."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_the_sub_commands_are_found():
    assert {"generate", "train", "schedule", "convert", "check-data"} <= set(sub_commands())


@pytest.mark.parametrize("command", sorted(sub_commands()))
def test_every_cli_flag_is_documented(command):
    text = "\n".join(page.read_text() for page in DOC_PAGES)
    flags = option_strings(sub_commands()[command])
    missing = [f for f in [f"ldm {command}", *flags] if not mentioned(f, text)]
    assert not missing, (
        f"`ldm {command}`: missing from README.md and docs/*.md: {', '.join(missing)}"
    )


def config_fields(cls: type, prefix: str = "") -> list[str]:
    """The dotted names of a config dataclass's fields, nested dataclasses expanded."""
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            names += config_fields(kind, f"{prefix}{field.name}.")
        else:
            names.append(prefix + field.name)
    return names


def test_config_fields_are_found():
    fields = config_fields(TrainConfig)
    assert {"model", "data.path", "train.max_steps", "validation.seeds"} <= set(fields)
    assert "train" not in fields and "data" not in fields


def test_every_training_config_field_is_in_the_training_docs():
    text = (ROOT / "docs" / "training.md").read_text()
    missing = [name for name in config_fields(TrainConfig) if f"`{name}`" not in text]
    assert not missing, f"TrainConfig fields missing from docs/training.md: {', '.join(missing)}"


def test_the_quickstart_config_loads():
    config = TrainConfig.from_yaml(ROOT / "configs" / "quickstart.yaml")
    assert config.model == str(DEFAULT_MODEL)  # `model: default` names the shipped model
    assert config.data.path == "data/shapes"  # where the quickstart's `ldm make-shapes` writes
    assert config.train.cache_latents and config.data.center_crop and not config.data.random_flip
    assert config.train.max_steps <= 1000


def test_the_architecture_page_maps_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are not the map
    named = set(re.findall(r"`([^`\n]+)`", prose))
    missing = [p.name for p in (ROOT / "ldm").glob("*.py") if not {p.name, f"ldm/{p.name}"} & named]
    for package in sorted(p.parent for p in (ROOT / "ldm").glob("*/__init__.py")):
        if f"{package.name}/" not in named:
            missing.append(f"{package.name}/")
        missing += [
            f"{package.name}/{m.name}"
            for m in package.glob("*.py")
            if m.stem not in ("__init__", "__main__") and m.stem not in named
        ]
    assert not missing, f"docs/architecture.md's module map lacks {', '.join(missing)}"
