"""Perch's own Core ML executor: run a saved `.mlpackage` (MIL program + weights) in numpy, on any OS.

Core ML's runtime exists only on Apple platforms; coremltools can still load a package's MIL program on
Linux (`MilProgram`). `MilExecutor` compiles one function of it into a flat plan once (constants and
constexpr dequantization evaluated at load, unknown ops rejected at load) and then runs it op by op,
rounding each result to the dtype the program declares: an fp16 op yields np.float16, so Core ML's fp16
rounding is emulated per op. Core ML states are a dict of fp16 arrays (`make_state`).

    ex = MilExecutor("model.mlpackage")
    state = ex.make_state()
    out = ex.predict({"input_ids": ids}, state)   # state is updated in place (its entries replaced)
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from perch.errors import PerchError
from perch.runtimes.mil import ops as mil_ops
from perch.runtimes.mil.program import MilProgram, MilTensor, PackedBlob, weight_bytes
from perch.runtimes.mil.shapes import check_default_shapes

__all__ = ["MilExecutor", "MilProgram", "MilTensor", "load_program", "program_op_types", "unsupported_ops"]

_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)
_CONTROL = ("while_loop", "cond", "read_state", "write_state", "coreml_update_state")
# A plain value or an environment slot: (key, const, upcast). key None -> the const value.
_Ref = tuple[str | None, Any, bool]


@dataclass
class _Step:
    op_type: str
    name: str
    fn: Callable[..., Any]
    const_kw: dict[str, Any]
    var_kw: tuple[tuple[str, str, bool], ...]  # (param, env key, upcast fp16 -> fp32)
    list_kw: tuple[tuple[str, tuple[_Ref, ...]], ...]
    outs: tuple[str, ...]
    dtypes: tuple[np.dtype | None, ...]
    shapes: tuple[tuple[int | None, ...] | None, ...]
    blocks: tuple[_Plan, ...] = ()
    control: bool = False


@dataclass
class _Plan:
    inputs: tuple[str, ...]  # env keys bound to the block's inputs (loop vars)
    steps: tuple[_Step, ...]
    outputs: tuple[_Ref, ...]


LAZY_ABOVE = 1 << 30  # weight bytes above which weights are dequantized per use (auto)
LAZY_TENSOR = 1 << 12  # fp16 consts at least this many values stay fp16 and are upcast per use in lazy mode
# Inputs an op only moves (their values reach the output unchanged, and the output is rounded to the same
# dtype): upcasting them first would copy a whole fp16 table to fp32 to gather one row of it (1 GB for a 7B
# embedding, per call with lazy weights).
_MOVED_AS_STORED = {("gather", "x")}


def load_program(path: str | os.PathLike) -> MilProgram:
    """Load a package to run: a large one (lazy weights) keeps its sub-byte codes packed in the weight file."""
    return MilProgram.load(path, packed=weight_bytes(path) > LAZY_ABOVE)


def _keys_used(step: _Step) -> set[str]:
    keys = {k for _, k, _ in step.var_kw} | {r[0] for _, refs in step.list_kw for r in refs if r[0]}
    for b in step.blocks:
        for s in b.steps:
            keys |= _keys_used(s)
        keys |= {r[0] for r in b.outputs if r[0]}
    return keys


def _frees(plan: _Plan) -> tuple[tuple[str, ...], ...]:
    """For each top-level step, the environment keys whose last use it is (outputs excepted)."""
    last: dict[str, int] = {}
    for i, st in enumerate(plan.steps):
        for key in _keys_used(st):
            last[key] = i
    keep = {r[0] for r in plan.outputs if r[0]}
    out: list[list[str]] = [[] for _ in plan.steps]
    for key, i in last.items():
        if key not in keep:
            out[i].append(key)
    return tuple(tuple(f) for f in out)


def program_op_types(block: Any) -> set[str]:
    """Every op type in a pymil block or function, nested blocks included."""
    found: set[str] = set()
    for op in block.operations:
        found.add(op.op_type)
        for nested in op.blocks:
            found |= program_op_types(nested)
    return found


def unsupported_ops(op_types: set[str]) -> list[str]:
    """The op types among `op_types` that the executor has no kernel for, sorted."""
    return sorted(set(op_types) - set(mil_ops.OPS) - set(_CONTROL) - {"const"})


def _declared(var: Any) -> tuple[np.dtype | None, tuple[int | None, ...] | None]:
    """A var's numpy dtype and shape (None for symbolic dims); (None, None) for lists/strings/states."""
    from coremltools.converters.mil.mil import types

    sym = var.sym_type
    if types.is_tensor(sym):
        shape = tuple(int(s) if isinstance(s, (int, np.integer)) else None for s in sym.get_shape())
        prim = sym.get_primitive()
    elif types.is_scalar(sym):
        shape, prim = (), sym
    else:
        return None, None
    if prim == types.str:
        return None, None
    return np.dtype(types.nptype_from_builtin(prim)), shape


