"""Error-minimising asymmetric block quantization, shared by the ONNX and Core ML backends.

Both backends store a block as `w ~= scale * (q - zero)` with q and the integer zero point in [0, 2**bits - 1]
(MatMulNBits / GatherBlockQuantized with uint zero points; Core ML's constexpr_blockwise_shift_scale with a
uint offset). Round-to-nearest from the block's min/max ("rtn") wastes levels on outliers; "search" tries a
grid of narrower ranges, solves the least-squares scale for each rounding, and keeps whichever gives the
smallest (optionally importance-weighted) squared error per block, in the spirit of llama.cpp's k-quants
(make_qkx2_quants). Importance is one weight per input channel, e.g. the mean squared activation a
calibration set feeds that channel (llama.cpp's "imatrix"): error on a channel that sees large inputs costs
more at the output.

Pure numpy, vectorised over blocks, a cache-sized chunk of rows at a time, chunks spread over threads.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Range shrink factors tried by "search": 1.0 is min/max; below it, outliers clip for finer levels elsewhere.
# Coarse to fine: a 0.08 grid over [0.6, 1.0], then +-0.02 and +-0.04 around each block's best. Against the
# full 0.02 grid (21 factors) it costs 0.005% more weighted squared error and half the time (1024x4544 and
# 256x4544 Gaussian slices with random importance, blocks 16 and 32).
COARSE = tuple(np.linspace(0.60, 1.0, 6, dtype=np.float32))
FINE = (-0.04, -0.02, 0.02, 0.04)
ZERO_SHIFTS = (-1, 0, 1)  # integer zero points tried around the rounded one for each shrink factor
CHUNK_ELEMENTS = 1 << 17  # rows are searched this many weights at a time: temporaries stay in cache (2x)


def rtn(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., block) -> (q uint8, scale float32 (...), zero uint8 (...)): min/max with 0 kept exact."""
    qmax = (1 << bits) - 1
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(x / scale[..., None] + zp[..., None]), 0, qmax)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...k,...k->...", a, b)


class _Chunk:
    """The search state of one chunk of blocks (rows, blocks, block), with preallocated scratch arrays.

    Codes are held as d = q - zero (float32); `imp` None means unweighted and skips its multiplies. A
    candidate's error comes from the sums its scale fit already made, e(s) = s^2 <d,d>_w - 2 s <d,x>_w + <x,x>_w,
    not from another pass over the block; float32 cancellation there can misrank candidates whose errors differ
    by ~1e-4, so `result` compares the winner with min/max exactly and keeps whichever is better.
    """

    def __init__(self, x: np.ndarray, bits: int, imp: np.ndarray | None):
        self.x, self.imp, self.qmax = x, imp, float((1 << bits) - 1)
        self.d = np.empty_like(x)
        self.w = None if imp is None else np.empty_like(x)
        self.wx = x if imp is None else imp * x
        self.xx = _dot(self.wx, x)
        q, self.s, z = rtn(x, bits)
        self.z = z.astype(np.float32)
        self.best_d = q.astype(np.float32) - self.z[..., None]
        self.rtn = (self.best_d.copy(), self.s, self.z)
        self.e = self._err(self.best_d, self.s)
        self.lo = np.minimum(x.min(-1), 0)
        hi = np.maximum(x.max(-1), 0)
        self.width = np.where(hi > self.lo, hi - self.lo, 1.0).astype(np.float32)
        self.f = np.ones_like(self.width)

    def _codes(self, s: np.ndarray, zp: np.ndarray) -> np.ndarray:
        d = self.d
        np.multiply(self.x, (1 / s)[..., None], out=d)
        d += zp[..., None]
        np.round(d, out=d)
        np.clip(d, 0, self.qmax, out=d)
        d -= zp[..., None]
        return d

    def _fit(self, d: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares scale for fixed codes, argmin_s sum imp * (s*d - x)^2 (the fallback where undefined),
        and its error."""
        num = _dot(d, self.wx)
        den = _dot(d, d if self.imp is None else np.multiply(self.imp, d, out=self.w))
        s = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0).astype(np.float32)
        s = np.where(s > 0, s, fallback)
        return s, s * (s * den - 2 * num) + self.xx

    def _err(self, d: np.ndarray, s: np.ndarray) -> np.ndarray:
        """The exact weighted squared error of codes d at scales s."""
        r = d * s[..., None] - self.x
        return _dot(r, r) if self.imp is None else _dot(self.imp * r, r)

    def trial(self, f: np.ndarray) -> None:
        """Shrink factor f (per block): each zero shift, fitted scale, re-rounded once, kept where better."""
        s0 = f * self.width / self.qmax
        z0 = np.round(-self.lo * f / s0)
        # at s0 the codes differ between zero shifts only in their clip bounds: round x / s0 once for all three
        r0 = np.round(self.x * (1 / s0)[..., None])
        for dz in ZERO_SHIFTS:
            zp = np.clip(z0 + dz, 0, self.qmax).astype(np.float32)
            d = np.maximum(r0, -zp[..., None], out=self.d)
            s, _ = self._fit(np.minimum(d, (self.qmax - zp)[..., None], out=d), s0)
            # re-round with the fitted scale once: codes and scale agree, as k-quants' refinement step does
            s, e = self._fit(self._codes(s, zp), s)
            better = e < self.e
            if better.any():
                self.e, self.s = np.where(better, e, self.e), np.where(better, s, self.s)
                self.z, self.f = np.where(better, zp, self.z), np.where(better, f, self.f)
                np.copyto(self.best_d, self.d, where=better[..., None])

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d0, s0, z0 = self.rtn
        worse = self._err(self.best_d, self.s) > self._err(d0, s0)
        if worse.any():  # never worse than min/max, whatever the error formula's rounding said
            np.copyto(self.best_d, d0, where=worse[..., None])
            self.s, self.z = np.where(worse, s0, self.s), np.where(worse, z0, self.z)
        q = self.best_d + self.z[..., None]
        return q.astype(np.uint8), self.s.astype(np.float32), self.z.astype(np.uint8)


def search(x: np.ndarray, bits: int, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like `rtn`, choosing per block the (scale, zero) that minimise the weighted squared error.

    x: (rows, blocks, block) float32; importance: (blocks, block) or None (all ones). Never worse than
    `rtn` on the weighted error: min/max rounding is where each block starts.
    """
    x = np.asarray(x, np.float32)
    imp = None if importance is None else np.ascontiguousarray(np.broadcast_to(
        np.asarray(importance, np.float32), x.shape[-2:]))
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].size))
    starts = range(0, len(x), step)
    # threads only for many chunks: GPTQ calls this per column block with one or two chunks, thousands of times
    workers = _workers() if len(starts) >= 4 else 1
    if workers == 1:
        parts = [_search_chunk(x[i:i + step], bits, imp) for i in starts]
    else:  # numpy releases the GIL inside its loops: chunks in threads use every core torch may use
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda i: _search_chunk(x[i:i + step], bits, imp), starts))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _workers() -> int:
    """As many threads as torch uses (OMP_NUM_THREADS, torch.set_num_threads); 1 where torch is absent."""
    try:
        import torch
    except ImportError:
        return 1
    return max(1, torch.get_num_threads())


def _search_chunk(x: np.ndarray, bits: int, imp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = _Chunk(np.ascontiguousarray(x), bits, imp)
    for f in COARSE:
        c.trial(np.full_like(c.width, f))
    centre = c.f.copy()
    for df in FINE:
        c.trial(np.clip(centre + np.float32(df), 0.5, 1.0).astype(np.float32))
    return c.result()


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
