"""Numpy kernels for the MIL gather / scatter family (see `ops`), over one index normalisation.

Every index passes through `normalize_indices`: a negative index in [-D, 0) counts from the end (iOS15/16
semantics; iOS17 programs wrap negatives themselves with a `select` before the op), and an index outside
[-D, D) is out of bounds. With `validate_indices` False Core ML leaves such an index "undefined but memory
safe": a scatter drops the update (coremltools' iOS17 index_put tests agree only with that reading, e.g.
when its int16 cast pass wraps -1 to 65535), while a gather has no value to return, so we raise.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from perch.runtimes.mil.registry import register


def normalize_indices(indices: Any, sizes: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices in [0, D), mask of the in-bounds ones); `sizes` broadcasts against `indices` (one size
    for an axis, or the sizes of the indexed axes along the last dim for the *_nd ops)."""
    idx = np.asarray(indices).astype(np.int64)
    n = np.asarray(sizes, dtype=np.int64)
    idx = np.where(idx < 0, idx + n, idx)
    ok = (idx >= 0) & (idx < n)
    return np.where(ok, idx, 0).astype(np.intp), ok


def _gather_indices(op: str, indices: Any, sizes: Any) -> np.ndarray:
    idx, ok = normalize_indices(indices, sizes)
    if not ok.all():
        bad = np.asarray(indices)[~ok].ravel()[0]  # ok has the shape of indices (sizes broadcast)
        raise IndexError(f"{op}: index {bad} is out of bounds (sizes {np.ravel(sizes).tolist()}); "
                         "Core ML leaves the result undefined")
    return idx


def _scatter_mask(op: str, ok: np.ndarray, validate: bool) -> np.ndarray:
    if validate and not ok.all():
        raise IndexError(f"{op}: an index is out of bounds and validate_indices is set")
    return ok


# ---- gather ----------------------------------------------------------------------------------------


@register("gather")
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis, b = int(axis) % x.ndim, int(batch_dims)
    indices = _gather_indices("gather", indices, x.shape[axis])
    if b == 0:
        return np.take(x, indices, axis=axis)
    batch = x.shape[:b]  # gather row by row over the leading batch dims
    xs = x.reshape((-1,) + x.shape[b:])
    ids = indices.reshape((-1,) + indices.shape[b:])
    out = np.stack([np.take(p, i, axis=axis - b) for p, i in zip(xs, ids)])
    return out.reshape(batch + out.shape[1:])


@register("gather_along_axis")
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    axis = int(axis) % x.ndim
    return np.take_along_axis(x, _gather_indices("gather_along_axis", indices, x.shape[axis]), axis=axis)


@register("gather_nd")
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    b = int(batch_dims)
    k = np.shape(indices)[-1]
    batch = x.shape[:b]
    xs = x.reshape((-1,) + x.shape[b:])
    ids = _gather_indices("gather_nd", indices, x.shape[b:b + k]).reshape((-1,) + np.shape(indices)[b:])
    rows = np.arange(xs.shape[0]).reshape((-1,) + (1,) * (ids.ndim - 2))
    out = xs[(rows,) + tuple(np.moveaxis(ids, -1, 0))]
    return out.reshape(batch + out.shape[1:])


# ---- scatter ---------------------------------------------------------------------------------------

_SCATTER_UFUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                   "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, index: tuple, updates, mode: str) -> np.ndarray:
    if mode == "update":
        out[index] = updates
    else:
        _SCATTER_UFUNCS[mode].at(out, index, updates)  # .at accumulates repeated indices
    return out


@register("scatter")
def scatter(data, indices, updates, axis=0, mode="add", validate_indices=False):
    out = np.array(data, copy=True)
    axis = int(axis) % data.ndim
    idx, ok = normalize_indices(indices, data.shape[axis])
    ok = _scatter_mask("scatter", ok, bool(validate_indices))
    view = np.moveaxis(out, axis, 0)  # a view: writes land in `out`
    _scatter_into(view, (idx[ok],), np.moveaxis(np.asarray(updates), axis, 0)[ok], mode)
    return out


@register("scatter_along_axis")
def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
    out = np.array(data, copy=True)
    axis = int(axis) % data.ndim
    idx, ok = normalize_indices(indices, data.shape[axis])
    ok = _scatter_mask("scatter_along_axis", ok, bool(validate_indices))
    grid = list(np.ogrid[tuple(slice(0, n) for n in idx.shape)])
    grid[axis] = idx
    coords = tuple(np.broadcast_to(g, idx.shape)[ok] for g in grid)
    return _scatter_into(out, coords, np.broadcast_to(updates, idx.shape)[ok], mode)


@register("scatter_nd")
def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
    out = np.array(data, copy=True)
    k = np.shape(indices)[-1]
    idx, ok = normalize_indices(indices, data.shape[:k])
    rows = _scatter_mask("scatter_nd", ok.all(-1), bool(validate_indices))
    return _scatter_into(out, tuple(np.moveaxis(idx[rows], -1, 0)), np.asarray(updates)[rows], mode)
