"""Training state that survives crashes: EMA weights and atomic, rotated checkpoint folders.

A checkpoint is written into a hidden sibling folder (``.tmp-checkpoint-N``) and renamed to
``checkpoint-N`` only when complete, so a crash mid-write never leaves a broken latest
checkpoint. Older checkpoints are removed only after the new one is in place. The EMA is kept in
it as ``ema.safetensors`` (`EMA.save`): its weights under their parameters' names, its settings
in the file's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
EMA_FILE = "ema.safetensors"  # in each checkpoint-N folder of a run with an EMA


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
    exactly, the update count included, and ``save``/``load`` do so through a safetensors file.
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

    def save(self, path: str | Path, names: list[str]) -> None:
        """Write ``path`` (safetensors, no pickle): the i-th weight under ``names[i]``, the name
        of the parameter it follows, and the settings and update count as JSON metadata."""
        if len(names) != len(self.shadow) or len(set(names)) != len(names):
            raise ValueError(f"{len(self.shadow)} EMA weights need as many distinct names")
        tensors = {
            n: s.detach().cpu().contiguous() for n, s in zip(names, self.shadow, strict=True)
        }
        settings = {k: v for k, v in self.state_dict().items() if not k.startswith("shadow.")}
        save_file(tensors, str(path), metadata={"ldm.ema": json.dumps(settings)})

    def load(self, path: str | Path, names: list[str]) -> None:
        """Restore what `save` wrote to ``path``, exactly; its names must be ``names``."""
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "ldm.ema" not in metadata:
            raise ValueError(f"{path} has no ldm.ema metadata: it was not written by EMA.save")
        if set(tensors) != set(names):
            missing, unexpected = set(names) - set(tensors), set(tensors) - set(names)
            raise ValueError(
                f"{path} does not hold this model's EMA: it lacks {sorted(missing)[:5]} and "
                f"holds {sorted(unexpected)[:5]} besides"
            )
        shadow = {f"shadow.{i}": tensors[n] for i, n in enumerate(names)}
        self.load_state_dict({**json.loads(metadata["ldm.ema"]), **shadow})


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


RESUME_CHOICES = "'latest' (the run's latest checkpoint), 'auto' (it if any, else a fresh start) or a checkpoint-N folder"
# Config keys a resumed run may change: they affect only the rest of the run, not its training.
RESUMABLE_KEYS = ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "output_dir")
RESUMABLE_KEYS += ("heldout",)


def resolve_resume(folder: str | Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` -> the latest in ``folder`` (an error when there
    is none), ``auto`` -> the latest or None (a fresh start), a path -> that checkpoint."""
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        found = latest_checkpoint(folder)
        if found is None and resume == "latest":
            raise FileNotFoundError(
                f"--resume latest: {folder} holds no checkpoint-N folder to resume; start "
                "without --resume, or pass --resume auto (resume if possible, else start)"
            )
        return found
    path = Path(resume)
    if not (path / "training_state_0.pt").is_file():
        what = (
            "is not a checkpoint folder (no training_state_0.pt)"
            if path.is_dir()
            else "does not exist"
        )
        raise FileNotFoundError(f"--resume {path} {what}; pass {RESUME_CHOICES}")
    return path


def check_run(
    out: str | Path, resume: str | Path | None, *, overwrite: bool = False
) -> Path | None:
    """`start_run`'s refusals without its changes on disk: the checkpoint to resume from, or
    None for a fresh start, which a folder that holds files refuses unless ``overwrite``."""
    out = Path(out)
    checkpoint = resolve_resume(out / "checkpoints", resume)
    if checkpoint is None and out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output_dir {out} is a file; choose a folder")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{out} holds a run already; continue it with --resume latest, choose "
                "another output_dir, or pass --overwrite to move it aside (nothing is deleted)"
            )
    return checkpoint


