"""The one training loop, `fit`: the U-Net (`ldm.training.denoiser`), the VAE and CLIP (`ldm.training.pretrain`)
differ only in the `Objective` they hand it. The only module that imports accelerate.

`fit`, in numbered sections: (1) optimizer and schedule, (2) EMA and what is checkpointed,
(3) resume, (4) steps: seeded epochs of batches, gradient accumulation, clipping, the NaN guard,
EMA updates, JSONL and TensorBoard logs, atomic rotated checkpoints, validation images with the
EMA weights, and a checkpoint on SIGINT/SIGTERM. Every random draw goes through the generators
of `TrainingState`, whose states are checkpointed, so a run that is killed and resumed ends
with the same weights as one that was not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ldm.config import TrainSettings
from ldm.errors import TrainingInterrupted
from ldm.training.checkpoint import (
    EMA,
    begin_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    resolve_resume,
    save_run_config,
    start_run,
)

logger = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 10


@dataclass
class TrainingState:
    """What besides weights and optimizer a resumed run needs: where it is, and its generators."""

    step: int
    epoch: int
    position: int  # batches of this process already taken from the current epoch
    generator: torch.Generator  # caption dropout, VAE posterior samples, noise, timesteps
    data_generator: torch.Generator | None  # random crops and flips
    nonfinite_skipped: int = 0
    elapsed_s: float = 0.0  # training time before this process started (resumed runs)
    max_steps: int = 0  # the run's max_steps when this state was saved
    # The LR schedule's progress is anchored at (step, progress): a resumed run with another
    # max_steps goes on from the LR it had instead of jumping (see `_lr_lambda`).
    anchor: tuple[int, float] | None = None

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "generator": self.generator.get_state(),
            "nonfinite_skipped": self.nonfinite_skipped,
            "elapsed_s": self.elapsed_s,
            "max_steps": self.max_steps,
            "anchor": list(self.anchor) if self.anchor is not None else None,
        }
        if self.data_generator is not None:
            state["data_generator"] = self.data_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.generator.set_state(state["generator"])
        if self.data_generator is not None:
            self.data_generator.set_state(state["data_generator"])
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))  # absent in older checkpoints
        self.max_steps = int(state.get("max_steps", 0))
        anchor = state.get("anchor")
        self.anchor = (int(anchor[0]), float(anchor[1])) if anchor is not None else None


@dataclass
class Step:
    """One batch's result: ``loss`` is what is backpropagated; ``logged`` (default ``loss``) the
    figure logged as "loss"; ``figures`` more numbers to log (a dict value is logged per key)."""

    loss: torch.Tensor
    figures: dict[str, Any] = field(default_factory=dict)
    logged: torch.Tensor | None = None


@dataclass
class Part:
    """Parameters that train at one learning rate. ``module`` (when given) is checkpointed as a
    registered object; the module that Accelerate prepares is saved by Accelerate itself."""

    parameters: list[torch.nn.Parameter]
    learning_rate: float
    module: torch.nn.Module | None = None


@dataclass
class Objective:
    """What `fit` trains and how. ``loss(model, indices, generator)`` turns this process's batch
    of dataset indices into a `Step`; ``model`` is ``prepared`` after Accelerate wrapped it (call
    it, not ``prepared``, so that gradients synchronise across processes) or None. ``parts[0]``
    holds ``prepared``'s parameters when there is one; the gradients of other parts are averaged
    by hand. ``validate(step)`` runs with the EMA weights in place and may return an image."""

    name: str
    n: int  # dataset size
    parts: list[Part]
    loss: Callable[[Any, list[int], torch.Generator], Step]
    prepared: torch.nn.Module | None = None
    validate: Callable[[int], Image.Image | None] | None = None
    validate_every: int = 0  # 0: never
    data_generator: torch.Generator | None = None
    log_every: int = 1


def _average_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """The mean gradient over processes, for modules that Accelerate did not wrap."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def _progress(t: TrainSettings, anchor: tuple[int, float] | None, step: int) -> float:
    """The cosine's progress p = (step - warmup) / (max_steps - warmup). When a resumed run
    changes max_steps, p goes on linearly from ``anchor`` = (step s0, progress p0) to 1 at the
    new max_steps, so the LR continues from its value instead of jumping."""
    s0, p0 = anchor if anchor is not None else (t.warmup_steps, 0.0)
    return p0 + (1 - p0) * (step - s0) / max(1, t.max_steps - s0)


