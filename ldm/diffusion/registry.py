"""Every sampler by name: `SAMPLERS`, the names people type (A1111's included), where
image-to-image starts for each, and the one call the pipeline makes.

Each sampler is ``fn(model_fn, schedule, x_T, num_steps, *, generator=None, sigmas="default",
progress=False, timestep_spacing=..., steps_offset=..., start_step=0, ...)`` and takes standard
normal x_T. DDIM and DDPM step between training timesteps; the others work in sigma space
(`ldm.diffusion.karras`, `ldm.diffusion.multistep`) on `ldm.diffusion.schedule.sigma_steps`'s
noise levels.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ldm.config.generation import AUTOMATIC_SIGMAS
from ldm.config.model import SchedulerConfig
from ldm.config.names import (
    A1111_SAMPLERS,
    MULTISTEP_SAMPLERS,
    SAMPLER_NAMES,
    SIGMA_SAMPLERS,
    SIGMA_SCHEDULES,
    SigmaScheduleName,
    split_schedule_suffix,
)
from ldm.diffusion.karras import sample_euler, sample_euler_ancestral, sample_heun
from ldm.diffusion.multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from ldm.diffusion.samplers import ModelFn, sample_ddim, sample_ddpm
from ldm.diffusion.schedule import NoiseSchedule, make_timesteps, sigma_steps

# name -> sampler: the names of `ldm.config.names.SAMPLER_NAMES`, in their order
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
assert tuple(SAMPLERS) == SAMPLER_NAMES


def model_calls(sampler: str, num_steps: int) -> int:
    """Model calls (guided or not: one batched network call each) of a text-to-image run."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def resolve_sampler(
    name: str, sigmas: SigmaScheduleName | None = None
) -> tuple[str, SigmaScheduleName]:
    """A sampler name as people type it -> (ldm name, sigma schedule).

    Takes ldm's names (``dpmpp_2m``) and A1111's, in any case: ``"DPM++ 2M"``, ``"Euler a"``,
    and the older ones that carry the schedule (``"DPM++ 2M Karras"``). ``sigmas`` None means
    the name's schedule, or the sampler's automatic one (`AUTOMATIC_SIGMAS`, else
    ``default``); a schedule that contradicts the name is an error.
    """
    if sigmas is not None and sigmas not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigmas {sigmas!r}; allowed: {', '.join(SIGMA_SCHEDULES)}")
    key = " ".join(str(name).split()).lower()
    key, from_name = split_schedule_suffix(key)
    known = {n: n for n in SAMPLER_NAMES} | {v.lower(): k for k, v in A1111_SAMPLERS.items()}
    if key not in known:
        allowed = ", ".join(SAMPLER_NAMES)
        shown = ", ".join(f'"{v}"' for v in A1111_SAMPLERS.values())
        raise ValueError(
            f"unknown sampler {name!r}; allowed: {allowed}, or A1111's names {shown} "
            "(with ' Karras' or ' Exponential' for their schedule)"
        )
    if from_name is not None and sigmas not in (None, from_name):
        raise ValueError(f"sampler {name!r} names the {from_name} schedule, but sigmas={sigmas!r}")
    sampler = known[key]
    return sampler, sigmas or from_name or AUTOMATIC_SIGMAS.get(sampler, "default")


def start_alpha_bars(
    sampler: str,
    schedule: NoiseSchedule,
    num_steps: int,
    sigmas: SigmaScheduleName = "default",
    **spacing,
) -> Tensor:
    """alpha_bar of the sample each step starts from, float64 (N,): at DDIM's and DDPM's
    timesteps, or 1 / (1 + sigma_i^2) on a sigma sampler's noise levels."""
    if sampler not in SIGMA_SAMPLERS:
        return schedule.alphas_cumprod64[
            make_timesteps(num_steps, schedule.num_train_timesteps, **spacing)
        ]
    multistep = sampler in MULTISTEP_SAMPLERS
    levels, _ = sigma_steps(schedule, num_steps, sigmas, multistep=multistep, **spacing)
    return 1 / (1 + levels[:-1] ** 2)


def img2img_start(
    schedule: NoiseSchedule,
    x0: Tensor,
    noise: Tensor,
    num_steps: int,
    strength: float,
    *,
    sampler: str = "ddim",
    sigmas: SigmaScheduleName = "default",
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> tuple[Tensor, int]:
    """Where image-to-image sampling starts: returns (x_start, start_step).

    With N = num_steps, strength s in [0, 1] runs the last round(s * N) of the sampler's N
    steps (halves round up). x_start is x0 noised by q(x_t | x0), DDPM eq. (4), to the level
    of the first of them; s = 1 starts from pure noise (x_start = noise), s = 0 runs no step
    (x_start = x0). Pass both on to the same sampler with the same settings.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    alpha_bars = start_alpha_bars(sampler, schedule, num_steps, sigmas, **spacing)
    steps_run = int(strength * num_steps + 0.5)
    start_step = num_steps - steps_run
    if steps_run == num_steps:
        return noise, start_step
    if steps_run == 0:
        return x0, start_step
    a = alpha_bars[start_step].item()
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise, start_step


def run_sampler(
    sampler: str,
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    num_steps: int,
    *,
    config: SchedulerConfig,
    sigmas: SigmaScheduleName = "default",
    eta: float = 0.0,
    **kwargs,
) -> Tensor:
    """Run ``sampler`` with a scheduler config's settings (spacing; DDIM's final alpha_bar and
    clipping; DDPM's variance). ``kwargs``: generator, progress, start_step."""
    own = {  # the keyword arguments that only some samplers take
        "ddim": {"eta": eta, "set_alpha_to_one": config.set_alpha_to_one},
        "ddpm": {"variance_type": config.variance_type},
    }.get(sampler, {})
    if sampler not in SIGMA_SAMPLERS:
        own |= {"clip_sample": config.clip_sample, "clip_sample_range": config.clip_sample_range}
    return SAMPLERS[sampler](
        model_fn, schedule, x_T, num_steps, sigmas=sigmas, **config.spacing, **own, **kwargs
    )
