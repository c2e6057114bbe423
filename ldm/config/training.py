"""The training configs: `TrainConfig` (the U-Net, `ldm train`) with its `DataConfig`,
`TrainSettings` and `ValidationSettings`; `VAETrainConfig` and `CLIPTrainConfig` (the frozen
parts, trained from scratch by `ldm train-vae` and `ldm train-clip`). YAML fills their fields
(`ldm.config.io`); an unknown key or a value of the wrong type is an error that names it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.config.adapters import LoraSettings, TextualInversionSettings
from ldm.config.generation import GENERATION
from ldm.config.io import build_config, check_positive, read_yaml
from ldm.config.model import DEFAULT_MODEL
from ldm.config.names import PREDICTION_TYPES


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


def expand_default_model(model: str | None) -> str | None:
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
                self.prediction_type in (None, *PREDICTION_TYPES),
                ", ".join(("null", *PREDICTION_TYPES)),
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
    num_inference_steps: int = GENERATION.num_inference_steps
    guidance_scale: float = GENERATION.guidance_scale


@dataclass
class TrainConfig:
    """A training run: what to train, on which data, how, and where to write it.

    ``model``: a pipeline folder to fine-tune (its U-Net trains; VAE and text encoder stay
    frozen), or ``default`` for the shipped default model (`expand_default_model`). Or ``unet`` (a
    preset name or a U-Net config.json) with ``vae`` and ``text_encoder`` folders, to train a
    fresh U-Net. With a ``lora`` section only LoRA adapters train; with ``textual_inversion``
    only a new token's embedding (either on a ``model``).
    """

    data: DataConfig
    model: str | None = None
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    output_dir: str = "runs/train"
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    validation: ValidationSettings = dataclasses.field(default_factory=ValidationSettings)
    lora: LoraSettings | None = None
    textual_inversion: TextualInversionSettings | None = None

    def __post_init__(self) -> None:
        self.model = expand_default_model(self.model)
        self._check_adapters()
        if self.model is None and (
            self.unet is None or self.vae is None or self.text_encoder is None
        ):
            raise ValueError(
                "say what to train: model: a pipeline folder to fine-tune, or unet (a preset or "
                "config.json) together with vae and text_encoder folders"
            )

    def _check_adapters(self) -> None:
        """A ``lora`` or ``textual_inversion`` run trains its adapter only, on a ``model``."""
        t, what = self.train, ("lora" if self.lora else "textual_inversion")
        if self.lora is None and self.textual_inversion is None:
            return
        problems = [
            (self.lora is not None and self.textual_inversion is not None, "use one of them"),
            (self.model is None, "set model: to the pipeline folder to adapt (or default)"),
            (t.train_vae_decoder, "it trains no VAE decoder; set train.train_vae_decoder: false"),
            (
                t.train_text_encoder,
                "set train.train_text_encoder: false"
                + ("; lora.text_encoder: true adapts it" if self.lora else ""),
            ),
            (
                t.cache_latents and (self.textual_inversion or self.lora.text_encoder),
                "the text encoder's embeddings change every step; set train.cache_latents: false",
            ),
        ]
        for bad, fix in problems:
            if bad:
                raise ValueError(f"a {what} run: {fix}")

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
_NESTED = {
    "data": DataConfig,
    "train": TrainSettings,
    "validation": ValidationSettings,
    "lora": LoraSettings,
    "textual_inversion": TextualInversionSettings,
}


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