def _lr_lambda(t: TrainSettings, state: TrainingState):
    """The LR factor at a step: linear warm-up, then constant or cosine (`_progress`, with
    ``state.anchor`` as it is when the step is taken)."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_scheduler == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(max(_progress(t, state.anchor, step), 0.0), 1.0)))

    return factor


def _epoch_batches(
    n: int, epoch: int, seed: int, batch: int, rank: int, world: int
) -> list[list[int]]:
    """This process's batches of an epoch: a seeded permutation, cut to whole global batches."""
    order = torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
    ).tolist()
    per_step = batch * world
    usable = (n // per_step) * per_step or n  # a dataset smaller than one global batch still trains
    order = order[:usable]
    mine = order[rank::world]
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def make_accelerator(t: TrainSettings) -> Accelerator:
    """The `Accelerator` that `fit` needs for ``t`` (its gradient accumulation and precision)."""
    return Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=t.mixed_precision)


def prepare_run(
    out: Path,
    accelerator: Accelerator,
    resume: str | Path | None,
    config: dict,
    **options,
) -> Path | None:
    """`start_run` before any data is read: refuse a folder that holds a run, move it aside
    with ``overwrite``, check ``resume`` and the config change (``options``: ``overwrite``,
    ``allow_config_change``, ``carry``); returns the checkpoint to resume from."""
    if accelerator.is_main_process:
        checkpoint = start_run(out, resume, config=config, **options)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        checkpoint = resolve_resume(out / "checkpoints", resume)
    return checkpoint


