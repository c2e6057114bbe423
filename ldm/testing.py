"""Small, seeded Stable Diffusion stand-ins for tests and benchmarks, built offline.

The components are the real classes (diffusers' `UNet2DConditionModel` and `AutoencoderKL`,
transformers' `CLIPTextModel` with the real CLIP tokenizer) at a few thousand to a few million
parameters, as diffusers' own pipeline tests build them, so that a whole pipeline runs on a
CPU in seconds. This module imports diffusers and transformers; the library proper does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ldm.config import SchedulerConfig, UNetConfig
from ldm.encoders.tokenizer import build_clip_tokenizer

# "tiny" for tests. "small" has the sizes NOTES.md measured for a default-model-sized model:
# U-Net channels (32, 64, 128), 4.6M parameters; VAE (16, 32, 64, 64), 1M; 64 px -> 8x8 latents.
SIZES = {
    "tiny": dict(vae=(32, 64), vae_groups=32, image=32, text_width=32, text_layers=2),
    "small": dict(vae=(16, 32, 64, 64), vae_groups=16, image=64, text_width=64, text_layers=4),
}


def _unet_config(size: str) -> UNetConfig:
    if size == "tiny":
        return UNetConfig.preset("tiny-sd1")
    return UNetConfig(
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=SIZES["small"]["text_width"],
        sample_size=8,
    )


def tiny_stable_diffusion(seed: int = 0, *, perturb: float = 0.0, size: str = "tiny"):
    """A diffusers `StableDiffusionPipeline` of small random components and SD 1.5's DDIM
    scheduler. ``size="tiny"``: 32x32 images, 4x16x16 latents, a 2-layer CLIP text model of
    width 32. ``size="small"``: 64x64 images, 4x8x8 latents, a 4-layer CLIP of width 64.
    ``perturb`` adds that much Gaussian noise to every weight (so no zero-initialised layer
    hides a bug)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; allowed: {', '.join(SIZES)}")
    spec = SIZES[size]
    torch.manual_seed(seed)
    unet_kwargs = {k: v for k, v in _unet_config(size).to_dict().items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**unet_kwargs)
    levels = len(spec["vae"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec["vae"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=spec["vae_groups"],
        sample_size=spec["image"],
    )
    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["text_width"],
        intermediate_size=spec["text_width"] + 5,
        num_attention_heads=4,
        num_hidden_layers=spec["text_layers"],
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    if perturb:
        with torch.no_grad():
            for model in (unet, vae, text_encoder):
                for p in model.parameters():
                    p.add_(perturb * torch.randn_like(p))
    scheduler = DDIMScheduler.from_config(SchedulerConfig().to_dict())
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_stable_diffusion(
    path: str | Path, seed: int = 0, *, perturb: float = 0.0, size: str = "tiny"
) -> Path:
    """Write `tiny_stable_diffusion` as a diffusers folder; returns the path."""
    path = Path(path)
    tiny_stable_diffusion(seed, perturb=perturb, size=size).save_pretrained(path)
    return path


# `ldm.training.recipe`'s configs at a size that runs every stage in seconds (paths are set by the recipe).
TINY_RECIPE = {
    "vae.yaml": {
        "data": "unused",
        "block_out_channels": [8, 8, 8],
        "norm_num_groups": 4,
        "max_steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
        "checkpoint_every": 2,
    },
    "clip.yaml": {
        "data": "unused",
        "embed_dim": 16,
        "text_width": 32,
        "text_layers": 2,
        "text_heads": 2,
        "vision_width": 32,
        "vision_layers": 1,
        "max_steps": 3,
        "batch_size": 8,
        "warmup_steps": 1,
        "checkpoint_every": 2,
    },
    "unet.yaml": {
        "unet": "unused",
        "vae": "unused",
        "text_encoder": "unused",
        "data": {"path": "unused", "resolution": 64},
        "train": {"max_steps": 3, "batch_size": 4, "checkpoint_every": 2, "cache_latents": True},
    },
    "unet.json": {
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "sample_size": 16,
    },
}


def write_recipe_configs(folder: str | Path, configs: dict = TINY_RECIPE) -> Path:
    """Write a recipe config folder (vae.yaml, clip.yaml, unet.yaml, unet.json) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in configs.items():
        text = json.dumps(content) if name.endswith(".json") else yaml.safe_dump(content)
        (folder / name).write_text(text)
    return folder
