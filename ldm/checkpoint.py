"""Training state that survives crashes: EMA weights and atomic, rotated checkpoint folders.

A checkpoint is written into a hidden sibling folder (``.tmp-checkpoint-N``) and renamed to
``checkpoint-N`` only when complete, so a crash mid-write never leaves a broken latest
checkpoint. Older checkpoints are removed only after the new one is in place.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class EMA:
    """Exponential moving average of parameters: ema <- decay * ema + (1 - decay) * param.

    Kept in float32 on the parameters' device; ``copy_to`` writes it into a model (for
    validation and export), ``state_dict``/``load_state_dict`` save and restore it exactly.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter]) -> None:
        params = list(parameters)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        for s, p in zip(self.shadow, parameters, strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Tensor | float]:
        return {"decay": self.decay, **{f"shadow.{i}": s for i, s in enumerate(self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        shadow = [state[f"shadow.{i}"] for i in range(len(self.shadow))]
        if any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise ValueError("the EMA state does not fit this model's parameters")
        self.decay = float(state["decay"])
        self.shadow = [
            s.float().to(old.device).clone() for s, old in zip(shadow, self.shadow, strict=True)
        ]


def checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None


def begin_checkpoint(folder: str | Path, step: int) -> Path:
    """A fresh temporary folder for ``checkpoint-{step}`` (cleared if an earlier crash left one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(folder: str | Path, step: int, *, keep: int) -> Path:
    """Rename the complete temporary folder to ``checkpoint-{step}``, then keep the last ``keep``."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    folder = Path(folder)
    final, tmp = folder / f"checkpoint-{step}", folder / f".tmp-checkpoint-{step}"
    if final.exists():  # the same step saved again (e.g. on SIGTERM right after a save)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
        logger.info("removed old checkpoint %s", old)
    return final


def save_checkpoint(
    folder: str | Path, step: int, write: Callable[[Path], None], *, keep: int
) -> Path:
    """Write ``checkpoint-{step}`` atomically with ``write(tmp_folder)``, then keep the last
    ``keep`` checkpoints. If ``write`` fails, the temporary folder is removed, the error is
    raised, and the existing checkpoints are untouched."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    tmp = begin_checkpoint(folder, step)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(folder, step, keep=keep)


def resolve_resume(folder: str | Path, resume: str | None) -> Path | None:
    """``--resume latest`` -> the latest checkpoint in ``folder`` (None when there is none
    yet: a fresh start); ``--resume PATH`` -> that checkpoint, which must exist."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(folder)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(
            f"no checkpoint folder at {path}; pass --resume latest or a checkpoint-N folder"
        )
    return path
