"""Arguments that several command families share, and help texts made only when shown.

A help text says a default with ``%(default)s``, which argparse fills in from the flag's own
default, so the number is written once: where the default lives."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ldm.config import DataConfig

DEFAULT = "(default: %(default)s)"


def help_when_shown(action: argparse.Action, make: Callable[[], str]) -> None:
    """Have ``make()`` write ``action``'s help text when the help is shown (`Parser.format_help`),
    for a text that reads a module too slow to import for every ``ldm`` command."""
    action.make_help = make


def add_caption_column(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--caption-column", default=DataConfig.caption_column, help=DEFAULT)


def add_resolution(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument(
        "--resolution", type=int, default=DataConfig.resolution, help=f"{what} {DEFAULT}".lstrip()
    )


def add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help=DEFAULT)
