"""The training objective: noise the latents, predict eps (or v), weight by timestep.

Ho et al. 2020, Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,
loss = ||target - model(x_t, t, context)||^2, target eps (or v, Salimans & Ho 2022).

Options:
- min-SNR-gamma weighting (Hang et al. 2023, eq. 11): weight_t = min(SNR_t, gamma) / SNR_t for
  eps-prediction, min(SNR_t, gamma) / (SNR_t + 1) for v-prediction, so low-noise timesteps,
  whose loss is easy and large in SNR terms, do not dominate.
- offset noise (Guttenberg 2023): eps + offset * n, n ~ N(0, I) of shape (B, C, 1, 1), which lets
  a model change an image's mean colour (very dark or bright images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule

ConditionalModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class LossOutput:
    """The batch loss to backpropagate, and what to log: per-sample losses and timesteps."""

    loss: Tensor  # () weighted mean over the batch
    per_sample: Tensor  # (B,) unweighted mean squared error of each sample
    t: Tensor  # (B,) int64 timesteps


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Hang et al. 2023, eq. 11: min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v); shape of snr."""
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr.clamp(min=1e-12)
    return clipped / (snr + 1)


def diffusion_loss(
    model_fn: ConditionalModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    context: Tensor,
    *,
    generator: torch.Generator | None = None,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> LossOutput:
    """One training loss: x0 (B, C, h, w) latents, context (B, L, D); noise and timesteps are
    drawn with ``generator`` on x0's device. Returns a `LossOutput`."""
    B = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=device).to(
        x0.device
    )
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    if noise_offset:
        offset = torch.randn(
            (B, x0.shape[1], 1, 1), generator=generator, device=device, dtype=x0.dtype
        )
        eps = eps + noise_offset * offset.to(x0.device)
    x_t = schedule.add_noise(x0, eps, t)  # DDPM eq. (4)
    target = schedule.target(x0, eps, t)  # eps, or v
    pred = model_fn(x_t, t, context)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
    weight = torch.ones_like(per_sample)
    if min_snr_gamma is not None:
        weight = min_snr_weight(
            schedule.snr(t).to(per_sample.device), min_snr_gamma, schedule.prediction_type
        )
    return LossOutput((weight * per_sample).mean(), per_sample.detach(), t)


def loss_by_timestep_bucket(
    per_sample: Tensor, t: Tensor, num_train_timesteps: int, buckets: int = 10
) -> dict[str, float]:
    """Mean loss per timestep bucket ``"0-99"``, ``"100-199"``...: where the model struggles."""
    width = num_train_timesteps // buckets
    out = {}
    for b in range(buckets):
        mask = (t >= b * width) & (
            t < (b + 1) * width if b < buckets - 1 else t < num_train_timesteps
        )
        if mask.any():
            hi = (b + 1) * width - 1 if b < buckets - 1 else num_train_timesteps - 1
            out[f"{b * width}-{hi}"] = per_sample[mask].mean().item()
    return out


def decoder_loss(vae, latents: Tensor, pixels: Tensor) -> Tensor:
    """Fine-tuning a VAE's decoder, as SD's ft-MSE VAE was made: MSE between the decoded
    ``latents`` (B, C, h, w), scaled as `FrozenVAE.encode` gives them (posterior samples of the
    frozen encoder), and the images ``pixels`` (B, 3, H, W) in [-1, 1]. ``vae`` is a `FrozenVAE`;
    gradients reach its decoder (and post_quant_conv) only."""
    z = latents / vae.scaling_factor + vae.shift_factor  # unscaled, as the decoder reads them
    decoded = vae.vae.decode(z.to(vae.dtype)).sample.float()  # (B, 3, H, W)
    return torch.nn.functional.mse_loss(decoded, pixels.float())
