"""Layers shared by the networks, where we compute something faster than the stock module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv2d(nn.Conv2d):
    """A convolution that, on the CPU, computes large-weight convolutions of small feature maps
    as one matrix product over unfolded patches (im2col).

    oneDNN runs a 1280-channel 3x3 convolution of a 4x4 map at about 30 GFLOP/s on two cores,
    and the same maths as one GEMM at about 90 (python -m benchmarks.run conv). The switch is
    made where that was measured to pay: C_in * C_out >= 1280^2 and N = B * h_out * w_out <= 128.
    Elsewhere, and on other devices, it is the plain convolution. Results agree to float rounding.
    """

    GEMM_MIN_WEIGHT = 1280 * 1280
    GEMM_MAX_COLUMNS = 128

    def forward(self, x: Tensor) -> Tensor:
        B, _, h, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        h_out, w_out = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        use_gemm = (
            x.device.type == "cpu"
            and self.groups == 1
            and self.dilation == (1, 1)
            and self.in_channels * self.out_channels >= self.GEMM_MIN_WEIGHT
            and B * h_out * w_out <= self.GEMM_MAX_COLUMNS
        )
        if not use_gemm:
            return super().forward(x)
        cols = F.unfold(
            x, self.kernel_size, padding=self.padding, stride=self.stride
        )  # (B, C_in k k, L)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], B * h_out * w_out)  # (C_in k k, B L)
        out = torch.addmm(
            self.bias[:, None], self.weight.view(self.out_channels, -1), cols
        )  # (C_out, B L)
        return out.view(self.out_channels, B, h_out, w_out).transpose(
            0, 1
        )  # (B, C_out, h_out, w_out)