def start_run(
    out: str | Path,
    resume: str | Path | None,
    *,
    overwrite: bool = False,
    config: dict | None = None,
    allow_config_change: bool = False,
    carry: tuple[str, ...] = (),
) -> Path | None:
    """Check a run's folder before any data is read; returns the checkpoint to resume from.

    A fresh start (no checkpoint to resume) into a folder that holds files refuses, unless
    ``overwrite``, which moves the folder aside to a dated sibling (never deletes it). On
    resume, ``config`` is compared with the one saved in the checkpoint: keys that only affect
    the rest of the run (`RESUMABLE_KEYS`, ``validation.*``) are logged, others refuse unless
    ``allow_config_change``. Checkpoints after a resumed, earlier one are renamed
    ``superseded-checkpoint-N``, so rotation never removes them. The subfolders named in
    ``carry`` (derived data such as a latent cache) are hard-linked into the new run when the
    old one is moved aside, so both stay complete without a second copy on disk.
    """
    out = Path(out)
    checkpoint = check_run(out, resume, overwrite=overwrite)
    if checkpoint is None:
        if out.is_dir() and any(out.iterdir()):
            aside = _dated_sibling(out)
            out.rename(aside)
            logger.warning("moved the earlier run in %s aside to %s", out, aside)
            for name in carry:
                _link_tree(aside / name, out / name)
        return None
    if config is not None:
        _compare_configs(checkpoint, config, allow_config_change)
    if checkpoint.parent.resolve() == (out / "checkpoints").resolve():
        for later in checkpoints(checkpoint.parent):
            if _step(later) > _step(checkpoint):
                later.rename(later.with_name(f"superseded-{later.name}"))
                logger.warning(
                    "resuming from %s: renamed %s superseded-%s", checkpoint, later, later.name
                )
    return checkpoint


def _link_tree(source: Path, target: Path) -> None:
    """Hard links in ``target`` to every file under ``source`` (copies where links fail)."""
    for file in sorted(source.rglob("*")) if source.is_dir() else []:
        if file.is_file():
            dest = target / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, dest)
            except OSError:
                shutil.copy2(file, dest)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rpartition("-")[2])


def _dated_sibling(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, k = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while aside.exists():
        k += 1
        aside = folder.with_name(f"{folder.name}.old-{stamp}-{k}")
    return aside


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"max_steps": 1}}`` -> ``{"train.max_steps": 1}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def _compare_configs(checkpoint: Path, config: dict, allow: bool) -> None:
    saved_file = checkpoint / "run_config.json"
    if not saved_file.is_file():  # written by an ldm before this check
        return
    saved, now = (
        json.loads(saved_file.read_text()),
        _flat(config),
    )
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    for key in changed:
        logger.info("resume: %s changes from %r to %r", key, saved.get(key), now.get(key))

    def harmless(key: str) -> bool:
        return key.rpartition(".")[2] in RESUMABLE_KEYS or key.startswith("validation.")

    if (refused := [k for k in changed if not harmless(k)]) and not allow:
        listed = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in refused)
        raise ValueError(
            f"--resume {checkpoint}: the config changes what is trained: {listed}; restore "
            "the checkpoint's values, or pass --allow-config-change to resume anyway"
        )


def _flat(config: dict) -> dict:
    """A config as `flatten` keys and JSON values (paths as strings, tuples as lists)."""
    return flatten(json.loads(json.dumps(config, default=str)))


def save_run_config(checkpoint: Path, config: dict) -> None:
    """The run's config in a checkpoint, for `start_run`'s comparison on resume."""
    text = json.dumps(_flat(config), indent=2)
    (checkpoint / "run_config.json").write_text(text + "\n")


def trained_names(model: nn.Module, trained: list[nn.Parameter]) -> set[str] | None:
    """The names of ``trained`` in ``model`` when the model also holds frozen weights (a LoRA's
    base model: then checkpoints save only these), else None (the whole model is saved)."""
    ids = {id(p) for p in trained}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    return None if len(names) == len(list(model.parameters())) else names


def save_only(names: set[str]) -> Callable:
    """Accelerate's save hook for a partly frozen model: its file keeps only ``names`` (DDP's
    ``module.`` prefix aside), not the frozen weights they adapt."""

    def hook(models, weights: list[dict[str, Tensor]], output_dir) -> None:
        state = weights[0]
        for key in [k for k in state if k.removeprefix("module.") not in names]:
            del state[key]

    return hook


def check_saved_names(path: Path, names: set[str]) -> None:
    """A ValueError unless the safetensors file ``path`` holds exactly the weights ``names``."""
    with safe_open(str(path), "pt") as f:
        saved = {k.removeprefix("module.") for k in f.keys()}
    if saved != names:
        missing, extra = sorted(names - saved), sorted(saved - names)
        raise ValueError(
            f"{path} does not hold this run's trained weights (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): it was written by a run that trained other weights "
            "(another lora section?); start the run again"
        )
