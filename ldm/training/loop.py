"""The one training loop, `fit`: the U-Net (`ldm.training.denoiser`), the VAE and CLIP (`ldm.training.pretrain`)
differ only in the `Objective` they hand it. The only module that imports accelerate.

`fit` runs a `_Fit` through its steps: (1) `setup`: optimizer and schedule, EMA, what is
checkpointed; (2) `resume`; (3) `run`: seeded epochs of batches (`next_batch`), one
`optimisation_step` each (gradient accumulation, clipping, the NaN guard), then `after_update`:
the EMA, JSONL and TensorBoard logs, atomic rotated checkpoints (`write_checkpoint`),
validation images with the EMA weights; a checkpoint on SIGINT/SIGTERM (`signals_caught`);
(4) `finish`. Every random draw goes through the generators of `TrainingState`, whose states
are checkpointed, so a run that is killed and resumed ends with the same weights as one that
was not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ldm.config import TrainSettings
from ldm.errors import TrainingInterrupted
from ldm.seeds import generator_for
from ldm.training.checkpoint import (
    EMA,
    EMA_FILE,
    begin_checkpoint,
    check_saved_names,
    commit_checkpoint,
    latest_checkpoint,
    resolve_resume,
    save_only,
    save_run_config,
    start_run,
    trained_names,
)
from ldm.training.objective import Objective, Step, parameter_names
from ldm.training.state import TrainingState, epoch_batches, lr_factor, progress, truncate_log

logger = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 10


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
    # 1. Optimizer, LR schedule, EMA, and what is checkpointed.
    run = _Fit(objective, t, out, accelerator, config)
    # 2. Resume: a checkpoint that cannot be read is an error, never a silent restart.
    run.resume(resolve_resume(out / "checkpoints", resume))
    # 3. Steps, until max_steps or a signal.
    with run.signals_caught(), run.logs_open():
        run.run()
    # 4. Stop on the signal, or end with the EMA weights in place.
    run.finish()


class _Fit:
    """The state of one `fit`: the prepared model and optimizer, the EMA, the `TrainingState`
    (with the LR schedule), the logs, and the signal that stops the run."""

    def __init__(self, objective: Objective, t: TrainSettings, out: Path, accelerator, config):
        self.objective, self.t, self.out, self.config = objective, t, out, config
        self.accelerator, self.main = accelerator, accelerator.is_main_process
        self.folder = out / "checkpoints"
        self.stop_signal: int | None = None
        self.nonfinite_in_a_row = 0
        self.batches: list[list[int]] = []
        self.batches_epoch: int | None = None
        self.log_file = self.board = self.bar = None
        self.started = time.perf_counter()
        self.setup()

    def setup(self) -> None:
        """AdamW over the parts, the LR schedule in the `TrainingState`, `Accelerator.prepare`,
        the EMA of every trained parameter, and the part modules that Accelerate checkpoints."""
        t, objective, accelerator = self.t, self.objective, self.accelerator
        fused = accelerator.device.type in ("cpu", "cuda")  # one kernel per step: 4x faster on CPU
        groups = [{"params": part.parameters, "lr": part.learning_rate} for part in objective.parts]
        optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused)
        noise = generator_for(t.seed, "noise", accelerator.process_index)
        state = TrainingState(0, 0, 0, noise, objective.data_generator, max_steps=t.max_steps)
        # The schedule is stepped once per optimizer update by us, not by Accelerate (which would
        # step it once per process), and saved in every process's TrainingState.
        state.schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, state))
        self.state, self.model, self.saved_names = state, None, None
        if objective.prepared is not None:
            self.model, self.optimizer = accelerator.prepare(objective.prepared, optimizer)
            self.by_hand = objective.parts[1:]
            unwrapped = accelerator.unwrap_model(self.model)
            named = [(objective.parts[0].name, unwrapped, objective.parts[0].parameters)]
            self.saved_names = trained_names(unwrapped, objective.parts[0].parameters)
            if self.saved_names is not None:  # a frozen model with adapters: save only them
                accelerator.register_save_state_pre_hook(save_only(self.saved_names))
        else:
            self.optimizer = accelerator.prepare(optimizer)
            self.by_hand, named = objective.parts, []
        named += [(part.name, part.module, part.parameters) for part in self.by_hand]
        self.trained = [p for _, _, parameters in named for p in parameters]
        self.names = parameter_names(named)
        self.ema = (
            EMA(self.trained, t.ema_decay, power=t.ema_power, inv_gamma=t.ema_inv_gamma)
            if t.ema_decay
            else None
        )
        # Accelerate saves registered objects from the main process only, so each process
        # saves its own TrainingState; the EMA is saved by name (`write_checkpoint`).
        for part in objective.parts:
            if part.module is not None:
                accelerator.register_for_checkpointing(part.module)

    def resume(self, checkpoint: Path | None) -> None:
        """Load ``checkpoint`` (None: a fresh start): Accelerate's state, this process's
        `TrainingState` and the EMA; anchor the LR when max_steps changes; cut the log."""
        if checkpoint is None:
            return
        accelerator, state, t = self.accelerator, self.state, self.t
        own_state = checkpoint / f"training_state_{accelerator.process_index}.pt"
        if not own_state.is_file():
            raise ValueError(
                f"{checkpoint} has no {own_state.name}: it is incomplete, was written by a run "
                "with fewer processes, or by an older ldm; resume with the same number of "
                "processes, or start the run again"
            )
        saved = torch.load(own_state, weights_only=True)
        no_ema = self.ema is not None and not (checkpoint / EMA_FILE).is_file()
        if "lr_schedule" not in saved or no_ema:
            missing = f"its {EMA_FILE}" if no_ema else f"the LR schedule in {own_state.name}"
            raise ValueError(
                f"{checkpoint} lacks {missing}: it was written by an older ldm, or without "
                "ema_decay; start the run again"
            )
        if self.saved_names is not None:  # it holds the trained weights only: check them
            check_saved_names(checkpoint / "model.safetensors", self.saved_names)
        accelerator.load_state(str(checkpoint), strict=self.saved_names is None)
        state.load_state_dict(saved)
        if self.ema is not None:
            self.ema.load(checkpoint / EMA_FILE, self.names)
        logger.info("resumed %s from %s at step %d", self.objective.name, checkpoint, state.step)
        if state.max_steps and state.max_steps != t.max_steps and state.step >= t.warmup_steps:
            old = dataclasses.replace(t, max_steps=state.max_steps)
            state.anchor = (state.step, progress(old, state.anchor, state.step))
            logger.info(
                "max_steps changes from %d to %d: the LR goes on from its value at step %d",
                state.max_steps,
                t.max_steps,
                state.step,
            )
        state.max_steps = t.max_steps
        if self.main:
            truncate_log(self.out / "log.jsonl", state.step)

    @contextlib.contextmanager
    def signals_caught(self) -> Iterator[None]:
        """SIGINT/SIGTERM (caught by the main process): checkpoint after this step, then stop."""

        def on_signal(signum, frame):
            self.stop_signal = signum

        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, on_signal) for s in signals} if self.main else {}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def logs_open(self) -> Iterator[None]:
        """The JSONL log, TensorBoard (``tensorboard --logdir OUT``) and the progress bar, and
        the clock, which goes on from a resumed run's."""
        out, main = self.out, self.main
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "log.jsonl", "a", encoding="utf-8") if main else None
        self.board = SummaryWriter(str(out / "tensorboard")) if main else None
        name, step = self.objective.name, self.state.step
        self.bar = tqdm(total=self.t.max_steps, initial=step, desc=name, disable=not main)
        self.started = time.perf_counter() - self.state.elapsed_s
        try:
            yield
        finally:
            self.bar.close()
            if self.log_file is not None:
                self.log_file.close()
                self.board.close()

    def run(self) -> None:
        """Batches until max_steps or a signal; a non-finite loss skips its step."""
        while self.state.step < self.t.max_steps and self.stop_signal is None:
            result, finite = self.optimisation_step(self.next_batch())
            if not finite:
                self.skip_nonfinite()
                continue
            self.nonfinite_in_a_row = 0
            if self.accelerator.sync_gradients:
                self.after_update(result)

    def next_batch(self) -> list[int]:
        """This process's next batch of dataset indices, in the next epoch when this one is done."""
        state, t, accelerator = self.state, self.t, self.accelerator
        while True:
            if self.batches_epoch != state.epoch:  # this process's batches, once per epoch
                self.batches_epoch = state.epoch
                self.batches = epoch_batches(
                    self.objective.n,
                    state.epoch,
                    t.seed,
                    t.batch_size,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
            if state.position < len(self.batches):
                break
            state.epoch, state.position = state.epoch + 1, 0
        state.position += 1
        return self.batches[state.position - 1]

    def optimisation_step(self, indices: list[int]) -> tuple[Step, bool]:
        """The loss of a batch, and under gradient accumulation its backward pass, clipping and
        update; a loss that is not finite on any process skips it on every process."""
        accelerator, t = self.accelerator, self.t
        with accelerator.accumulate(*((self.model,) if self.model is not None else ())):
            result = self.objective.loss(self.model, indices, self.state.generator)
            loss = result.loss
            finite = bool(accelerator.gather(torch.isfinite(loss).reshape(1).float()).min() > 0)
            if finite:
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if self.model is not None:
                        accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                    for part in self.by_hand:  # not prepared: average them ourselves
                        _average_gradients(accelerator, part.parameters)
                        torch.nn.utils.clip_grad_norm_(part.parameters, t.max_grad_norm)
                self.optimizer.step()
                if accelerator.sync_gradients:
                    self.state.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        return result, finite

    def skip_nonfinite(self) -> None:
        """Count a skipped step; too many in a row stop the run."""
        self.state.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.state.step}; "
                "stopped. The last good checkpoint is intact: lower the learning rate, "
                "or use mixed_precision 'bf16' or 'no', and resume with --resume latest"
            )

    def after_update(self, result: Step) -> None:
        """After an optimizer update: the EMA, then the log, checkpoint and validation due."""
        state, t = self.state, self.t
        state.step += 1
        if self.ema is not None:
            self.ema.update(self.trained)
        logged = result.logged if result.logged is not None else result.loss
        logged = self.accelerator.gather(logged.detach().reshape(1)).mean().item()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logged:.4f}")
        if self.log_file is not None and (
            state.step % self.objective.log_every == 0 or state.step == t.max_steps
        ):
            _log(self.log_file, self.board, state, logged, self.started, result.figures)
        if (
            state.step % t.checkpoint_every == 0
            or state.step == t.max_steps
            or self.stop_signal is not None
        ):
            self.write_checkpoint()
        self.validate()

    def write_checkpoint(self) -> None:
        """Every process writes its part into a temporary folder; the main process then
        renames it, so a crash mid-write never leaves a broken latest checkpoint."""
        accelerator, state = self.accelerator, self.state
        if self.main:
            begin_checkpoint(self.folder, state.step)
        accelerator.wait_for_everyone()
        tmp = self.folder / f".tmp-checkpoint-{state.step}"
        accelerator.save_state(str(tmp))
        state.elapsed_s = time.perf_counter() - self.started
        torch.save(state.state_dict(), tmp / f"training_state_{accelerator.process_index}.pt")
        if self.main and self.ema is not None:
            self.ema.save(tmp / EMA_FILE, self.names)
        if self.main and self.config is not None:
            save_run_config(tmp, self.config)
        accelerator.wait_for_everyone()
        if self.main:
            commit_checkpoint(self.folder, state.step, keep=self.t.keep_checkpoints)

    def validate(self) -> None:
        """The objective's validation with the EMA weights, when due (main process only)."""
        objective, step = self.objective, self.state.step
        if objective.validate is None or not objective.validate_every or not self.main:
            return
        if step % objective.validate_every == 0:
            image = _with_ema(self.ema, self.trained, objective.validate, step)
            if image is not None:
                self.board.add_image("validation", np.asarray(image), step, dataformats="HWC")

    def finish(self) -> None:
        """Raise `TrainingInterrupted` after a signal; else copy the EMA into the weights."""
        if self.stop_signal is not None:
            latest = latest_checkpoint(self.folder)
            raise TrainingInterrupted(
                self.objective.name, self.stop_signal, self.state.step, latest
            )
        self.accelerator.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.trained)


def _average_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """The mean gradient over processes, for modules that Accelerate did not wrap."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def _log(log_file, board, state: TrainingState, loss: float, started: float, figures) -> None:
    """One JSONL record, and its numbers as TensorBoard scalars (a dict figure: one per key)."""
    record = {
        "step": state.step,
        "loss": loss,
        "lr": state.schedule.get_last_lr()[0],
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
