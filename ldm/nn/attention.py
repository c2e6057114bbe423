"""Attention blocks of the conditional U-Net: self- and cross-attention, GEGLU feed-forward,
the transformer block, and the spatial transformer that runs it on feature maps.

Parameter names follow diffusers (``attn1.to_q``, ``ff.net.0.proj``, ``proj_in``...), which kept
CompVis's names inside the transformer, so weights move between the formats by renaming only
the blocks around it (``ldm.formats.single_file``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nn.layers import Conv2d


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    Self-attention when ``context`` is None, else cross-attention to ``context`` (B, L, D_ctx).
    ``upcast`` runs the attention itself in float32 (SD 2.1 in fp16 overflows otherwise).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, N, _ = x.shape
        context = x if context is None else context
        # (B, N, heads * d) -> (B, heads, N, d)
        q, k, v = (
            proj(inp).view(B, -1, self.heads, proj.out_features // self.heads).transpose(1, 2)
            for proj, inp in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, heads * d)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * gelu(b) for [a, b] = proj(x)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU, dropout, linear: dim -> 4 dim -> dim."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and feed-forward, each residual."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float, upcast: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map (diffusers' Transformer2DModel).

    GroupNorm, a 1x1 conv (or linear) projection in, ``depth`` transformer blocks over the
    h*w tokens, a projection out, plus the input. forward: (B, C, h, w), (B, L, D) -> (B, C, h, w).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        *,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        head_dim = channels // heads
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in, self.proj_out = (
                nn.Linear(channels, channels),
                nn.Linear(channels, channels),
            )
        else:
            self.proj_in, self.proj_out = (
                Conv2d(channels, channels, 1),
                Conv2d(channels, channels, 1),
            )
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, head_dim, context_dim, dropout, upcast)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(B, h * w, C)  # (B, L=h*w, C)
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        x = x.reshape(B, h, w, C).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
        if not self.linear_projection:
            x = self.proj_out(x)
        return x + residual
