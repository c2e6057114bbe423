"""Typed configuration: the models' configs (`model`), the training configs (`training`), the
generation defaults (`generation`), the names a setting may take (`names`), and YAML into
dataclasses (`io`). This package imports nothing else of ldm: every layer may read it."""

from ldm.config.adapters import LoraSettings, TextualInversionSettings
from ldm.config.generation import GENERATION, GenerationDefaults
from ldm.config.model import (
    CONFIG_FILES,
    DEFAULT_MODEL,
    DOWN_BLOCK_TYPES,
    PACKAGE_DIR,
    UNET_PRESETS,
    UNSUPPORTED_SCHEDULER_VALUES,
    UNSUPPORTED_UNET_KEYS,
    UP_BLOCK_TYPES,
    SchedulerConfig,
    UNetConfig,
)
from ldm.config.training import (
    LR_SCHEDULERS,
    MIXED_PRECISION,
    CLIPTrainConfig,
    DataConfig,
    TrainConfig,
    TrainSettings,
    VAETrainConfig,
    ValidationSettings,
    expand_default_model,
)

__all__ = [
    "CONFIG_FILES",
    "DEFAULT_MODEL",
    "DOWN_BLOCK_TYPES",
    "GENERATION",
    "LR_SCHEDULERS",
    "MIXED_PRECISION",
    "PACKAGE_DIR",
    "UNET_PRESETS",
    "UNSUPPORTED_SCHEDULER_VALUES",
    "UNSUPPORTED_UNET_KEYS",
    "UP_BLOCK_TYPES",
    "CLIPTrainConfig",
    "DataConfig",
    "GenerationDefaults",
    "LoraSettings",
    "SchedulerConfig",
    "TextualInversionSettings",
    "TrainConfig",
    "TrainSettings",
    "UNetConfig",
    "VAETrainConfig",
    "ValidationSettings",
    "expand_default_model",
]
