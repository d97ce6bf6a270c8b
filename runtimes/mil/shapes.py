"""Load-time shape checks at a function's default input shapes, as Core ML compiles a program.

Core ML specialises a program with flexible inputs at their default shapes when it loads it, and refuses
to load one whose ops disagree there: `stack` of a (2, 3, 4) tensor with a (2, 3, RangeDim(default=2))
one fails even if every prediction would feed size 4 (coremltools' TestStack::test_stack_dynamic_range_dim
expects that error). A numpy executor would happily stack the runtime arrays, so we check at load.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from perch.errors import PerchError

# Ops whose tensor inputs must agree in shape: all dims (stack), or all but the axis (concat).
_SAME_SHAPE = {"stack": None, "concat": "axis"}


def _defaults(fn: Any, inputs: tuple) -> dict[Any, int]:
    """Each symbolic input dim (a sympy symbol in the MIL types) -> its default size."""
    subs: dict[Any, int] = {}
    for t in inputs:
        for dim, n in zip(fn.inputs[t.name].shape, t.shape):
            if not isinstance(dim, (int, np.integer)):
                subs[dim] = int(n)
    return subs


def _at_defaults(var: Any, subs: dict[Any, int]) -> tuple[int | None, ...]:
    return tuple(int(d) if isinstance(d, (int, np.integer)) else subs.get(d) for d in var.shape)


def _conflict(shapes: list[tuple[int | None, ...]], skip: int | None) -> bool:
    if len({len(s) for s in shapes}) > 1:
        return False  # rank mismatch is the converter's business, not a default-shape effect
    for axis in range(len(shapes[0])):
        known = {s[axis] for s in shapes if s[axis] is not None}
        if axis != skip and len(known) > 1:
            return True
    return False


def check_default_shapes(fn: Any, inputs: tuple, function_name: str) -> None:
    """Raise PerchError naming the first stack/concat whose inputs disagree at the default shapes."""
    subs = _defaults(fn, inputs)
    if subs:
        _check_block(fn, subs, function_name)


def _check_block(block: Any, subs: dict[Any, int], function_name: str) -> None:
    for op in block.operations:
        for nested in op.blocks:
            _check_block(nested, subs, function_name)
        if op.op_type not in _SAME_SHAPE or len(op.values) < 2:
            continue
        shapes = [_at_defaults(v, subs) for v in op.values]
        skip = None
        if _SAME_SHAPE[op.op_type] == "axis" and op.axis.val is not None:
            skip = int(op.axis.val) % max(len(shapes[0]), 1)
        if _conflict(shapes, skip):
            raise PerchError(
                f"Core ML op '{op.op_type}' ({op.name}) in function {function_name} gets inputs of shapes "
                f"{shapes} at the model's default input shapes; Core ML compiles flexible inputs at their "
                "defaults and refuses to load this model: give the flexible inputs defaults that agree "
                "(ct.RangeDim(default=...))"
            )