def fit(
    objective: Objective,
    t: TrainSettings,
    out: Path,
    accelerator: Accelerator,
    *,
    resume: str | Path | None = None,
    config: dict | None = None,
) -> None:
    """Train ``objective`` with the settings ``t``, checkpointing to ``out/checkpoints`` and
    logging to ``out/log.jsonl`` and ``out/tensorboard``. Returns when ``t.max_steps`` were
    reached, with the EMA weights (if any) copied into the trained parameters. A signal
    (SIGINT/SIGTERM) saves a checkpoint, then raises `TrainingInterrupted`. ``resume`` is
    'latest', 'auto' or a checkpoint folder (`resolve_resume`); ``config``, the run's whole
    config, is saved in every checkpoint for `start_run` to compare on resume."""
    main = accelerator.is_main_process

    # 1. Optimizer and learning-rate schedule.
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel per step: 4x faster on CPU
    groups = [{"params": part.parameters, "lr": part.learning_rate} for part in objective.parts]
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused)
    generator = torch.Generator().manual_seed(t.seed * 7919 + accelerator.process_index)
    state = TrainingState(0, 0, 0, generator, objective.data_generator, max_steps=t.max_steps)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t, state))
    # The schedule is stepped once per optimizer update by us, not by Accelerate (which would step
    # it once per process), and checkpointed as a registered object. Accelerate saves registered
    # objects from the main process only, so each process saves its own TrainingState.
    model = None
    if objective.prepared is not None:
        model, optimizer = accelerator.prepare(objective.prepared, optimizer)
        by_hand = objective.parts[1:]
    else:
        optimizer = accelerator.prepare(optimizer)
        by_hand = objective.parts

    def trained_parameters() -> list[torch.nn.Parameter]:
        first = [] if model is None else list(accelerator.unwrap_model(model).parameters())
        return [*first, *(p for part in by_hand for p in part.parameters)]

    # 2. EMA, and the objects checkpointed besides the prepared model and the optimizer.
    ema = (
        EMA(trained_parameters(), t.ema_decay, power=t.ema_power, inv_gamma=t.ema_inv_gamma)
        if t.ema_decay
        else None
    )
    accelerator.register_for_checkpointing(lr_schedule)
    for part in objective.parts:
        if part.module is not None:
            accelerator.register_for_checkpointing(part.module)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # 3. Resume: a checkpoint that cannot be read is an error, never a silent restart.
    checkpoint = resolve_resume(out / "checkpoints", resume)
    if checkpoint is not None:
        own_state = checkpoint / f"training_state_{accelerator.process_index}.pt"
        if not own_state.is_file():
            raise ValueError(
                f"{checkpoint} has no {own_state.name}: it is incomplete, was written by a run "
                "with fewer processes, or by an older ldm; resume with the same number of "
                "processes, or start the run again"
            )
        accelerator.load_state(str(checkpoint))
        state.load_state_dict(torch.load(own_state, weights_only=True))
        logger.info("resumed %s from %s at step %d", objective.name, checkpoint, state.step)
        if state.max_steps and state.max_steps != t.max_steps and state.step >= t.warmup_steps:
            old = dataclasses.replace(t, max_steps=state.max_steps)
            state.anchor = (state.step, _progress(old, state.anchor, state.step))
            logger.info(
                "max_steps changes from %d to %d: the LR goes on from its value at step %d",
                state.max_steps,
                t.max_steps,
                state.step,
            )
        state.max_steps = t.max_steps
        if main:
            _truncate_log(out / "log.jsonl", state.step)

    def write_checkpoint() -> None:
        """Every process writes its part into a temporary folder; the main process then
        renames it, so a crash mid-write never leaves a broken latest checkpoint."""
        folder = out / "checkpoints"
        if main:
            begin_checkpoint(folder, state.step)
        accelerator.wait_for_everyone()
        tmp = folder / f".tmp-checkpoint-{state.step}"
        accelerator.save_state(str(tmp))
        state.elapsed_s = time.perf_counter() - started
        torch.save(state.state_dict(), tmp / f"training_state_{accelerator.process_index}.pt")
        if main and config is not None:
            save_run_config(tmp, config)
        accelerator.wait_for_everyone()
        if main:
            commit_checkpoint(folder, state.step, keep=t.keep_checkpoints)

    stop = {"signal": None}

    def on_signal(signum, frame):  # SIGINT/SIGTERM: checkpoint after this step, then exit
        stop["signal"] = signum

    previous = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    )

    # 4. Steps.
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.jsonl", "a", encoding="utf-8") if main else None
    board = SummaryWriter(str(out / "tensorboard")) if main else None  # tensorboard --logdir OUT
    bar = tqdm(total=t.max_steps, initial=state.step, desc=objective.name, disable=not main)
    started, nonfinite_in_a_row = time.perf_counter() - state.elapsed_s, 0
    accumulate = (model,) if model is not None else ()
    try:
        batches, batches_epoch = [], None
        while state.step < t.max_steps and stop["signal"] is None:
            if batches_epoch != state.epoch:  # this process's batches, once per epoch
                batches_epoch = state.epoch
                batches = _epoch_batches(
                    objective.n,
                    state.epoch,
                    t.seed,
                    t.batch_size,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
            if state.position >= len(batches):
                state.epoch, state.position = state.epoch + 1, 0
                continue
            indices = batches[state.position]
            state.position += 1
            with accelerator.accumulate(*accumulate):
                result = objective.loss(model, indices, state.generator)
                loss = result.loss
                finite = accelerator.gather(torch.isfinite(loss).reshape(1).float()).min() > 0
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if model is not None:
                            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                        for part in by_hand:  # not prepared: average them ourselves
                            _average_gradients(accelerator, part.parameters)
                            torch.nn.utils.clip_grad_norm_(part.parameters, t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            if not finite:  # skipped on every process together
                state.nonfinite_skipped += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} non-finite losses in a row at step {state.step}; "
                        "stopped. The last good checkpoint is intact: lower the learning rate, "
                        "or use mixed_precision 'bf16' or 'no', and resume with --resume latest"
                    )
                continue
            nonfinite_in_a_row = 0
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.update(trained_parameters())
            logged = result.logged if result.logged is not None else result.loss
            logged = accelerator.gather(logged.detach().reshape(1)).mean().item()
            bar.update(1)
            bar.set_postfix(loss=f"{logged:.4f}")
            if log_file is not None and (
                state.step % objective.log_every == 0 or state.step == t.max_steps
            ):
                _log(log_file, board, state, logged, lr_schedule, started, result.figures)
            if (
                state.step % t.checkpoint_every == 0
                or state.step == t.max_steps
                or stop["signal"] is not None
            ):
                write_checkpoint()
            if (
                objective.validate is not None
                and objective.validate_every
                and state.step % objective.validate_every == 0
                and main
            ):
                image = _with_ema(ema, trained_parameters(), objective.validate, state.step)
                if image is not None:
                    board.add_image("validation", np.asarray(image), state.step, dataformats="HWC")
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
            board.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        raise TrainingInterrupted(
            objective.name, stop["signal"], state.step, latest_checkpoint(out / "checkpoints")
        )
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trained_parameters())


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records after ``step`` (steps a killed run logged past its last checkpoint,
    which the resumed run logs again), so that every step appears once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut short by the kill
            return math.inf

    kept = [line for line in lines if line.strip() and logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def _log(log_file, board, state, loss, lr_schedule, started, figures) -> None:
    """One JSONL record, and its numbers as TensorBoard scalars (a dict figure: one per key)."""
    record = {
        "step": state.step,
        "loss": loss,
        "lr": lr_schedule.get_last_lr()[0],
        "elapsed_s": round(time.perf_counter() - started, 3),
        "nonfinite_skipped": state.nonfinite_skipped,
        **figures,
    }
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    for name, value in record.items():
        if name in ("step", "elapsed_s"):
            continue
        for key, number in value.items() if isinstance(value, dict) else [(None, value)]:
            board.add_scalar(name if key is None else f"{name}/{key}", number, state.step)


@torch.no_grad()
def _with_ema(ema: EMA | None, parameters: list[torch.nn.Parameter], fn, step: int):
    """``fn(step)`` with the EMA weights in ``parameters``, restored afterwards."""
    if ema is None:
        return fn(step)
    backup = [p.detach().clone() for p in parameters]
    ema.copy_to(parameters)
    try:
        return fn(step)
    finally:
        for p, b in zip(parameters, backup, strict=True):
            p.copy_(b)
