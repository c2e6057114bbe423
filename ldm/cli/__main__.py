"""`python -m ldm.cli`: the `ldm` command."""

from ldm.cli import run

run()
