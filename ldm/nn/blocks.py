"""The U-Net's building blocks: the sinusoidal timestep embedding and its MLP, ResNet blocks,
down- and upsampling, one level of the U-Net (ResNets, optional transformers, a resampler)
and the mid block. Pure modules over tensors; names equal diffusers' so weights load as
they are."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import SpatialTransformer
from ldm.nn.layers import Conv2d


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, section 3.5): (B,) -> (B, dim).

    Frequencies max_period^(-i / (dim/2 - freq_shift)), i < dim/2; [sin, cos] or, with
    ``flip_sin_to_cos`` (SD), [cos, sin]. Computed in float32.
    """
    half = dim // 2
    exponent = (
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - freq_shift)
    )
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, dim/2)
    emb = torch.cat(
        [angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1
    )
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear, SiLU, linear."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the projected time embedding; GroupNorm, SiLU, dropout,
    conv; plus the (1x1-projected) input, divided by ``output_scale``."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        temb_dim: int,
        *,
        groups: int,
        eps: float,
        dropout: float,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_scale = output_scale
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, h, w)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    """A 3x3 convolution with stride 2: (B, C, h, w) -> (B, C, ceil(h/2), ceil(w/2))."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (default 2x), then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class UNetLevel(nn.Module):
    """One level of the U-Net: ResNet blocks, each followed by a spatial transformer when the
    level has attention, then an optional down- or upsampler.

    Going down, it returns each block's output as a skip connection. Going up, each block first
    concatenates the most recent skip connection to its input.
    """

    def __init__(
        self,
        resnets: list[ResnetBlock],
        attentions: list[SpatialTransformer] | None,
        sampler: nn.Module | None,
        *,
        up: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        samplers = nn.ModuleList([sampler]) if sampler is not None else None
        self.downsamplers = None if up else samplers  # diffusers' names, hence the lists
        self.upsamplers = samplers if up else None
        self.gradient_checkpointing = False

    def _block(self, i: int, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[i](x, temb)
        return x if self.attentions is None else self.attentions[i](x, context)

    def _run_block(self, i: int, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(self._block, i, x, temb, context, use_reentrant=False)
        return self._block(i, x, temb, context)

    def forward_down(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self._run_block(i, x, temb, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def forward_up(
        self,
        x: Tensor,
        temb: Tensor,
        context: Tensor,
        skips: list[Tensor],
        size: tuple[int, int] | None,
    ) -> Tensor:
        for i in range(len(self.resnets)):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            x = self._run_block(i, x, temb, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """ResNet, spatial transformer, ResNet at the lowest resolution."""

    def __init__(self, resnets: list[ResnetBlock], attention: SpatialTransformer) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)
