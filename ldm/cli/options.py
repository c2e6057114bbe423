"""Arguments that several command families share.

A help text says a default with ``%(default)s``, which argparse fills in from the flag's own
default, so the number is written once: where the default lives."""

from __future__ import annotations

import argparse

from ldm.config import DataConfig

DEFAULT = "(default: %(default)s)"


def add_caption_column(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--caption-column", default=DataConfig.caption_column, help=DEFAULT)


def add_resolution(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument(
        "--resolution", type=int, default=DataConfig.resolution, help=f"{what} {DEFAULT}".lstrip()
    )


def add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help=DEFAULT)


def add_lora(parser: argparse.ArgumentParser) -> None:
    """``--lora PATH[:SCALE]``, repeatable (`ldm.pipeline.request.parse_lora_flag` reads it)."""
    parser.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="apply a LoRA file (diffusers or kohya/A1111 layout) at a scale (default 1); "
        "repeat for several",
    )
