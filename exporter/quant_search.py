"""Error-minimising asymmetric block quantization, shared by the ONNX and Core ML backends.

Both backends store a block as `w ~= scale * (q - zero)` with q and the integer zero point in [0, 2**bits - 1]
(MatMulNBits / GatherBlockQuantized with uint zero points; Core ML's constexpr_blockwise_shift_scale with a
uint offset). Round-to-nearest from the block's min/max ("rtn") wastes levels on outliers; "search" tries a
grid of narrower ranges, solves the least-squares scale for each rounding, and keeps whichever gives the
smallest (optionally importance-weighted) squared error per block, in the spirit of llama.cpp's k-quants
(make_qkx2_quants). Importance is one weight per input channel, e.g. the mean squared activation a
calibration set feeds that channel (llama.cpp's "imatrix"): error on a channel that sees large inputs costs
more at the output.

Pure numpy, vectorised over blocks; callers pass a row chunk at a time so temporaries stay bounded.
"""
from __future__ import annotations

import numpy as np

# Range shrink factors tried by "search": 1.0 is min/max; below it, outliers clip for finer levels elsewhere.
SHRINK = tuple(np.round(np.linspace(0.60, 1.0, 21), 3))
ZERO_SHIFTS = (-1, 0, 1)  # integer zero points tried around the rounded one for each shrink factor


def rtn(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., block) -> (q uint8, scale float32 (...), zero uint8 (...)): min/max with 0 kept exact."""
    qmax = (1 << bits) - 1
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(x / scale[..., None] + zp[..., None]), 0, qmax)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def _fit_scale(x: np.ndarray, q: np.ndarray, zp: np.ndarray, imp: np.ndarray) -> np.ndarray:
    """Least-squares scale for fixed integer codes: argmin_s sum imp * (s*(q-z) - x)^2."""
    d = q - zp[..., None]
    den = (imp * d * d).sum(-1)
    return np.where(den > 0, (imp * d * x).sum(-1) / np.where(den > 0, den, 1), 0.0)


def _err(x, q, zp, scale, imp) -> np.ndarray:
    r = scale[..., None] * (q - zp[..., None]) - x
    return (imp * r * r).sum(-1)


def search(x: np.ndarray, bits: int, importance: np.ndarray | None = None,
           shrink: tuple[float, ...] = SHRINK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like `rtn`, choosing per block the (scale, zero) that minimise the weighted squared error.

    x: (rows, blocks, block) float32; importance: (blocks, block) or None (all ones). Never worse than
    `rtn` on the weighted error: min/max rounding is one of the candidates.
    """
    x = np.asarray(x, np.float32)
    qmax = (1 << bits) - 1
    imp = np.ones(x.shape[-2:], np.float32) if importance is None else np.asarray(importance, np.float32)
    imp = np.broadcast_to(imp, x.shape)
    best_q, best_s, best_z = rtn(x, bits)
    best_q, best_z = best_q.astype(np.float32), best_z.astype(np.float32)
    best_e = _err(x, best_q, best_z, best_s, imp)
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    width = np.where(hi > lo, hi - lo, 1.0)
    for f in shrink:
        s0 = f * width / qmax
        z0 = np.round(-lo * f / s0)
        for dz in ZERO_SHIFTS:
            zp = np.clip(z0 + dz, 0, qmax)
            q = np.clip(np.round(x / s0[..., None] + zp[..., None]), 0, qmax)
            s = _fit_scale(x, q, zp, imp)
            s = np.where(s > 0, s, s0)
            # re-round with the fitted scale once: codes and scale agree, as k-quants' refinement step does
            q = np.clip(np.round(x / s[..., None] + zp[..., None]), 0, qmax)
            s = np.where((s2 := _fit_scale(x, q, zp, imp)) > 0, s2, s)
            e = _err(x, q, zp, s, imp)
            better = e < best_e
            if better.any():
                best_e = np.where(better, e, best_e)
                best_s = np.where(better, s, best_s)
                best_z = np.where(better, zp, best_z)
                best_q = np.where(better[..., None], q, best_q)
    return best_q.astype(np.uint8), best_s.astype(np.float32), best_z.astype(np.uint8)


def fake_quantize(w: np.ndarray, bits: int, block: int, algorithm: str = "search",
                  importance: np.ndarray | None = None) -> np.ndarray:
    """The float weight (rows, K) a block-quantized `w` stands for (simulations and tests)."""
    rows, k = w.shape
    nb = -(-k // block)
    x = np.pad(np.asarray(w, np.float32), ((0, 0), (0, nb * block - k))).reshape(rows, nb, block)
    imp = None if importance is None else np.pad(importance, (0, nb * block - k)).reshape(nb, block)
    q, s, z = search(x, bits, imp) if algorithm == "search" else rtn(x, bits)
    out = (q.astype(np.float32) - z[..., None]) * s[..., None]
    return out.reshape(rows, -1)[:, :k]