def _as_output(value: Any) -> Any:
    """Core ML's output convention: a model output is a multiarray of rank >= 1, so a rank-0 result
    (a full reduction, a scalar index) comes back with shape (1,)."""
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        return np.reshape(value, (1,))
    return value


def _env_value(env: dict[str, Any], key: str, upcast: bool) -> Any:
    v = env[key]
    if isinstance(v, PackedBlob):
        return v.unpack()
    return v.astype(np.float32) if upcast else v


def _shape_ok(shape: tuple[int, ...], declared: tuple[int | None, ...]) -> bool:
    return len(shape) == len(declared) and all(d is None or d == n for n, d in zip(shape, declared))


class MilExecutor:
    """Run one function of a `.mlpackage` with numpy; see the module docstring.

    `function_name` None picks the package's default function ("main" for a single-function package).
    """

    def __init__(self, path: str | os.PathLike | MilProgram, function_name: str | None = None,
                 lazy_weights: bool | None = None) -> None:
        # Lazy weights: dequantize and upcast each weight when an op uses it, and drop it after its last
        # use, instead of holding every weight dequantized and in fp32 from load (4x a 7B fp16 program).
        # Sub-byte codes then stay packed in the memory-mapped weight file until an op unpacks them.
        self.program = path if isinstance(path, MilProgram) else load_program(path)
        self.lazy = weight_bytes(self.program.path) > LAZY_ABOVE if lazy_weights is None else lazy_weights
        self._lazy_consts: dict[str, Any] = {}
        self.function_name = function_name or self.program.default_function
        fn = self.program.function(self.function_name)
        self.op_types = program_op_types(fn)
        self._check_supported()
        self.inputs = self.program.inputs(self.function_name)
        check_default_shapes(fn, self.inputs, self.function_name)
        self.states = self.program.states(self.function_name)
        self.outputs = tuple(v.name for v in fn.outputs)
        self._keys: dict[int, str] = {}
        self._used: set[str] = set()
        self._consts: dict[str, Any] = {}
        self._consts32: dict[str, Any] = {}
        self._input_keys = {name: self._key(var) for name, var in fn.inputs.items()}
        self._plan = self._compile(fn)
        self._frees = _frees(self._plan) if self.lazy else None

    # ---- load-time compilation ------------------------------------------------------------------

    def _check_supported(self) -> None:
        unknown = unsupported_ops(self.op_types)
        if unknown:
            ops = ", ".join(f"'{t}'" for t in unknown)
            noun = "op" if len(unknown) == 1 else "ops"
            verb = "is" if len(unknown) == 1 else "are"
            raise PerchError(
                f"Core ML {noun} {ops} (in function {self.function_name}) {verb} not supported by Perch's "
                f"executor; add a kernel to runtimes/mil/ops.py (OPS) or export the model without {noun} {ops}"
            )

    def _key(self, var: Any) -> str:
        key = self._keys.get(id(var))
        if key is None:
            key = var.name
            while key in self._used:  # sibling blocks (while_loop cond/body) reuse input names
                key += "'"
            self._keys[id(var)] = key
            self._used.add(key)
        return key

    def _ref(self, var: Any, upcast: bool) -> _Ref:
        key = self._key(var)
        if key in self._lazy_consts:  # a big weight: seeded into each call's environment, upcast on use
            return key, None, upcast and self._lazy_consts[key].dtype == _F16
        if key in self._consts:
            return None, self._const_value(key, upcast), False
        return key, None, upcast and _declared(var)[0] == _F16

    def _const_value(self, key: str, upcast: bool) -> Any:
        v = self._consts[key]
        if not upcast or getattr(v, "dtype", None) != _F16:
            return v
        if key not in self._consts32:  # fp16 weights are upcast once, shared by every op using them
            self._consts32[key] = v.astype(np.float32)
        return self._consts32[key]

    def _compile(self, block: Any, inputs: tuple = ()) -> _Plan:
        steps = []
        for op in block.operations:
            if op.op_type == "const":
                self._set_const(op.outputs[0], op.outputs[0].val)
                continue
            step = self._make_step(op)
            if self.lazy and op.op_type.startswith("constexpr_"):
                steps.append(step)  # dequantized per call, dropped after its last use
            elif not step.control and not step.var_kw and all(r[0] is None for _, refs in step.list_kw for r in refs):
                self._fold(step, op)  # every input is constant: evaluate once now (constexpr_* included)
            else:
                steps.append(step)
        outputs = tuple(self._ref(v, upcast=False) for v in block.outputs)
        return _Plan(tuple(self._key(v) for v in inputs), tuple(steps), outputs)

    def _set_const(self, var: Any, value: Any) -> None:
        blob = self.program.packed_blob(value)
        if blob is not None:  # sub-byte codes left in the weight file: unpacked by each call (lazy) or now
            if self.lazy:
                self._lazy_consts[self._key(var)] = blob
                return
            value = blob.unpack()
        dtype, _ = _declared(var)
        if dtype is not None:
            value = np.asarray(value).astype(dtype, copy=False)
        if self.lazy and getattr(value, "dtype", None) == _F16 and value.size >= LAZY_TENSOR:
            self._lazy_consts[self._key(var)] = value
            return
        self._consts[self._key(var)] = value

    def _fold(self, step: _Step, op: Any) -> None:
        try:
            result = step.fn(**step.const_kw, **{p: [r[1] for r in refs] for p, refs in step.list_kw})
        except Exception as e:
            raise PerchError(f"Core ML op '{op.op_type}' ({op.name}) in function {self.function_name} "
                             f"could not be evaluated at load: {type(e).__name__}: {e}") from e
        results = result if isinstance(result, tuple) else (result,)
        for var, value in zip(op.outputs, results):
            self._set_const(var, value)

    def _make_step(self, op: Any) -> _Step:
        from coremltools.converters.mil.mil import types

        control = op.op_type in _CONTROL
        upcast = not control  # kernels compute in fp32; control flow and state ops move values as declared
        const_kw, var_kw, list_kw = {}, [], []
        for param, arg in op.inputs.items():
            if isinstance(arg, (list, tuple)):
                list_kw.append((param, tuple(self._ref(v, upcast) for v in arg)))
            elif types.is_state(arg.sym_type):
                const_kw[param] = arg.name  # state ops address the state by name
            else:
                key, value, up = self._ref(arg, upcast and (op.op_type, param) not in _MOVED_AS_STORED)
                if key is None:
                    const_kw[param] = value
                else:
                    var_kw.append((param, key, up))
        blocks = tuple(self._compile(b, tuple(b.inputs)) for b in op.blocks)
        declared = [_declared(v) for v in op.outputs]
        fn = getattr(self, f"_op_{op.op_type}") if control else mil_ops.OPS[op.op_type]
        return _Step(op.op_type, op.name, fn, const_kw, tuple(var_kw), tuple(list_kw),
                     tuple(self._key(v) for v in op.outputs), tuple(d for d, _ in declared),
                     tuple(s for _, s in declared), blocks, control)

    def constant(self, name: str) -> Any:
        """A value fixed at load (a const, or a folded op such as a constexpr dequantization), by var name."""
        return self._consts[name]

    @property
    def per_call_ops(self) -> list[str]:
        """Op types the top-level block runs on every call, in order: constants are already folded."""
        return [s.op_type for s in self._plan.steps]

    # ---- running --------------------------------------------------------------------------------

    def make_state(self) -> dict[str, np.ndarray]:
        """Fresh Core ML state: zeros shaped and typed (fp16) as the function declares."""
        return {s.name: np.zeros(s.shape, dtype=s.dtype) for s in self.states}

    def predict(
        self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the function. `state` (from `make_state`) is read and its entries replaced by state writes;
        None runs from a fresh zero state that is then discarded."""
        env = self._check_inputs(inputs)
        env.update(self._lazy_consts)
        state = self._check_state(state)
        self._run(self._plan, env, state, self._frees)
        return {name: _as_output(self._resolve(ref, env)) for name, ref in zip(self.outputs, self._plan.outputs)}

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        expected = {t.name for t in self.inputs}
        if set(inputs) != expected:
            raise PerchError(
                f"{self.function_name}: inputs {sorted(inputs)} do not match the model's inputs {sorted(expected)}"
                f" (missing {sorted(expected - set(inputs))}, unexpected {sorted(set(inputs) - expected)})"
            )
        env = {}
        for t in self.inputs:
            a = np.asarray(inputs[t.name])
            if a.dtype.kind != t.dtype.kind and not (a.dtype.kind in "iu" and t.dtype.kind in "iu"):
                raise PerchError(f"input '{t.name}': expected dtype {t.dtype}, got {a.dtype}")
            if t.dtype.kind in "iu" and a.size and (a.min() < np.iinfo(t.dtype).min or a.max() > np.iinfo(t.dtype).max):
                raise PerchError(f"input '{t.name}': values do not fit the declared dtype {t.dtype}")
            if not t.accepts(a.shape):
                raise PerchError(f"input '{t.name}': expected shape {t.describe()}, got {a.shape}")
            env[self._input_keys[t.name]] = a.astype(t.dtype, copy=False)
        return env

    def _check_state(self, state: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if state is None:
            return self.make_state()
        for s in self.states:
            got = state.get(s.name)
            if got is None or got.shape != s.shape or got.dtype != s.dtype:
                what = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
                raise PerchError(f"state '{s.name}': expected {s.dtype}{list(s.shape)}, got {what}; "
                                 "create it with make_state()")
        return state

    @staticmethod
    def _resolve(ref: _Ref, env: dict[str, Any]) -> Any:
        key, value, up = ref
        return value if key is None else _env_value(env, key, up)

    def _run(self, plan: _Plan, env: dict[str, Any], state: dict[str, np.ndarray],
             frees: tuple[tuple[str, ...], ...] | None = None) -> None:
        for i, st in enumerate(plan.steps):
            kw = dict(st.const_kw)
            for param, key, up in st.var_kw:
                kw[param] = _env_value(env, key, up)
            for param, refs in st.list_kw:
                kw[param] = [self._resolve(r, env) for r in refs]
            try:
                result = st.fn(st, kw, env, state) if st.control else st.fn(**kw)
            except PerchError:
                raise
            except Exception as e:
                raise PerchError(f"Core ML op '{st.op_type}' ({st.name}) in function {self.function_name} "
                                 f"failed: {type(e).__name__}: {e}") from e
            self._store(st, result, env)
            for key in frees[i] if frees else ():
                env.pop(key, None)

    def _store(self, st: _Step, result: Any, env: dict[str, Any]) -> None:
        results = result if isinstance(result, tuple) else (result,)
        for key, dtype, shape, value in zip(st.outs, st.dtypes, st.shapes, results):
            if dtype is not None:
                # Round to the declared dtype: fp16 ops were computed in fp32 and lose precision only
                # here, as Core ML's CPU/GPU fp16 kernels accumulate in higher precision.
                value = np.asarray(value).astype(dtype, copy=False)
                if shape is not None and not _shape_ok(value.shape, shape):
                    raise RuntimeError(f"executor bug: op '{st.op_type}' ({st.name}) produced shape "
                                       f"{value.shape}, the program declares {shape}")
            env[key] = value

    # ---- control flow and state ops (need the environment, not just values) ---------------------

    def _op_read_state(self, st: _Step, kw: dict, env: dict, state: dict) -> np.ndarray:
        return state[kw["input"]]

    def _op_coreml_update_state(self, st: _Step, kw: dict, env: dict, state: dict) -> np.ndarray:
        name = kw["state"]
        state[name] = np.array(kw["value"], dtype=state[name].dtype)  # a copy: earlier reads stay valid
        return kw["value"]

    def _op_write_state(self, st: _Step, kw: dict, env: dict, state: dict) -> tuple:
        state[kw["input"]] = np.array(kw["data"], dtype=state[kw["input"]].dtype)
        return ()

    def _op_while_loop(self, st: _Step, kw: dict, env: dict, state: dict) -> tuple:
        cond, body = st.blocks
        values = kw["loop_vars"]
        while True:
            env.update(zip(cond.inputs, values))
            self._run(cond, env, state)
            if not bool(self._resolve(cond.outputs[0], env)):
                return tuple(values)
            env.update(zip(body.inputs, values))
            self._run(body, env, state)
            values = [self._resolve(r, env) for r in body.outputs]

    def _op_cond(self, st: _Step, kw: dict, env: dict, state: dict) -> tuple:
        branch = st.blocks[0] if bool(kw["pred"]) else st.blocks[1]
        self._run(branch, env, state)
        return tuple(self._resolve(r, env) for r in branch.outputs)
