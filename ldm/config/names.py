"""The names a user may type for a setting, each written here once and imported everywhere
else: CLI choices, config checks, error messages and the samplers' tables all read them."""

from __future__ import annotations

from typing import Literal, get_args

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
VarianceType = Literal["fixed_small", "fixed_large"]
SamplerName = Literal[
    "ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"
]
SigmaScheduleName = Literal["default", "karras", "exponential"]
OutputType = Literal["pil", "np", "pt", "latent"]

BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
SIGMA_SCHEDULES: tuple[str, ...] = get_args(SigmaScheduleName)
# DDIM and DDPM step between training timesteps; the others work in sigma space
SIGMA_SAMPLERS: tuple[str, ...] = SAMPLER_NAMES[2:]
MULTISTEP_SAMPLERS: tuple[str, ...] = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")
OUTPUT_TYPES: tuple[str, ...] = get_args(OutputType)

# The names A1111's web UI shows and writes ("Sampler: DPM++ 2M, Schedule type: Karras"); its
# older versions wrote the schedule into the sampler's name ("DPM++ 2M Karras").
A1111_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "unipc": "UniPC",
}
A1111_SCHEDULES: dict[str, str] = {
    "default": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
}


def a1111_name(sampler: str, sigmas: str | None) -> tuple[str, str | None]:
    """(``Sampler``, ``Schedule type``) as A1111 writes them; DDIM and DDPM have no schedule."""
    schedule = A1111_SCHEDULES.get(sigmas, sigmas) if sigmas and sampler in SIGMA_SAMPLERS else None
    return A1111_SAMPLERS.get(sampler, sampler), schedule


def split_schedule_suffix(name: str) -> tuple[str, str | None]:
    """A1111's older names carry the schedule ("DPM++ 2M Karras"): (the name without it, the
    schedule), or (name, None) without one. Case-insensitive."""
    for schedule, label in A1111_SCHEDULES.items():
        if schedule != "default" and name.lower().endswith(" " + label.lower()):
            return name[: -len(label) - 1], schedule
    return name, None
