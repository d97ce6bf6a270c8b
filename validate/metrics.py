"""Small pure functions over numpy logits: how far an artifact's logits are from the reference's.

Every function takes `ref` and `art` of the same shape (..., V): one row per token position; the
leading axes are flattened into rows. Per-row values come from the `row_*` functions; the plain ones
reduce over rows to the number a report prints (the worst row for errors, the mean for agreement).
All arithmetic is float64 so a metric never reflects its own rounding.
"""
from __future__ import annotations

import numpy as np

_TINY = 1e-30  # guards divisions by a zero norm (all-zero logits) without changing any real value


def _rows(ref: np.ndarray, art: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, art = np.asarray(ref, dtype=np.float64), np.asarray(art, dtype=np.float64)
    if ref.shape != art.shape:
        raise ValueError(f"reference logits {ref.shape} and artifact logits {art.shape} differ in shape")
    return ref.reshape(-1, ref.shape[-1]), art.reshape(-1, art.shape[-1])


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64, stable for any logit scale (max subtracted first)."""
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def row_max_abs(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    r, a = _rows(ref, art)
    return np.abs(a - r).max(axis=-1)


def row_rel_l2(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    """||art - ref|| / ||ref|| per row: scale-free, so one limit fits models with large or flat logits."""
    r, a = _rows(ref, art)
    return np.linalg.norm(a - r, axis=-1) / np.maximum(np.linalg.norm(r, axis=-1), _TINY)


def row_cosine(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    r, a = _rows(ref, art)
    denom = np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(a, axis=-1), _TINY)
    return (r * a).sum(axis=-1) / denom


def row_kl(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    """KL(reference || artifact) per row in nats: sum p_ref * (log p_ref - log p_art), never negative."""
    r, a = _rows(ref, art)
    lr, la = log_softmax(r), log_softmax(a)
    return np.maximum((np.exp(lr) * (lr - la)).sum(axis=-1), 0.0)


def row_top1(ref: np.ndarray, art: np.ndarray, ref_bits: int | None = None) -> np.ndarray:
    """1.0 where both pick the same most likely token.

    With `ref_bits` (the significant bits of the reference's logits: 8 for a bf16 model, 11 for fp16), a
    pick the reference scores within one unit in the last place of its own top logit also agrees: rounding
    the reference's logits to its dtype ties or splits by one step tokens whose true logits differ by less,
    so the reference cannot say which comes first (measured: all three flips of a full-depth Falcon-7B fp16
    Core ML export against transformers bf16 had gaps of exactly 0 or one bf16 step)."""
    r, a = _rows(ref, art)
    agree = r.argmax(axis=-1) == a.argmax(axis=-1)
    if ref_bits is not None:
        top = r.max(axis=-1)
        agree |= row_top1_gap(r, a) <= ulp(top, ref_bits)
    return agree.astype(np.float64)


def ulp(x: np.ndarray, bits: int) -> np.ndarray:
    """The spacing of a float format with `bits` significant bits at |x| (normal range)."""
    mag = np.maximum(np.abs(np.asarray(x, dtype=np.float64)), _TINY)
    return np.exp2(np.floor(np.log2(mag)) - (bits - 1))


def row_top1_gap(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    """How much lower the reference scores the artifact's pick than its own: 0.0 where they agree, and small
    where a flip is between tokens the reference itself all but ties (random-weight models, flat logits)."""
    r, a = _rows(ref, art)
    return r.max(axis=-1) - r[np.arange(len(r)), a.argmax(axis=-1)]


def row_topk(ref: np.ndarray, art: np.ndarray, k: int = 5) -> np.ndarray:
    """|top-k(ref) & top-k(art)| / k per row: 1.0 when both rank the same k tokens highest (any order)."""
    r, a = _rows(ref, art)
    k = min(k, r.shape[-1])
    top_r = np.argpartition(-r, k - 1, axis=-1)[:, :k]
    top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]
    return np.array([len(np.intersect1d(x, y)) / k for x, y in zip(top_r, top_a)], dtype=np.float64)


def max_abs(ref: np.ndarray, art: np.ndarray) -> float:
    return float(row_max_abs(ref, art).max())


def rel_l2(ref: np.ndarray, art: np.ndarray) -> float:
    """The worst row's relative L2 error."""
    return float(row_rel_l2(ref, art).max())


def cosine(ref: np.ndarray, art: np.ndarray) -> float:
    """The worst (smallest) row's cosine similarity."""
    return float(row_cosine(ref, art).min())


def kl_div(ref: np.ndarray, art: np.ndarray) -> float:
    """Mean KL(reference || artifact) over rows, in nats."""
    return float(row_kl(ref, art).mean())


def top1_agreement(ref: np.ndarray, art: np.ndarray) -> float:
    """Fraction of rows whose argmax agrees."""
    return float(row_top1(ref, art).mean())


def topk_agreement(ref: np.ndarray, art: np.ndarray, k: int = 5) -> float:
    """Mean overlap of the top-k token sets, as a fraction of k."""
    return float(row_topk(ref, art, k).mean())


def greedy_match_length(ref_tokens, art_tokens) -> int:
    """How many leading greedy tokens the two runs share before the first difference."""
    n = 0
    for r, a in zip(ref_tokens, art_tokens):
        if int(r) != int(a):
            break
        n += 1
    return n


def _crop_like(art: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    """`art` cut down to `ref`'s shape along axes where it is larger (a fixed-size cache holds its valid
    entries first); None when the shapes cannot be reconciled (different rank, or `art` smaller)."""
    if art.ndim != ref.ndim or any(a < r for a, r in zip(art.shape, ref.shape)):
        return None
    return art[tuple(slice(0, r) for r in ref.shape)]


def state_divergence(ref_state: dict[str, np.ndarray], art_state: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per state tensor ("key.0", "ssm.3", ...): max abs and relative L2 of the artifact's state.

    Tensors present on one side only, or whose shapes cannot be matched, are reported with `error` set
    and no numbers, so a missing or mis-shaped state is visible rather than skipped.
    """
    out: dict[str, dict] = {}
    for name in sorted(set(ref_state) | set(art_state), key=_state_order):
        if name not in ref_state or name not in art_state:
            side = "reference" if name not in ref_state else "artifact"
            out[name] = {"error": f"missing from the {side}"}
            continue
        r = np.asarray(ref_state[name], dtype=np.float64)
        a = _crop_like(np.asarray(art_state[name], dtype=np.float64), r)
        if a is None:
            out[name] = {"error": f"shape {tuple(art_state[name].shape)} vs reference {tuple(r.shape)}"}
            continue
        diff = np.linalg.norm(a - r) / max(float(np.linalg.norm(r)), _TINY)
        out[name] = {"max_abs": float(np.abs(a - r).max(initial=0.0)), "rel_l2": float(diff)}
    return out


def _state_order(name: str) -> tuple[int, str]:
    """Layer-major order: key.0, value.0, key.1, ... (numeric layer, so 10 sorts after 9)."""
    kind, _, layer = name.rpartition(".")
    return (int(layer), kind) if layer.isdigit() else (1 << 30, name)
