"""What a trainer hands `ldm.training.loop.fit`: an `Objective` of trained `Part`s and a loss
that returns a `Step`; and `parameter_names`, the keys of the EMA in ``ema.safetensors``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


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
    registered object; the module that Accelerate prepares is saved by Accelerate itself. In
    ``ema.safetensors`` a parameter's key is its name in ``module`` (in the prepared module for
    the first part), after ``name`` and a dot when ``name`` is given."""

    parameters: list[torch.nn.Parameter]
    learning_rate: float
    module: torch.nn.Module | None = None
    name: str = ""


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


def parameter_names(named: list[tuple[str, torch.nn.Module | None, list]]) -> list[str]:
    """The keys of ``ema.safetensors``: for each (part name, module, parameters), each
    parameter's name in the module, after the part's name (or ``parts.i`` for a later part
    without one) and a dot; ``param_j`` for a parameter the module does not hold."""
    names = []
    for i, (name, module, parameters) in enumerate(named):
        prefix = f"{name}." if name else ("" if i == 0 else f"parts.{i}.")
        known = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        names += [prefix + known.get(id(p), f"param_{j}") for j, p in enumerate(parameters)]
    if len(set(names)) != len(names):
        raise ValueError("the trained parts' parameter names collide: give each Part a name")
    return names
