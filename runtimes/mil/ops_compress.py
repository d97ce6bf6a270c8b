"""Numpy kernels for MIL's compression ops (constexpr_* dequantization, evaluated once at load or, with
lazy weights, per use) and quantize / dequantize; registered in the same table as `ops`.
"""
from __future__ import annotations

import numpy as np

from perch.runtimes.mil.registry import register


# ---- compression (constexpr_*): evaluated once at load, never per call ------------------------


@register("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    # output = scale * (data - offset), scale/offset repeated over blocks of data.shape / scale.shape. Computed
    # on a (n0, b0, n1, b1, ...) view with scale/offset broadcast over the b axes, so the only full-size
    # temporary is the fp32 result (a 65024x4544 table: 1.2 GB, where repeating scale and offset took ~5).
    blocks = [d // s for d, s in zip(data.shape, scale.shape)]
    split = [n for s, b in zip(scale.shape, blocks) for n in (s, b)]
    spread = [n for s in scale.shape for n in (s, 1)]
    view = data.reshape(split)
    if offset is None:
        out = view.astype(np.float32)
    else:
        out = np.subtract(view, np.asarray(offset).reshape(spread), dtype=np.float32)
    out *= np.asarray(scale, np.float32).reshape(spread)
    return out.reshape(data.shape)


@register("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, vector_axis=None, shape=None):
    if shape is not None:
        raise NotImplementedError("the iOS16 form of constexpr_lut_to_dense; re-export at iOS18")
    # lut: (*G, palette, vector); G divides indices.shape, one table per block of indices. Done in slabs of
    # axis 0 (whole tables each): numpy's gather takes intp indices, and one int64 copy of a 65024x4096 index
    # array is 2.1 GB, four times the fp16 table it builds (measured: 2.48 GiB over the inputs, now ~0.6).
    per_table = indices.shape[0] // lut.shape[0]
    step = _slab_rows(per_table, max(1, _LUT_SLAB // max(1, indices[0].size)))
    vector = lut.shape[-1]
    axis = None if vector == 1 else int(vector_axis) % indices.ndim
    shape = list(indices.shape)
    if axis is not None:
        shape[axis] *= vector
    out = np.empty(shape, lut.dtype)
    rows = vector if axis == 0 else 1  # output rows per index row
    for a in range(0, indices.shape[0], step):
        tables = lut[a // per_table:a // per_table + max(1, step // per_table)]
        out[a * rows:(a + step) * rows] = _lut_slab(indices[a:a + step], tables, axis)
    return out


def _slab_rows(per_table: int, target: int) -> int:
    """Rows per slab, near `target`, so that no slab straddles two tables: whole tables, or a divisor of one."""
    if per_table <= target:
        return per_table * (target // per_table)
    return max(d for d in range(1, target + 1) if per_table % d == 0)


_LUT_SLAB = 1 << 22  # indices per slab: a 32 MB intp copy


def _lut_slab(indices, lut, axis):
    grid = np.ogrid[tuple(slice(0, n) for n in indices.shape)]
    table = tuple(g // (n // lut.shape[i]) for i, (g, n) in enumerate(zip(grid, indices.shape)))
    out = lut[table + (indices.astype(np.intp),)]  # (*indices.shape, vector)
    if axis is None:
        return out[..., 0]
    out = np.moveaxis(out, -1, axis + 1)  # vector elements fill the vector axis contiguously
    shape_out = list(indices.shape)
    shape_out[axis] *= lut.shape[-1]
    return out.reshape(shape_out)


def _per_axis(v: np.ndarray, data: np.ndarray, axis: int | None) -> np.ndarray:
    """Broadcast a scalar-or-vector quantization parameter along `axis` of `data`."""
    v = np.asarray(v)
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * data.ndim
    shape[int(axis)] = -1
    return v.reshape(shape)


@register("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    q = quantized_data.astype(np.float32)
    zp = _per_axis(zero_point, q, axis).astype(np.float32)
    return (q - zp) * _per_axis(scale, q, axis)


@register("constexpr_cast")
def constexpr_cast(source_val, output_dtype):
    return source_val


@register("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(nonzero_data, mask, shape=None):
    if shape is not None:
        raise NotImplementedError("the iOS16 form of constexpr_sparse_to_dense; re-export at iOS18")
    out = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    out[mask != 0] = nonzero_data
    return out


@register("dequantize")
def dequantize(input, scale, zero_point=None, axis=None):
    x = input.astype(np.float32)
    if zero_point is not None:
        x = x - _per_axis(zero_point, x, axis).astype(np.float32)
    return x * _per_axis(scale, x, axis)


@register("quantize")
def quantize(input, scale, output_dtype, zero_point=None, axis=None):
    q = np.round(input / _per_axis(scale, input, axis))
    if zero_point is not None:
        q = q + _per_axis(zero_point, input, axis)
    info = np.iinfo(np.dtype(output_dtype))
    return np.clip(q, info.min, info.max)


