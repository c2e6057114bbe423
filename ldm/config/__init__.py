"""Typed configuration dataclasses.

`UNetConfig` uses the keys and meanings of diffusers' `UNet2DConditionModel` config.json, so a
Stable Diffusion `unet/config.json` loads as it is, and ours is read by diffusers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ldm.config.io import build_config, check_positive, read_yaml

# The shipped default model (`ldm.training.default_model`): what `ldm generate` and
# `LatentDiffusionPipeline.from_pretrained()` use when no model is named.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_FILES = PACKAGE_DIR / "configs"  # the configs the package reads (package data)
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
        text = resources.files("ldm").joinpath("configs", "unet", f"{name}.json").read_text()
        return cls.from_dict(json.loads(text))


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
        if "variance_type" in kwargs and kwargs["variance_type"] not in (
            "fixed_small",
            "fixed_large",
        ):
            kwargs.pop(
                "variance_type"
            )  # learned variances belong to other models; DDPM uses beta-tilde
        return cls(**kwargs)

    @property
    def spacing(self) -> dict[str, Any]:
        """How sampling timesteps are chosen: keyword arguments of `ldm.diffusion.samplers.make_timesteps`
        and of everything that calls it."""
        return {"timestep_spacing": self.timestep_spacing, "steps_offset": self.steps_offset}

    def to_dict(self) -> dict[str, Any]:
        """diffusers' DDIMScheduler config, which diffusers' pipelines load."""
        return {"_class_name": "DDIMScheduler", **dataclasses.asdict(self)}


@dataclass
class DataConfig:
    """Where the data is and how images become training tensors.

    ``path``: a folder, manifest file or Hub name (see the module docstring). ``caption_column``
    and ``image_column`` name the columns (``image_column`` only for ``datasets`` sources).
    Images are resized so that the shorter side is ``resolution`` pixels, then cropped to a square,
    at the centre or at random, and optionally flipped left-right at random.
    """

    path: str
    caption_column: str = "text"
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    image_column: str = "image"

    def __post_init__(self) -> None:
        if type(self.resolution) is not int or self.resolution <= 0:  # bool is not allowed
            raise ValueError(f"resolution must be a positive int, got {self.resolution!r}")


LR_SCHEDULERS = ("constant", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")


def resolve_model(model: str | None) -> str | None:
    """A model argument as a folder: ``default`` names the shipped model (`DEFAULT_MODEL`);
    anything else is returned as it is."""
    return str(DEFAULT_MODEL) if model == "default" else model


@dataclass
class TrainSettings:
    """``train.*``: the optimisation. ``max_steps`` counts optimizer updates."""

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    mixed_precision: str = "no"
    ema_decay: float | None = 0.9999
    ema_power: float | None = None
    ema_inv_gamma: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    caption_dropout: float = 0.1
    prediction_type: str | None = None
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    cache_latents: bool = False
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    gradient_checkpointing: bool = False
    train_vae_decoder: bool = False
    vae_learning_rate: float | None = None
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None

    def __post_init__(self) -> None:
        checks = [
            ("lr_scheduler", self.lr_scheduler in LR_SCHEDULERS, ", ".join(LR_SCHEDULERS)),
            (
                "mixed_precision",
                self.mixed_precision in MIXED_PRECISION,
                ", ".join(MIXED_PRECISION),
            ),
            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("grad_accum", self.grad_accum >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "a number > 0"),
            ("caption_dropout", 0 <= self.caption_dropout <= 1, "a number in [0, 1]"),
            (
                "ema_decay",
                self.ema_decay is None or 0 <= self.ema_decay < 1,
                "null or a number in [0, 1)",
            ),
            ("ema_power", self.ema_power is None or self.ema_power > 0, "null or a number > 0"),
            ("ema_inv_gamma", self.ema_inv_gamma > 0, "a number > 0"),
            (
                "vae_learning_rate",
                self.vae_learning_rate is None or self.vae_learning_rate > 0,
                "null (train.learning_rate) or a number > 0",
            ),
            (
                "text_encoder_learning_rate",
                self.text_encoder_learning_rate is None or self.text_encoder_learning_rate > 0,
                "null (train.learning_rate) or a number > 0",
            ),
            (
                "cache_latents",
                not (self.cache_latents and self.train_text_encoder),
                "false with train.train_text_encoder: true (a training encoder's embeddings "
                "change every step, so they cannot be cached)",
            ),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "an integer >= 1"),
            (
                "prediction_type",
                self.prediction_type in (None, "epsilon", "v_prediction"),
                "null, epsilon, v_prediction",
            ),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"train.{name}={getattr(self, name)!r} is not allowed; use {allowed}"
                )


@dataclass
class ValidationSettings:
    """``validation.*``: images from fixed prompts and seeds, saved as grids every ``every`` steps."""

    prompts: list[str] = dataclasses.field(default_factory=list)
    every: int = 500
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    num_inference_steps: int = 50
    guidance_scale: float = 7.5


@dataclass
class TrainConfig:
    """A training run: what to train, on which data, how, and where to write it.

    ``model``: a pipeline folder to fine-tune (its U-Net trains; VAE and text encoder stay
    frozen), or ``default`` for the shipped default model (`resolve_model`). Or ``unet`` (a
    preset name or a U-Net config.json) with ``vae`` and ``text_encoder`` folders, to train a
    fresh U-Net.
    """

    data: DataConfig
    model: str | None = None
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    output_dir: str = "runs/train"
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    validation: ValidationSettings = dataclasses.field(default_factory=ValidationSettings)

    def __post_init__(self) -> None:
        self.model = resolve_model(self.model)
        if self.model is None and (
            self.unet is None or self.vae is None or self.text_encoder is None
        ):
            raise ValueError(
                "say what to train: model: a pipeline folder to fine-tune, or unet (a preset or "
                "config.json) together with vae and text_encoder folders"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return build_config(cls, data, nested=_NESTED)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file and apply ``key.sub=value`` overrides (values are parsed as YAML)."""
        return cls.from_dict(read_yaml(path, overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# TrainConfig's sections, each a dataclass of its own.
_NESTED = {"data": DataConfig, "train": TrainSettings, "validation": ValidationSettings}


@dataclass
class VAETrainConfig:
    """Training the default model's VAE (diffusers' `AutoencoderKL`) from scratch on an image
    folder: loss = MSE(x_hat, x) + ``kl_weight`` * KL(q(z|x) || N(0, I)), both per element.
    ``data`` is an image folder with ``metadata.jsonl`` (``ldm make-shapes`` and
    ``ldm train-recipe`` write one); ``heldout`` one for the PSNR report.
    """

    data: str
    output_dir: str = "runs/default/vae"
    heldout: str | None = None
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    max_steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-5
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    keep_checkpoints: int = 2
    ema_decay: float | None = None
    ema_power: float | None = None
    ema_inv_gamma: float = 1.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        check_positive(self, "max_steps", "batch_size", "learning_rate", "checkpoint_every")
        self.settings()  # the loop's own checks (ema_decay, keep_checkpoints...)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> VAETrainConfig:
        return build_config(cls, read_yaml(path, overrides))

    def settings(self) -> TrainSettings:
        """The loop's settings (`ldm.training.loop.fit`): AdamW without weight decay."""
        return _loop_settings(self, weight_decay=0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CLIPTrainConfig:
    """Training the default model's text encoder: a small open_clip CLIP (a ViT image tower and a
    causal text transformer) trained contrastively on image-caption pairs, then frozen and
    converted to a transformers `CLIPTextModel`. The tokenizer is CLIP's BPE cut down to the
    merges that the dataset's captions need, plus CLIP's first ``vocab_reserve`` merges for words
    they never used (``context_length`` tokens at most)."""

    data: str
    output_dir: str = "runs/default/text_encoder"
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 32
    vision_width: int = 128
    vision_layers: int = 3
    patch_size: int = 8
    vocab_reserve: int = 1000
    max_steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    keep_checkpoints: int = 2
    ema_decay: float | None = None
    ema_power: float | None = None
    ema_inv_gamma: float = 1.0

    def __post_init__(self) -> None:
        check_positive(self, "max_steps", "batch_size", "learning_rate", "checkpoint_every")
        self.settings()  # the loop's own checks (ema_decay, keep_checkpoints...)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> CLIPTrainConfig:
        return build_config(cls, read_yaml(path, overrides))

    def settings(self) -> TrainSettings:
        """The loop's settings (`ldm.training.loop.fit`): AdamW with ``weight_decay``."""
        return _loop_settings(self, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loop_settings(config: VAETrainConfig | CLIPTrainConfig, weight_decay: float) -> TrainSettings:
    """A VAE or CLIP config as `TrainSettings`: warm-up then cosine decay, clipping at 1."""
    shared = ("max_steps", "batch_size", "learning_rate", "warmup_steps", "seed", "ema_decay")
    shared += ("ema_power", "ema_inv_gamma", "checkpoint_every", "keep_checkpoints")
    return TrainSettings(
        **{name: getattr(config, name) for name in shared},
        lr_scheduler="cosine",
        caption_dropout=0.0,
        weight_decay=weight_decay,
    )
