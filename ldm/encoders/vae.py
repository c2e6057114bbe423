"""FrozenVAE: images <-> latents with a frozen diffusers ``AutoencoderKL``.

Rombach et al. 2022, section 3.1: the diffusion model works on latents z = E(x), and images are
recovered as x = D(z). Latents are shifted and scaled so that they have roughly unit variance:

    z = (mean or sample of the posterior q(z | x) - shift_factor) * scaling_factor
    x = D(z / scaling_factor + shift_factor)

This module is the only place that knows ``scaling_factor`` and ``shift_factor``: both are read
from the VAE's config (SD 1.x/2.x: 0.18215 and none; SDXL: 0.13025), never written as literals.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LOW_PRECISION = (torch.float16, torch.bfloat16)


class FrozenVAE(nn.Module):
    """Images <-> latents with a frozen diffusers AutoencoderKL (``.eval().requires_grad_(False)``).

    Images are (B, 3, H, W) in [-1, 1]; latents are (B, C, H/f, W/f), already scaled, with f the
    ``downscale_factor``. The VAE stays in eval mode even when a parent module calls ``.train()``.
    Wrapping turns off diffusers' slicing and tiling flags: ``decode``'s arguments control both.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"FrozenVAE wraps a diffusers AutoencoderKL, got {type(vae).__name__}")
        self.vae = vae.eval().requires_grad_(False)
        vae.disable_slicing()  # decode's batch_size and tiled arguments decide, not hidden flags
        vae.disable_tiling()
        if vae.config.get("latents_mean") is not None or vae.config.get("latents_std") is not None:
            logger.warning("the VAE config's latents_mean/latents_std are ignored by FrozenVAE")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FrozenVAE:
        """Load a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors) or a
        pipeline folder that contains ``vae/``. Only safetensors weights are read."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no VAE folder at {path}")
        folder = path / "vae" if (path / "vae" / CONFIG_NAME).is_file() else path
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {path} or {path / 'vae'}: expected a diffusers VAE folder "
                "or a pipeline folder that contains vae/"
            )
        return cls(AutoencoderKL.from_pretrained(folder, use_safetensors=True))

    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers VAE folder: config.json + diffusion_pytorch_model.safetensors."""
        self.vae.save_pretrained(Path(path), safe_serialization=True)

    def train(self, mode: bool = True) -> FrozenVAE:
        """The VAE is frozen: stay in eval mode whatever ``mode`` asks for."""
        return super().train(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.get("shift_factor") or 0.0)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def force_upcast(self) -> bool:
        """Whether to run the VAE in float32 when its weights are float16/bfloat16 (SD's VAE
        overflows in float16 and gives NaN, i.e. black, images)."""
        return bool(self.vae.config.get("force_upcast", True))

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @contextlib.contextmanager
    def _compute_dtype(self) -> Iterator[torch.dtype]:
        """Yield the dtype to compute in. With low-precision weights and ``force_upcast``, the VAE
        is cast to float32 for the duration (exact: float16/bfloat16 -> float32 -> back is lossless)
        and cast back afterwards, as diffusers' pipelines do."""
        dtype = self.dtype
        if dtype not in LOW_PRECISION or not self.force_upcast:
            yield dtype
            return
        # nn.Module.to, not ModelMixin.to: diffusers' override logs a warning on every dtype cast.
        nn.Module.to(self.vae, torch.float32)
        try:
            yield torch.float32
        finally:
            nn.Module.to(self.vae, dtype)

    def _posterior(self, images: Tensor, dtype: torch.dtype) -> DiagonalGaussianDistribution:
        """The diffusers posterior q(z | x) for images (B, 3, H, W), unscaled."""
        if images.ndim != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(
                f"images must be (B, {self.vae.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        f = self.downscale_factor
        height, width = images.shape[-2:]
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the VAE downscale factor {f}: "
                f"resize or crop to e.g. {height // f * f or f}x{width // f * f or f}"
            )
        images = images.to(device=self.device, dtype=dtype)
        return self.vae.encode(images).latent_dist  # mean, std: (B, C, H/f, W/f)

    @torch.no_grad()
    def encode(
        self, images: Tensor, *, generator: torch.Generator | None = None, sample: bool = False
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f).

        Latents are (posterior mean - shift_factor) * scaling_factor, or with ``sample=True`` a
        draw mean + std * noise, the noise from ``generator``. H and W must be multiples of
        ``downscale_factor``. The result is float32 when the VAE was upcast (see ``force_upcast``).
        """
        with self._compute_dtype() as dtype:
            posterior = self._posterior(images, dtype)
            z = posterior.sample(generator=generator) if sample else posterior.mean
        return (z - self.shift_factor) * self.scaling_factor  # (B, C, h, w)

    @torch.no_grad()
    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (mean, std) of the posterior, each (B, C, H/f, W/f),
        scaled like ``encode``: ((mean - shift_factor) * scaling_factor, std * scaling_factor).
        A cached pair gives latents as mean + std * noise, noise ~ N(0, I)."""
        with self._compute_dtype() as dtype:
            posterior = self._posterior(images, dtype)
        mean = (posterior.mean - self.shift_factor) * self.scaling_factor  # (B, C, h, w)
        return mean, posterior.std * self.scaling_factor

    @torch.no_grad()
    def decode(
        self, latents: Tensor, *, batch_size: int | None = None, tiled: bool = False
    ) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1], not clamped.

        ``batch_size``: decode at most this many latents at a time to bound memory (None: all at
        once). ``tiled``: decode overlapping tiles of ``vae.tile_latent_min_size`` latents (set
        from the config's ``sample_size``) and blend them, as diffusers' ``enable_tiling`` does,
        for images larger than one tile. Float16/bfloat16 VAEs with ``force_upcast`` decode in
        float32 and return float32.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        tile = self.vae.tile_latent_min_size
        use_tiles = tiled and max(latents.shape[-2:]) > tile  # as diffusers' AutoencoderKL._decode
        with self._compute_dtype() as dtype:
            z = latents.to(device=self.device, dtype=dtype)
            z = z / self.scaling_factor + self.shift_factor  # (B, C, h, w), unscaled
            chunks = z.split(batch_size or len(z))
            decode = self.vae.tiled_decode if use_tiles else self.vae.decode
            return torch.cat([decode(chunk).sample for chunk in chunks])  # (B, 3, h*f, w*f)
