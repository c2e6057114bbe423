"""The models' configs: `UNetConfig` (diffusers' `UNet2DConditionModel` keys, so a Stable
Diffusion `unet/config.json` loads as it is, and ours is read by diffusers), its presets, and
`SchedulerConfig` (a diffusers `scheduler_config.json`, the home of Stable Diffusion's betas).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.config.names import VARIANCE_TYPES

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_FILES = PACKAGE_DIR / "configs"  # the configs the package reads (package data)
# The shipped default model (`ldm.training.default_model`): what `ldm generate` and
# `LatentDiffusionPipeline.from_pretrained()` use when no model is named.
DEFAULT_MODEL = PACKAGE_DIR / "models" / "shapes"

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel keys we do not implement, with the value that means "off".
# A config that sets one of them to anything else is refused with an error naming it.
UNSUPPORTED_UNET_KEYS: dict[str, Any] = {
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


@dataclass
class UNetConfig:
    """The conditional U-Net's architecture, in diffusers' `UNet2DConditionModel` terms.

    ``attention_head_dim`` keeps diffusers' quirk: when ``num_attention_heads`` is None (as in
    every Stable Diffusion config) it is the number of heads, not their width. SD 2's
    ``[5, 10, 20, 20]`` means 5 heads of 64 channels at 320 channels, and so on.
    Per-level fields take one value for all levels or a list with one value per level.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = None
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({levels}) must have the same length"
            )
        for name, allowed in (
            ("down_block_types", DOWN_BLOCK_TYPES),
            ("up_block_types", UP_BLOCK_TYPES),
        ):
            for value in getattr(self, name):
                if value not in allowed:
                    raise ValueError(
                        f"{name} entry {value!r} is not supported; allowed: {', '.join(allowed)}"
                    )
        for name in (
            "layers_per_block",
            "transformer_layers_per_block",
            "cross_attention_dim",
            "attention_head_dim",
            "num_attention_heads",
        ):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(value) != levels:
                    raise ValueError(
                        f"{name} has {len(value)} entries; it needs one, or one per level ({levels})"
                    )
                setattr(self, name, tuple(value))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels entry {c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        heads = self.heads()
        for level, (c, h) in enumerate(zip(self.block_out_channels, heads, strict=True)):
            if c % h:
                raise ValueError(
                    f"level {level}: {c} channels cannot be split into {h} attention heads"
                )

    def per_level(self, name: str) -> tuple:
        """A per-level field as a tuple with one entry per level."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers: ``num_attention_heads or attention_head_dim``)."""
        return self.per_level(
            "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Build from a diffusers config.json dict. Keys starting with ``_`` are metadata;
        an unsupported feature switched on, or a key diffusers does not have, is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, errors = {}, []
        for key, value in data.items():
            if key.startswith("_"):
                continue
            if key in known:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in UNSUPPORTED_UNET_KEYS:
                if value != UNSUPPORTED_UNET_KEYS[key]:
                    errors.append(
                        f"{key}={value!r} (only {UNSUPPORTED_UNET_KEYS[key]!r} is supported)"
                    )
            else:
                errors.append(f"unknown key {key!r}")
        if errors:
            raise ValueError("unsupported U-Net config: " + "; ".join(errors))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config.json dict (lists for tuples, the class name for diffusers)."""
        data = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_json(cls, path: str | Path) -> UNetConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no U-Net config at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def preset(cls, name: str) -> UNetConfig:
        """A shipped configuration: ``sd15``, ``sd21`` (768-v), ``sd21-base``, or the tiny
        test configs ``tiny-sd1`` and ``tiny-sd2``."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; allowed: {', '.join(UNET_PRESETS)}")
        return cls.from_json(CONFIG_FILES / "unet" / f"{name}.json")


UNET_PRESETS = ("sd15", "sd21", "sd21-base", "tiny-sd1", "tiny-sd2")


# Scheduler keys that change the maths, with the only values we implement.
UNSUPPORTED_SCHEDULER_VALUES: dict[str, Any] = {"trained_betas": None, "thresholding": False}


@dataclass
class SchedulerConfig:
    """A diffusers ``scheduler/scheduler_config.json``: the noise schedule and how to sample.

    The defaults are Stable Diffusion 1.5's. Keys of other scheduler classes (PNDM's
    ``skip_prk_steps``, Euler's ``use_karras_sigmas``...) describe their own samplers and are
    ignored; settings that would change the schedule's maths and that we do not implement
    (``trained_betas``, ``thresholding``) are refused.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerConfig:
        for key, allowed in UNSUPPORTED_SCHEDULER_VALUES.items():
            if data.get(key, allowed) not in (allowed, None):
                raise ValueError(
                    f"scheduler config sets {key}={data[key]!r}; only {allowed!r} is supported"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        if kwargs.get("variance_type", VARIANCE_TYPES[0]) not in VARIANCE_TYPES:
            kwargs.pop("variance_type")  # learned variances belong to other models: beta-tilde
        return cls(**kwargs)

    @property
    def spacing(self) -> dict[str, Any]:
        """How sampling timesteps are chosen: keyword arguments of `ldm.diffusion.schedule.make_timesteps`
        and of everything that calls it."""
        return {"timestep_spacing": self.timestep_spacing, "steps_offset": self.steps_offset}

    def to_dict(self) -> dict[str, Any]:
        """diffusers' DDIMScheduler config, which diffusers' pipelines load."""
        return {"_class_name": "DDIMScheduler", **dataclasses.asdict(self)}
