"""The names a user may type for a setting, each written here once and imported everywhere
else: CLI choices, config checks, error messages and the samplers' tables all read them."""

from __future__ import annotations

from typing import Literal, get_args

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
VarianceType = Literal["fixed_small", "fixed_large"]
SamplerName = Literal["ddim", "ddpm"]
OutputType = Literal["pil", "np", "pt", "latent"]

BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
OUTPUT_TYPES: tuple[str, ...] = get_args(OutputType)
