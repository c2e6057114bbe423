"""Exact denoisers for Gaussian data: closed forms to test and explain samplers with.

For data x0 ~ N(mu, sigma^2), i.i.d. per element, the noisy x_t = sqrt(a) x0 + sqrt(1 - a) eps
(a = alpha_bar_t) is Gaussian with mean sqrt(a) mu and variance a sigma^2 + 1 - a, so the
minimum-mean-square-error predictions are linear in x_t:

    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a)
    E[x0  | x_t] = mu + sqrt(a) sigma^2 (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a)

A network trained to convergence on such data would output exactly these, so a sampler run
with them should return N(mu, sigma^2): any error is the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.config.names import TimestepSpacing
from ldm.diffusion.samplers import ModelFn, sample_ddim, sample_ddpm
from ldm.diffusion.schedule import NoiseSchedule


def gaussian_model_fn(schedule: NoiseSchedule, mu: float, sigma: float) -> ModelFn:
    """The exact model callable ``model_fn(x_t, t)`` for data N(mu, sigma^2).

    It returns the schedule's prediction type: eps, or v = sqrt(a) eps - sqrt(1 - a) x0.
    x_t: (B, ...) any float dtype; t: (B,) int64 in [0, T), or fractional timesteps (float),
    whose alpha_bar is `NoiseSchedule.alpha_bar_at`'s.
    """

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        a = schedule.alpha_bar_at(t).to(x_t.dtype)  # (B,)
        a = a.view(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, ...)
        residual = (x_t - a.sqrt() * mu) / (a * sigma**2 + 1 - a)
        eps = (1 - a).sqrt() * residual
        if schedule.prediction_type == "epsilon":
            return eps
        x0 = mu + a.sqrt() * sigma**2 * residual
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model_fn


@dataclass(frozen=True)
class MomentErrors:
    """How far samples are from N(mu, sigma^2): |mean - mu| / sigma and std / sigma - 1."""

    mean: float
    std: float

    @classmethod
    def of(cls, x: Tensor, mu: float, sigma: float) -> MomentErrors:
        return cls(abs(x.double().mean().item() - mu) / sigma, x.double().std().item() / sigma - 1)


def gaussian_sampler_errors(
    schedule: NoiseSchedule,
    mu: float,
    sigma: float,
    *,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: TimestepSpacing = "leading",
    num_samples: int = 200_000,
    seed: int = 0,
) -> MomentErrors:
    """Sample N(mu, sigma^2) with the exact model and a sampler; return the moment errors.

    ``sampler`` is ``ddim`` or ``ddpm``; ``num_steps`` None means every timestep for DDPM.
    The samples are shaped (num_samples // 100, 100) and drawn on the CPU under ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples // 100, 100, generator=generator)
    model_fn = gaussian_model_fn(schedule, mu, sigma)
    if sampler == "ddim":
        if num_steps is None:
            raise ValueError("the ddim sampler needs num_steps")
        x = sample_ddim(
            model_fn,
            schedule,
            x_T,
            num_steps,
            eta=eta,
            generator=generator,
            timestep_spacing=timestep_spacing,
        )
    elif sampler == "ddpm":
        x = sample_ddpm(
            model_fn,
            schedule,
            x_T,
            num_steps=num_steps,
            generator=generator,
            timestep_spacing=timestep_spacing,
        )
    else:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: ddim, ddpm")
    return MomentErrors.of(x, mu, sigma)
