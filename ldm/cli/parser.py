"""The ``ldm`` argument parser: each command family (`ldm.cli.generate`, `ldm.cli.train`,
`ldm.cli.data`, `ldm.cli.evaluate`) adds its sub-commands, each calling its ``*_command``."""

from __future__ import annotations

import argparse

from ldm import __version__
from ldm.cli import data, evaluate, generate, train

FAMILIES = (generate, train, data, evaluate)


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldm",
        description="Conditional text-to-image latent diffusion: sampling, training, conversion.",
    )
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in FAMILIES:
        family.add_parsers(commands)
    return parser
