"""Numpy kernels for MIL data-movement, slicing, convolution and attention ops (see `ops`).

Same contract as `ops`: keyword arguments named like the MIL parameters, float inputs as float32,
results rounded by the executor, inputs never modified. Kernels register in
`perch.runtimes.mil.registry.OPS`; the gather / scatter family is in `ops_index`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from perch.runtimes.mil.registry import register


def _ints(v: Any) -> list[int]:
    return [int(i) for i in np.ravel(v)]


# ---- slicing ---------------------------------------------------------------------------------------


def _index_slices(rank, begin, end, stride, begin_mask, end_mask, squeeze_mask) -> tuple:
    # Masks as in defs/_utils.solve_slice_by_index_slice; a squeezed axis is a pure index at begin.
    begin, end = _ints(begin), _ints(end)
    stride = _ints(stride) if stride is not None else [1] * rank
    out = []
    for i in range(rank):
        if squeeze_mask is not None and squeeze_mask[i]:
            out.append(begin[i])
            continue
        b = None if begin_mask is not None and begin_mask[i] else begin[i]
        e = None if end_mask is not None and end_mask[i] else end[i]
        out.append(slice(b, e, stride[i]))
    return tuple(out)


@register("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_index_slices(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@register("slice_update")
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    index = _index_slices(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out[index] = np.reshape(update, out[index].shape)
    return out


@register("slice_by_size")
def slice_by_size(x, begin, size):
    index = []
    for b, s, n in zip(_ints(begin), _ints(size), x.shape):
        b = b + n if b < 0 else b
        index.append(slice(b, None if s == -1 else b + s))
    return x[tuple(index)]


# ---- shape manipulation ----------------------------------------------------------------------------


@register("reshape")
def reshape(x, shape):
    # iOS17: a 0 copies the input dim at the same position counted from the right (1 if none).
    shape = _ints(shape)
    k = len(shape)
    for i, s in enumerate(shape):
        if s == 0:
            j = x.ndim - (k - i)
            shape[i] = x.shape[j] if 0 <= j < x.ndim else 1
    return np.reshape(x, shape)


@register("transpose")
def transpose(x, perm):
    return np.transpose(x, _ints(perm))


@register("squeeze")
def squeeze(x, axes=None):
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(_ints(axes)))


@register("expand_dims")
def expand_dims(x, axes):
    return np.expand_dims(x, tuple(_ints(axes)))  # negative axes count from the output rank


@register("flatten2d")
def flatten2d(x, axis=1):
    axis = int(axis) % x.ndim if x.ndim else 0
    return np.reshape(x, (int(np.prod(x.shape[:axis])), -1))


@register("reverse")
def reverse(x, axes=None):
    return np.flip(x) if axes is None else np.flip(x, axis=tuple(_ints(axes)))


@register("tile")
def tile(x, reps):
    return np.tile(x, _ints(reps))


@register("concat")
def concat(values, axis, interleave=False):
    values = [np.atleast_1d(v) for v in values]  # scalars (e.g. gathered dims) concat as length-1
    axis = int(axis)
    if interleave:  # out[i::n] = values[i] along axis
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@register("stack")
def stack(values, axis):
    return np.stack(values, axis=int(axis))


@register("split")
def split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=axis))
    return tuple(np.split(x, np.cumsum(_ints(split_sizes))[:-1], axis=axis))


@register("shape")
def shape(x):
    return np.array(x.shape, dtype=np.int32)


@register("fill")
def fill(shape, value=0.0):
    return np.full(_ints(shape), value)


@register("fill_like")
def fill_like(ref_tensor, value=0.0):
    return np.full(np.shape(ref_tensor), value)


@register("range_1d")
def range_1d(end, start, step):
    return np.arange(start, end, step)


@register("select")
def select(cond, a, b):
    return np.where(cond, a, b)


@register("cumsum")
def cumsum(x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    y = np.flip(x, axis) if reverse else x
    out = np.cumsum(y, axis=axis)
    if exclusive:  # shift by one: out[0] = 0, out[i] = sum(y[:i])
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis)), np.delete(out, -1, axis)], axis)
    return np.flip(out, axis) if reverse else out


@register("band_part")
def band_part(x, lower=-1, upper=-1):
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@register("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    # `pad` covers the last len(pad)/2 axes, before/after pairs.
    pairs = np.reshape(_ints(pad), (-1, 2)).tolist()
    pairs = [[0, 0]] * (x.ndim - len(pairs)) + pairs
    if mode == "constant":
        return np.pad(x, pairs, mode="constant", constant_values=constant_val)
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@register("one_hot")
def one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    n = int(one_hot_vector_size)
    hot = np.expand_dims(indices, -1) == np.arange(n)
    out = np.where(hot, on_value, off_value)
    return np.moveaxis(out, -1, int(axis) % out.ndim)


@register("non_zero")
def non_zero(x):
    return np.transpose(np.nonzero(x)).astype(np.int32)


# ---- sorting -------------------------------------------------------------------------------------


def _order(x, axis, ascending):
    key = x if ascending else -x.astype(np.float64) if x.dtype.kind in "iub" else -x
    return np.argsort(key, axis=axis, kind="stable")


@register("argsort")
def argsort(x, axis=-1, ascending=False):
    return _order(x, int(axis), bool(ascending))


@register("topk")
def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    axis = int(axis)
    k = x.shape[axis] if int(k) == -1 else int(k)
    idx = np.take(_order(x, axis, bool(ascending)), np.arange(k), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    return (values, idx) if return_indices else values


# ---- convolution and attention -------------------------------------------------------------------


def _conv_pads(pad_type, pad, spatial, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(before, after) per spatial axis, as defs/_utils.aggregated_pad (TF-style 'same')."""
    if pad_type == "custom":
        p = _ints(pad)
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(spatial))]
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    pads = []
    for n, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, s * -(-n // s) - n + (k - 1) * d + 1 - s)
        small = total // 2
        pads.append((small, total - small) if pad_type == "same" else (total - small, small))
    return pads


@register("conv")
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    # x (N, C, *D), weight (Cout, C/groups, *K): windows gathered as strided views, one einsum.
    nsp = x.ndim - 2
    kernel = weight.shape[2:]
    strides = _ints(strides) if strides is not None else [1] * nsp
    dilations = _ints(dilations) if dilations is not None else [1] * nsp
    pads = _conv_pads(pad_type, pad, x.shape[2:], kernel, strides, dilations)
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(xp, span, axis=tuple(range(2, x.ndim)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]  # (N, C, *out, *K)
    g, n = int(groups), x.shape[0]
    win = win.reshape((n, g, x.shape[1] // g) + win.shape[2:])
    w = weight.reshape((g, weight.shape[0] // g) + weight.shape[1:])
    sp, ks = "xyz"[:nsp], "ijk"[:nsp]
    out = np.einsum(f"ngc{sp}{ks},goc{ks}->ngo{sp}", win, w)
    out = out.reshape((n, weight.shape[0]) + out.shape[3:])
    if bias is not None:
        out = out + np.reshape(bias, (-1,) + (1,) * nsp)
    return out


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / np.float32(np.sqrt(query.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, np.float32(-np.inf))
        else:
            scores = scores + attn_mask
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(e / np.sum(e, axis=-1, keepdims=True), value)
