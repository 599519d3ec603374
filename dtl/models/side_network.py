"""The Compact Side Network (CSN) of DTL: low-rank maps on block inputs, a sharp Swish, and DTL+'s DWConv.

Math (docs/design.md): for every block i in the extract set, W_i = A_i C_i with rank r. The side state
h_i = sum_{j <= i} x_j W_j accumulates from block INPUTS; from the start block M on, the block output gets
g(theta(h_i)) added, with theta(u) = u * sigmoid(beta * u) and g the identity (DTL) or one depthwise
convolution over the token grid shared by all add-back blocks of a stage (DTL+).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..methods.dtl.defaults import PAPER_BETA


class LowRankMap(nn.Module):
    """x -> x A C with A (d_in x r) Kaiming-uniform and C (r x d) zero, so a fresh map contributes exactly 0
    (``out_dim`` d defaults to d_in; they differ only where a block changes the width, e.g. ResNet's)."""

    def __init__(self, dim: int, rank: int, out_dim: int | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim if out_dim is None else out_dim, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class SharpSwish(nn.Module):
    """theta(u) = u * sigmoid(beta * u); the paper's large beta makes it a smooth, near-ReLU gate."""

    def __init__(self, beta: float = PAPER_BETA):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class DepthwiseGridConv(nn.Module):
    """DTL+'s g: one depthwise k x k convolution over a (B, C, H, W) token grid, 'same' padding, no bias.

    The paper calls it a global depthwise separable convolution; the authors' code uses only the depthwise
    part, and so do we (C * k * k parameters).
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim, bias=False)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(grid)
