"""The pipeline's argument checks, before any work is done: each error names the argument
and what is allowed. Also the per-image generators: seed S gives image k the seed S + k."""

from __future__ import annotations

import math
import random

import torch

from ldm.config.names import OUTPUT_TYPES

MAX_SEED = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator.manual_seed's int64)
DEFAULT_SAMPLE_SIZE = 64  # latent pixels, for a U-Net config without sample_size
DRAWN_SEEDS = 2**32  # a seed drawn for a run that gives none is below this (short to type)


def draw_seed() -> int:
    """A fresh seed for a run that gives none; it is recorded, so the run can be repeated."""
    return random.SystemRandom().randrange(DRAWN_SEEDS)


def check_size(
    height: int | None, width: int | None, sample_size: int | None, factor: int
) -> tuple[int, int]:
    """(height, width): each given one, else the U-Net's ``sample_size`` in pixels, checked to
    be a positive multiple of the VAE's downscale ``factor``."""
    default = (sample_size or DEFAULT_SAMPLE_SIZE) * factor
    height = default if height is None else height  # 0 is an error, not the default
    width = default if width is None else width
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ValueError(
                f"{name}={value} must be a positive multiple of {factor} (the VAE's downscale factor)"
            )
    return height, width


def check_settings(
    num_inference_steps: int,
    guidance_scale: float,
    eta: float,
    output_type: str,
    num_train_timesteps: int,
) -> None:
    """The sampling settings, against the names of `ldm.config.names` and the schedule's
    ``num_train_timesteps`` (the sampler's name is `ldm.diffusion.registry.resolve_sampler`'s)."""
    T = num_train_timesteps
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
        raise ValueError(
            f"num_inference_steps must be an integer from 1 to {T}, got {num_inference_steps!r}"
        )
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1 means no guidance), got {guidance_scale}"
        )
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")


def check_strength(strength: float) -> None:
    if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def prompt_lists(
    prompt: str | list[str], negative_prompt: str | list[str] | None
) -> tuple[list[str], list[str]]:
    """The prompts and one negative prompt per prompt ("" where none is given)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list; give at least one prompt")
    if negative_prompt is None or isinstance(negative_prompt, str):
        negatives = [negative_prompt or ""] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt, or a single string"
            )
    return prompts, negatives


def image_generators(
    n: int,
    seed: int | list[int] | None,
    generator: torch.Generator | list[torch.Generator] | None,
) -> tuple[list[torch.Generator], list[int | None]]:
    """One CPU generator per image, and its seed: seed S gives image k the seed S + k (so any
    image reproduces alone); with neither a seed nor generators, S is drawn."""
    if generator is not None:
        generators = generator if isinstance(generator, list) else [generator]
        if len(generators) != n:
            raise ValueError(
                f"got {len(generators)} generators for {n} images; pass one per image (or use seed=)"
            )
        return generators, [g.initial_seed() for g in generators]
    if seed is None:
        seed = draw_seed()
    seeds = [seed + k for k in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images; pass one per image, or one int")
    if bad := [s for s in seeds if not 0 <= s < MAX_SEED]:
        raise ValueError(f"seed {bad[0]} is not allowed; use 0 <= seed < 2**63")
    return [torch.Generator().manual_seed(s) for s in seeds], seeds
