"""Small modules several architecture files share (same parameter names as transformers')."""
from __future__ import annotations

import inspect

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


# transformers 5.25 renamed the cache argument and output field of every model to `cache` (they were
# `past_key_values`, and `cache_params` for the Mamba models). The old argument names are still accepted, with a
# warning, until 5.40; the old output fields are gone. These two keep the reference runnable on both sides.
_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes its cache in this transformers version (a wrapper with no named
    cache argument, as optimum's models before 5.25, takes `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in _CACHE_NAMES if name in params), "past_key_values")


def output_cache(out):
    """The cache a transformers output carries, whatever this version calls the field."""
    return next((c for c in (getattr(out, name, None) for name in _CACHE_NAMES) if c is not None), None)
