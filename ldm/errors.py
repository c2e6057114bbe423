"""What ldm raises on purpose. The CLI (`ldm.cli.main`) prints `USER_ERRORS` as one line and
exits 2, a `TrainingInterrupted` as one line and exits 128 + the signal (130 for SIGINT, 143
for SIGTERM), and anything else with its traceback and a request to report it."""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a training run after its checkpoint was saved."""

    def __init__(self, what: str, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(
            f"{what} stopped by {name} at step {step}; {saved}; continue with --resume latest"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# Bad input: values and files a user gave (`ldm.config.io` turns YAML errors into ValueErrors).
# Everything else is a bug in ldm.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message joined with '; ')."""
    text = str(error) or type(error).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
