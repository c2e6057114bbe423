"""Tiny, seeded Stable Diffusion stand-ins for tests and benchmarks, built offline.

The components are the real classes (diffusers' `UNet2DConditionModel` and `AutoencoderKL`,
transformers' `CLIPTextModel` with the real CLIP tokenizer) at a few thousand parameters each,
as diffusers' own pipeline tests build them, so that a whole pipeline runs on a CPU in
seconds. This module imports diffusers and transformers; the library proper does not need it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.config import SchedulerConfig, UNetConfig
from ldm.text_encoder import build_clip_tokenizer


def tiny_stable_diffusion(seed: int = 0, *, perturb: float = 0.0):
    """A diffusers `StableDiffusionPipeline` of tiny random components: 32x32 images,
    4x16x16 latents, a 2-layer CLIP text model of width 32, and SD 1.5's DDIM scheduler.
    ``perturb`` adds that much Gaussian noise to every weight (so no zero-initialised layer
    hides a bug)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet_config = {
        k: v for k, v in UNetConfig.preset("tiny-sd1").to_dict().items() if not k.startswith("_")
    }
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=32,
    )
    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
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


def save_tiny_stable_diffusion(path: str | Path, seed: int = 0, *, perturb: float = 0.0) -> Path:
    """Write `tiny_stable_diffusion` as a diffusers folder; returns the path."""
    path = Path(path)
    tiny_stable_diffusion(seed, perturb=perturb).save_pretrained(path)
    return path
