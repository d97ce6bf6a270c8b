"""Small modules several architecture files share (same parameter names as transformers')."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 and cast back, with a weight: transformers' Mamba/H1 RMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
