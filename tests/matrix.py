"""The test matrix, in one place: every registered architecture's tiny presets, every backend's
precisions, and the shared helpers the test files use instead of naming an architecture.

Adding an architecture: one row in ARCHS. Adding a backend: one row in BACKENDS. tests/test_house.py
fails until both tables cover every registered architecture and backend.
"""
from __future__ import annotations

import numpy as np
import torch

# architecture -> its tiny presets (variants are config: multi-query and grouped Falcon are two presets)
# and the scan forms its module offers (None: no scan).
ARCHS = {
    "falcon": {"presets": ("falcon-tiny", "falcon40b-tiny"), "scans": ("loop",)},
    "falcon_mamba": {"presets": ("falcon-mamba-tiny",), "scans": ("loop", "logdepth", "scan")},
    "falcon_h1": {"presets": ("falcon-h1-tiny",), "scans": ("loop", "chunked", "quadratic")},
}
# backend -> precisions run through the public `perch.check` in tests/test_house.py (fp32 and one
# compressed form each; the per-backend files test the rest of their precisions and variants).
BACKENDS = {"onnx": ("fp32", "int8"), "coreml": ("fp32", "int8")}
# (arch, precision) rows of that matrix run only in `make test-extended`: Falcon-H1's int8 rows are the
# slowest (20-39 s each), and tests/test_onnx.py and tests/test_coreml.py already prove its int8 and int4.
EXTENDED = {("falcon_h1", "int8")}
TINY_PRESETS = tuple(p for row in ARCHS.values() for p in row["presets"])
FIRST_PRESET = {arch: row["presets"][0] for arch, row in ARCHS.items()}


def buffer_names(io) -> dict[str, str]:
    """Buffer names for an architecture's stateful module outside any backend."""
    return {s.kind: f"{s.kind}_state" for s in io.states}


def stateful_args(io, ids: torch.Tensor, end: int) -> tuple[torch.Tensor, ...]:
    """Inputs of a "stateful" front-end for new tokens `ids` ending at position `end`, by its mask contract."""
    from perch.archs.masks import additive_mask

    args = [ids]
    if io.mask == "additive":
        args.append(additive_mask(torch.ones(ids.shape[0], end, dtype=torch.long), ids.shape[1]))
    return tuple(args)


def prompt(batch: int, t: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(batch, t))
