"""GPTQ (Frantar et al., 2022) for block-wise asymmetric 4/8-bit weights, with `quant_search` choosing each
block's scale and zero point.

Round-to-nearest treats every weight alone; GPTQ quantizes one input column at a time and spreads that
column's rounding error over the columns not yet quantized, weighted by the inverse of the layer's input
Hessian H = X^T X (X: activations a calibration set feeds the layer), so the *output* error, not the weight
error, is what gets minimised. Each block's (scale, zero) is chosen by `quant_search.search` on the
error-corrected weights when the block's first column is reached, the "static groups off" order of the
reference implementation (github.com/IST-DASLab/gptq, gptq.py `fasterquant`).

Output: the same (q, scale, zero) layout as `quant_search.search`, so both backends pack it unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

from perch.exporter import quant_search

DAMP = 0.01  # fraction of mean(diag H) added to the diagonal: the reference implementation's default
COLUMNS_PER_PASS = 128  # lazy batch update width (reference: 128)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (damped until it factors)."""
    damp = DAMP * torch.mean(torch.diag(h)).clamp_min(1e-12)
    eye = torch.eye(len(h), dtype=h.dtype)
    for _ in range(6):
        try:
            l = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise ValueError("input Hessian is not positive definite even with heavy damping")


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, *, act_order: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w (rows, K), hessian (K, K) -> (q (rows, blocks, block) uint8, scale (rows, blocks), zero (rows, blocks)).

    K must be a multiple of `block` (callers pad): blocks never straddle the padding. `act_order`: visit
    columns by decreasing H diagonal (the most-used inputs first, while there is most room to compensate),
    with every block's (scale, zero) fixed up front from the original weights ("static groups").
    """
    rows, k = w.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block {block}")
    W = torch.tensor(w, dtype=torch.float64)
    H = torch.tensor(hessian, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).numpy().astype(np.float32)
    nb, qmax = k // block, (1 << bits) - 1
    Q = np.empty((rows, nb, block), np.uint8)
    S = np.empty((rows, nb), np.float32)
    Z = np.empty((rows, nb), np.uint8)
    if act_order:
        _, S[:], Z[:] = quant_search.search(W.float().numpy().reshape(rows, nb, block), bits, diag.reshape(nb, block))
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k)
    hinv = _inverse_cholesky(H)
    for i1 in range(0, k, COLUMNS_PER_PASS):
        i2 = min(i1 + COLUMNS_PER_PASS, k)
        W1, err = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=torch.float64)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            b, j = divmod(col, block)
            if act_order:
                s_t, z_t = torch.tensor(S[:, b], dtype=torch.float64), torch.tensor(Z[:, b], dtype=torch.float64)
            elif j == 0:  # a new block: choose its scale/zero on the error-corrected weights
                cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :block].float().numpy()
                _, s, z = quant_search.search(cur[:, None, :], bits, diag[None, col:col + block])
                S[:, b], Z[:, b] = s[:, 0], z[:, 0]
                s_t, z_t = torch.tensor(S[:, b], dtype=torch.float64), torch.tensor(Z[:, b], dtype=torch.float64)
            x = W1[:, i]
            q = torch.clamp(torch.round(x / s_t + z_t), 0, qmax)
            Q[:, b, j] = q.numpy().astype(np.uint8)
            e = (x - s_t * (q - z_t)) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    return Q, S, Z


def dequantize(q: np.ndarray, s: np.ndarray, z: np.ndarray, k: int) -> np.ndarray:
    return ((q.astype(np.float32) - z[..., None]) * s[..., None]).reshape(len(q), -1)[:, :k]
