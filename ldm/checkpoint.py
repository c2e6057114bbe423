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
    """Exponential moving average of parameters: ema <- decay_n * ema + (1 - decay_n) * param.

    The decay warms up as diffusers' ``EMAModel.get_decay`` does, so that a short run's average
    follows the run instead of staying at the starting weights. At the n-th update (n >= 1):

        k = n - 1;  decay_n = 0 for k = 0 (the first update copies), else
        decay_n = min(decay, (1 + k) / (10 + k))                  (the default), or
        decay_n = min(decay, 1 - (1 + k / inv_gamma) ** -power)   (with ``power``: the power-law
                                                                   warm-up of Karras et al. 2022)

    A fixed 0.9999 without warm-up would leave a 400-step fine-tune 0.9999^400 = 96% the
    starting weights. Kept in float32 on the parameters' device; ``copy_to`` writes it into a
    model (for validation and export), ``state_dict``/``load_state_dict`` save and restore it
    exactly, the update count included.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        decay: float,
        *,
        power: float | None = None,
        inv_gamma: float = 1.0,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        if power is not None and power <= 0:
            raise ValueError(f"ema_power must be null or > 0, got {power}")
        if inv_gamma <= 0:
            raise ValueError(f"ema_inv_gamma must be > 0, got {inv_gamma}")
        self.decay, self.power, self.inv_gamma = decay, power, inv_gamma
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]

    def decay_at(self, n: int) -> float:
        """The decay that the n-th update (n >= 1) uses."""
        k = n - 1
        if k <= 0:
            return 0.0
        if self.power is None:
            warm = (1 + k) / (10 + k)
        else:
            warm = 1 - (1 + k / self.inv_gamma) ** -self.power
        return min(self.decay, warm)

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter]) -> None:
        params = list(parameters)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        self.num_updates += 1
        weight = 1.0 - self.decay_at(self.num_updates)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], weight)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        for s, p in zip(self.shadow, parameters, strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Tensor | float | int | None]:
        settings = {"decay": self.decay, "power": self.power, "inv_gamma": self.inv_gamma}
        shadow = {f"shadow.{i}": s for i, s in enumerate(self.shadow)}
        return {**settings, "num_updates": self.num_updates, **shadow}

    def load_state_dict(self, state: dict) -> None:
        shadow = [state[f"shadow.{i}"] for i in range(len(self.shadow))]
        if any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise ValueError("the EMA state does not fit this model's parameters")
        self.decay = float(state["decay"])
        self.power, self.inv_gamma = state.get("power"), float(state.get("inv_gamma", 1.0))
        # A checkpoint from before the warm-up used its fixed decay at every update: resume it so.
        self.num_updates = int(state.get("num_updates", 1 << 62))
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
