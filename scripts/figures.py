"""Regenerate every figure in docs/: runs each figure script in turn.

python scripts/figures.py [--model PATH] [--run runs/default] [--out docs/figures] [--only NAME]
    [--dry-run]

- theory: scripts/theory_figures.py (OUT/theory_*.png, OUT/theory.json; docs/theory.md)
- eval_shapes: scripts/eval_shapes.py (OUT/eval_shapes.*)
- accuracy_vs_steps: scripts/eval_checkpoints.py (OUT/accuracy_vs_steps.*), from the checkpoints
  of a `ldm train-default` run; skipped when RUN has none

``--model`` (default: the shipped model) goes to every script that samples. A script that fails
stops the run with its exit status.
"""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
logger = logging.getLogger("figures")


def commands(model: str | None, run: str, out: str) -> dict[str, list[str]]:
    """Name -> the argument list of each figure script, in the order they run."""
    with_model = ["--model", model] if model else []
    return {
        "theory": [str(SCRIPTS / "theory_figures.py"), *with_model, "--out", out],
        "eval_shapes": [str(SCRIPTS / "eval_shapes.py"), *with_model, "--out", out],
        "accuracy_vs_steps": [str(SCRIPTS / "eval_checkpoints.py"), "--run", run, "--out", out],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pipeline folder (default: the shipped model)")
    parser.add_argument("--run", default="runs/default", help="(default: runs/default)")
    parser.add_argument("--out", default="docs/figures", help="(default: docs/figures)")
    parser.add_argument(
        "--only", action="append", choices=list(commands(None, "", "")), help="(repeatable)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, command in commands(args.model, args.run, args.out).items():
        if args.only and name not in args.only:
            continue
        if name == "accuracy_vs_steps" and not (Path(args.run) / "unet" / "checkpoints").is_dir():
            logger.info("%s: skipped, %s holds no checkpoints", name, args.run)
            continue
        logger.info("%s: %s", name, " ".join(["python", *command]))
        if args.dry_run:
            continue
        status = subprocess.run([sys.executable, *command]).returncode
        if status:
            logger.error("%s failed with exit status %d", name, status)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
