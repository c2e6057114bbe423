"""The ``ldm`` command line: `main` parses the arguments (`ldm.cli.parser`), runs the command
(a ``*_command`` of its family: `ldm.cli.generate`, `ldm.cli.train`, `ldm.cli.data`,
`ldm.cli.evaluate`) and turns what goes wrong into an exit status: a user's error is one line
and exit 2, an interrupted training run exit 130 (SIGINT) or 143 (SIGTERM) after its
checkpoint, a bug in ldm its traceback and exit 1."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

from ldm.cli.parser import build_parser
from ldm.errors import USER_ERRORS, TrainingInterrupted, one_line

__all__ = ["build_parser", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except TrainingInterrupted as stopped:
        print(f"ldm {args.command}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"ldm {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except Exception:  # a bug in ldm, not the user's input: the traceback helps to fix it
        traceback.print_exc()
        print(
            f"ldm {args.command}: internal error: this is a bug in ldm, not in your input; "
            "please report it with the command you ran and the traceback above",
            file=sys.stderr,
        )
        return 1
    return 0


def run() -> None:
    """Console entry point: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
