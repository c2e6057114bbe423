"""The conditional U-Net: ``forward(x_t, t, context) -> prediction`` (eps or v).

Rombach et al. 2022 (latent diffusion), appendix; the layout of Stable Diffusion 1.x/2.x:

    conv_in -> down levels [ResNet (+ SpatialTransformer)] x layers, downsample
            -> mid [ResNet, SpatialTransformer, ResNet]
            -> up levels [concat skip, ResNet (+ SpatialTransformer)] x (layers + 1), upsample
            -> GroupNorm, SiLU, conv_out

The timestep enters every ResNet through a sinusoidal embedding and an MLP; the text enters
through cross-attention. Parameter names equal diffusers' `UNet2DConditionModel`, so its
folders load as they are. The module imports no schedule, sampler, loss or text encoder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.config import UNetConfig
from ldm.files import follow_umask
from ldm.nn.attention import SpatialTransformer
from ldm.nn.layers import Conv2d

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


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


class UNet(nn.Module):
    """The conditional U-Net of latent diffusion, configured by a `UNetConfig`.

    forward(x_t (B, C_in, h, w), t (B,) int64 or a scalar, context (B, L, D)) -> (B, C_out, h, w).
    Any h and w work: where a level would halve an odd size, the way up matches the skip
    connection's size, as diffusers does.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        channels = cfg.block_out_channels
        temb_dim = channels[0] * 4
        heads, layers = cfg.heads(), cfg.per_level("layers_per_block")
        depth, context_dims = (
            cfg.per_level("transformer_layers_per_block"),
            cfg.per_level("cross_attention_dim"),
        )
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
        levels = len(channels)

        def transformer(c: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(
                c,
                heads[level],
                context_dims[level],
                depth=depth[level],
                groups=cfg.norm_num_groups,
                linear_projection=cfg.use_linear_projection,
                dropout=cfg.dropout,
                upcast=cfg.upcast_attention,
            )

        self.conv_in = Conv2d(
            cfg.in_channels, channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2
        )
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        c_out = channels[0]
        for level, block_type in enumerate(cfg.down_block_types):
            c_in, c_out = c_out, channels[level]
            has_attn = block_type == "CrossAttnDownBlock2D"
            resnets = [
                ResnetBlock(c_in if j == 0 else c_out, c_out, temb_dim, **norm)
                for j in range(layers[level])
            ]
            attentions = (
                [transformer(c_out, level) for _ in range(layers[level])] if has_attn else None
            )
            down = Downsample(c_out, cfg.downsample_padding) if level < levels - 1 else None
            self.down_blocks.append(UNetLevel(resnets, attentions, down, up=False))

        mid_resnets = [
            ResnetBlock(
                channels[-1],
                channels[-1],
                temb_dim,
                **norm,
                output_scale=cfg.mid_block_scale_factor,
            )
            for _ in range(2)
        ]
        self.mid_block = MidBlock(mid_resnets, transformer(channels[-1], levels - 1))

        self.up_blocks = nn.ModuleList()
        rev_channels, rev_layers = channels[::-1], layers[::-1]
        c_out = rev_channels[0]
        for i, block_type in enumerate(cfg.up_block_types):
            level = levels - 1 - i  # the down level whose skips this up level consumes
            c_prev, c_out = c_out, rev_channels[i]
            c_skip_last = rev_channels[min(i + 1, levels - 1)]  # the skip from the level below
            n = rev_layers[i] + 1
            resnets = [
                ResnetBlock(
                    (c_prev if j == 0 else c_out) + (c_skip_last if j == n - 1 else c_out),
                    c_out,
                    temb_dim,
                    **norm,
                )
                for j in range(n)
            ]
            attentions = (
                [transformer(c_out, level) for _ in range(n)]
                if block_type == "CrossAttnUpBlock2D"
                else None
            )
            up = Upsample(c_out) if i < levels - 1 else None
            self.up_blocks.append(UNetLevel(resnets, attentions, up, up=True))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(
            channels[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            padding=(cfg.conv_out_kernel - 1) // 2,
        )

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        cfg = self.config
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t  # (B,)
        t_emb = timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        temb = self.time_embedding(t_emb.to(x_t.dtype))  # (B, 4 C0)
        x = 2 * x_t - 1.0 if cfg.center_input_sample else x_t

        x = self.conv_in(x)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block.forward_down(x, temb, context)
            skips.extend(level_skips)
        x = self.mid_block(x, temb, context)  # (B, C_last, h / 2^(levels-1), w / 2^(levels-1))
        for block in self.up_blocks:
            taken = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            size = tuple(skips[-1].shape[-2:]) if skips else None  # the next level's size
            x = block.forward_up(x, temb, context, taken, size)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x  # (B, C_out, h, w)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet + transformer pair in the backward pass to save memory."""
        for block in [*self.down_blocks, *self.up_blocks]:
            block.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ diffusers format

    @classmethod
    def from_pretrained(cls, path: str | Path, *, allow_pickle: bool = False) -> UNet:
        """Load a diffusers ``unet/`` folder: config.json + diffusion_pytorch_model.safetensors.

        A folder with only a pickled ``diffusion_pytorch_model.bin`` is refused unless
        ``allow_pickle=True``; it is then read with ``torch.load(weights_only=True)``.
        """
        path = Path(path)
        if (path / "unet" / CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file():
            path = path / "unet"
        model = cls(UNetConfig.from_json(path / CONFIG_NAME))
        model.load_weights(load_folder_weights(path, allow_pickle=allow_pickle), source=str(path))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers ``unet/`` folder that `UNet2DConditionModel.from_pretrained` loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        follow_umask(path / WEIGHTS_NAME)  # safetensors writes 0600

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        """Load diffusers-named weights, failing with the lists of missing and unexpected keys."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong = sorted(
            k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape
        )
        if missing or unexpected or wrong:
            details = [
                f"{len(missing)} missing: {_list(missing)}" if missing else "",
                f"{len(unexpected)} unexpected: {_list(unexpected)}" if unexpected else "",
                f"{len(wrong)} of the wrong shape: "
                + _list(
                    [
                        f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
                        for k in wrong
                    ]
                )
                if wrong
                else "",
            ]
            raise ValueError(
                f"weights in {source} do not fit this U-Net config: "
                + "; ".join(d for d in details if d)
            )
        self.load_state_dict(state_dict)


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_folder_weights(folder: Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict of a diffusers model folder: the safetensors file, or with
    ``allow_pickle=True`` a pickled ``.bin`` read with ``weights_only=True``."""
    safetensors_file, bin_file = folder / WEIGHTS_NAME, folder / "diffusion_pytorch_model.bin"
    if safetensors_file.is_file():
        return load_file(str(safetensors_file))
    if bin_file.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only a pickled {bin_file.name}; pickles can run code when loaded. "
                "Pass allow_pickle=True to read it (with torch.load(weights_only=True)), then "
                "save_pretrained() writes safetensors."
            )
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or .bin) in {folder}")
