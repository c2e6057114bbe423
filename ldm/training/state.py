"""Where a run of `ldm.training.loop.fit` is, and what follows from that alone.

`TrainingState` is what each process saves in a checkpoint besides the weights and the
optimizer: the step, the epoch and the position in it, the generators, the LR schedule.
`epoch_batches` is this process's share of an epoch, `lr_factor` the LR schedule's factor at a
step, and `truncate_log` cuts a log back to the step a run resumes from. Every seed comes from
`ldm.seeds.derive_seed`: the "epoch" stream orders the data, the "noise" and "data" streams
seed each process's generators.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.config import TrainSettings
from ldm.seeds import generator_for


@dataclass
class TrainingState:
    """What besides weights and optimizer a resumed run needs: where it is, its generators and
    its LR schedule (stepped by `fit` once per optimizer update, saved by every process)."""

    step: int
    epoch: int
    position: int  # batches of this process already taken from the current epoch
    generator: torch.Generator  # caption dropout, VAE posterior samples, noise, timesteps
    data_generator: torch.Generator | None  # random crops and flips
    nonfinite_skipped: int = 0
    elapsed_s: float = 0.0  # training time before this process started (resumed runs)
    max_steps: int = 0  # the run's max_steps when this state was saved
    # The LR schedule's progress is anchored at (step, progress): a resumed run with another
    # max_steps goes on from the LR it had instead of jumping (see `lr_factor`).
    anchor: tuple[int, float] | None = None
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None

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
        if self.schedule is not None:
            state["lr_schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.generator.set_state(state["generator"])
        if self.data_generator is not None:
            self.data_generator.set_state(state["data_generator"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["lr_schedule"])
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))  # absent in older checkpoints
        self.max_steps = int(state.get("max_steps", 0))
        anchor = state.get("anchor")
        self.anchor = (int(anchor[0]), float(anchor[1])) if anchor is not None else None


def progress(t: TrainSettings, anchor: tuple[int, float] | None, step: int) -> float:
    """The cosine's progress p = (step - warmup) / (max_steps - warmup). When a resumed run
    changes max_steps, p goes on linearly from ``anchor`` = (step s0, progress p0) to 1 at the
    new max_steps, so the LR continues from its value instead of jumping."""
    s0, p0 = anchor if anchor is not None else (t.warmup_steps, 0.0)
    return p0 + (1 - p0) * (step - s0) / max(1, t.max_steps - s0)


def lr_factor(t: TrainSettings, state: TrainingState):
    """The LR factor at a step: linear warm-up, then constant or cosine (`progress`, with
    ``state.anchor`` as it is when the step is taken)."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_scheduler == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(max(progress(t, state.anchor, step), 0.0), 1.0)))

    return factor


def epoch_batches(
    n: int, epoch: int, seed: int, batch: int, rank: int, world: int
) -> list[list[int]]:
    """This process's batches of an epoch: a permutation seeded by the "epoch" stream, cut to
    whole global batches."""
    order = torch.randperm(n, generator=generator_for(seed, "epoch", epoch)).tolist()
    per_step = batch * world
    usable = (n // per_step) * per_step or n  # a dataset smaller than one global batch still trains
    order = order[:usable]
    mine = order[rank::world]
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def truncate_log(path: Path, step: int) -> None:
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
