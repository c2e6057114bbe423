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
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.config import UNetConfig
from ldm.files import follow_umask
from ldm.nn.attention import SpatialTransformer
from ldm.nn.blocks import (
    Downsample,
    MidBlock,
    ResnetBlock,
    TimestepEmbedding,
    UNetLevel,
    Upsample,
    timestep_embedding,
)
from ldm.nn.layers import Conv2d

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


class UNet(nn.Module):
    """The conditional U-Net of latent diffusion, configured by a `UNetConfig`.

    forward(x_t (B, C_in, h, w), t (B,) int64 or a scalar, context (B, L, D)) -> (B, C_out, h, w).
    Any h and w work: where a level would halve an odd size, the way up matches the skip
    connection's size, as diffusers does.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        c0 = cfg.block_out_channels[0]
        temb_dim = c0 * 4
        self.conv_in = Conv2d(
            cfg.in_channels, c0, cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2
        )
        self.time_embedding = TimestepEmbedding(c0, temb_dim)
        self.down_blocks = nn.ModuleList(self._down_levels(temb_dim))
        self.mid_block = self._mid_block(temb_dim)
        self.up_blocks = nn.ModuleList(self._up_levels(temb_dim))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_out = Conv2d(
            c0, cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2
        )

    def _resnet(self, c_in: int, c_out: int, temb_dim: int, **kwargs) -> ResnetBlock:
        cfg = self.config
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
        return ResnetBlock(c_in, c_out, temb_dim, **norm, **kwargs)

    def _transformer(self, c: int, level: int) -> SpatialTransformer:
        cfg = self.config
        return SpatialTransformer(
            c,
            cfg.heads()[level],
            cfg.per_level("cross_attention_dim")[level],
            depth=cfg.per_level("transformer_layers_per_block")[level],
            groups=cfg.norm_num_groups,
            linear_projection=cfg.use_linear_projection,
            dropout=cfg.dropout,
            upcast=cfg.upcast_attention,
        )

    def _down_levels(self, temb_dim: int) -> list[UNetLevel]:
        cfg, channels = self.config, self.config.block_out_channels
        layers, levels = cfg.per_level("layers_per_block"), len(channels)
        out, c_out = [], channels[0]
        for level, block_type in enumerate(cfg.down_block_types):
            c_in, c_out = c_out, channels[level]
            resnets = [
                self._resnet(c_in if j == 0 else c_out, c_out, temb_dim)
                for j in range(layers[level])
            ]
            attentions = (
                [self._transformer(c_out, level) for _ in range(layers[level])]
                if block_type == "CrossAttnDownBlock2D"
                else None
            )
            down = Downsample(c_out, cfg.downsample_padding) if level < levels - 1 else None
            out.append(UNetLevel(resnets, attentions, down, up=False))
        return out

    def _mid_block(self, temb_dim: int) -> MidBlock:
        cfg, c = self.config, self.config.block_out_channels[-1]
        resnets = [
            self._resnet(c, c, temb_dim, output_scale=cfg.mid_block_scale_factor) for _ in range(2)
        ]
        return MidBlock(resnets, self._transformer(c, len(cfg.block_out_channels) - 1))

    def _up_levels(self, temb_dim: int) -> list[UNetLevel]:
        cfg = self.config
        rev_channels = cfg.block_out_channels[::-1]
        rev_layers, levels = cfg.per_level("layers_per_block")[::-1], len(rev_channels)
        out, c_out = [], rev_channels[0]
        for i, block_type in enumerate(cfg.up_block_types):
            level = levels - 1 - i  # the down level whose skips this up level consumes
            c_prev, c_out = c_out, rev_channels[i]
            c_skip_last = rev_channels[min(i + 1, levels - 1)]  # the skip from the level below
            n = rev_layers[i] + 1
            resnets = [
                self._resnet(
                    (c_prev if j == 0 else c_out) + (c_skip_last if j == n - 1 else c_out),
                    c_out,
                    temb_dim,
                )
                for j in range(n)
            ]
            attentions = (
                [self._transformer(c_out, level) for _ in range(n)]
                if block_type == "CrossAttnUpBlock2D"
                else None
            )
            up = Upsample(c_out) if i < levels - 1 else None
            out.append(UNetLevel(resnets, attentions, up, up=True))
        return out

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
