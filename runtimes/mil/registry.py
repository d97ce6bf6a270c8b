"""The one table of MIL op kernels: `register("op")` adds a numpy kernel; the executor looks ops up in `OPS`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Kernel = Callable[..., Any]
OPS: dict[str, Kernel] = {}


def register(*names: str) -> Callable[[Kernel], Kernel]:
    """Register a kernel under one or more MIL op names."""

    def deco(fn: Kernel) -> Kernel:
        for name in names:
            OPS[name] = fn
        return fn

    return deco
