"""Numpy kernels for MIL tensor lists (`make_list`, `list_*`) and `reshape_like` (see `ops`).

A scripted torch loop that appends to a list and stacks it converts to a MIL list carried through a
`while_loop`. A list value is a `TensorList` (an immutable tuple of arrays plus its element dtype):
every write returns a new list, so a loop body never changes a value another op still reads.
Elements never written read as zeros of the declared element shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from perch.runtimes.mil.registry import register

_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}


class TensorList:
    """A MIL list value: `items[i]` is an array or None (never written)."""

    def __init__(self, items: tuple, elem_shape: tuple[int, ...] | None, dtype: Any, dynamic: bool) -> None:
        self.items, self.elem_shape, self.dtype, self.dynamic = items, elem_shape, dtype, dynamic

    def get(self, i: int) -> np.ndarray:
        item = self.items[i]
        if item is not None:
            return item
        if self.elem_shape is None:
            raise ValueError(f"list element {i} was never written and the list has no element shape")
        return np.zeros(self.elem_shape, dtype=self.dtype)

    def with_items(self, writes: dict[int, np.ndarray]) -> TensorList:
        n = max([len(self.items)] + [i + 1 for i in writes])
        if n > len(self.items) and not self.dynamic:
            raise IndexError(f"write at {n - 1} past the end of a fixed-length list of {len(self.items)}")
        items = list(self.items) + [None] * (n - len(self.items))
        for i, v in writes.items():
            items[i] = np.asarray(v)
        return TensorList(tuple(items), self.elem_shape, self.dtype, self.dynamic)


def _index(i: Any, n: int) -> int:
    i = int(np.ravel(i)[0])
    return i + n if i < 0 else i


@register("make_list")
def make_list(elem_shape=None, init_length=1, dynamic_length=True, dtype="fp32"):
    shape = None
    if elem_shape is not None and all(np.ndim(s) == 0 and not isinstance(s, str) for s in elem_shape):
        shape = tuple(int(s) for s in elem_shape)
    return TensorList((None,) * int(init_length), shape, _DTYPES[str(dtype)], bool(dynamic_length))


@register("list_length")
def list_length(ls):
    return np.int32(len(ls.items))


@register("list_write")
def list_write(ls, index, value):
    return ls.with_items({_index(index, len(ls.items)): value})


@register("list_read")
def list_read(ls, index):
    return ls.get(_index(index, len(ls.items)))


@register("list_gather")
def list_gather(ls, indices):
    n = len(ls.items)
    return np.stack([ls.get(_index(i, n)) for i in np.ravel(indices)])


@register("list_scatter")
def list_scatter(ls, indices, value):
    n = len(ls.items)
    return ls.with_items({_index(i, n): v for i, v in zip(np.ravel(indices), value)})


@register("reshape_like")
def reshape_like(x, ref_tensors, begins, ends, end_masks):
    # The output shape concatenates ref_tensors[i].shape[begins[i]:ends[i]] (end_masks[i]: to the end).
    shape: list[int] = []
    for ref, b, e, m in zip(ref_tensors, begins, ends, end_masks):
        dims = np.shape(ref)
        shape += list(dims[int(b):] if bool(m) else dims[int(b):int(e)])
    return np.reshape(x, shape)
