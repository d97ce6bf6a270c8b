"""Tracing and converting one Core ML function: the pieces both the one-piece export (exporter/to_coreml.py)
and the pieced one (exporter/coreml_pieces.py) use: targets, the torch-frontend patches, the stateful
module, trace sizes, Core ML input/state types, the state-write check, weight kinds.
"""
from __future__ import annotations

import gc

import numpy as np
import torch
from torch import nn

from perch.archs import arch_module
from perch.errors import PerchError
from perch.exporter import clients
from perch.exporter.options import CoreMLOptions
from perch.loading import Checkpoint
from perch.spec import ModelIO

TARGET = "iOS18"
STATE_DTYPE = torch.float16  # Core ML states must be fp16 ("State only support fp16 dtype")
# The Core ML naming function's table: Apple's stateful-LLM recipe names, which swift-transformers detects.
NAMES = {"input_ids": "inputIds", "causal_mask": "causalMask", "logits": "logits"}
# Deployment targets by name, oldest first; states need iOS18 / macOS15 (specification version 9).
TARGETS = ("iOS15", "macOS12", "iOS16", "macOS13", "iOS17", "macOS14", "iOS18", "macOS15")
STATE_TARGETS = ("iOS18", "macOS15")


def check_target(target: str, has_states: bool = True):
    """The coremltools target for `target`; PerchError for an unknown name or states below iOS18."""
    import coremltools as ct

    if target not in TARGETS:
        raise PerchError(f"deployment target {target!r} is unknown; choose one of {', '.join(TARGETS)}")
    if has_states and target not in STATE_TARGETS:
        raise PerchError(f"deployment target {target} cannot hold Core ML states (K,V cache / SSM state): states "
                         "need iOS18 or macOS15; export with target iOS18")
    return getattr(ct.target, target)


def _patch_frontend() -> None:
    """Two coremltools 9 torch-frontend fixes, registered as op overrides (same semantics otherwise).

    `int`: coremltools folds `aten::Int` of a size with `int(x.val)`, which numpy 2 refuses for a 1-d array
    ("only 0-dimensional arrays can be converted to Python scalars"): any `x.shape[0]` used as a size fails.
    `layer_norm`: see below. Registering twice is harmless (override=True).
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import register_torch_op
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    @register_torch_op(torch_alias=["int"], override=True)
    def perch_scalar_int(context, node):
        x = _get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const():
            res = mb.const(val=int(np.asarray(x.val).reshape(-1)[0]), name=node.name)
        else:
            x = mb.squeeze(x=x, name=node.name + "_item") if len(x.shape) > 0 else x
            res = mb.cast(x=x, dtype="int32", name=node.name)
        context.add(res, node.name)

    @register_torch_op(torch_alias=["layer_norm"], override=True)
    def perch_layer_norm(context, node):
        # Why: coremltools makes epsilon an fp32 const even when gamma is fp16 (an fp16 trace), and the
        # MIL layer_norm wants them the same dtype. fp16 traces keep a 7B model at one fp16 copy.
        x, shape, gamma, beta, eps = _get_inputs(context, node, expected=[5, 6])[:5]
        if gamma is not None and x.dtype != gamma.dtype:
            # A pieced conversion's fp16 carry arrives cast to fp32 (the frontend's rule for fp16 inputs);
            # the fp16 pass folds this cast back out.
            x = mb.cast(x=x, dtype="fp16" if gamma.dtype == types.fp16 else "fp32", name=node.name + "_in")
        eps = np.asarray(eps.val if eps is not None else 1e-5, dtype=np.float16 if x.dtype == types.fp16 else np.float32)
        axes = list(range(-len(shape.val), 0))
        context.add(mb.layer_norm(x=x, axes=axes, gamma=gamma, beta=beta, epsilon=eps, name=node.name))


def state_name(kind: str, profile: str = "default") -> str:
    """keyCache / valueCache for K,V (what swift-transformers looks for), {kind}State for any other state;
    a client profile may rename them (swift-transformers: Falcon-Mamba's conv/SSM states too)."""
    return clients.coreml_state_name(profile, kind) or {"key": "keyCache", "value": "valueCache"}.get(kind, f"{kind}State")


def stateful_module(ckpt: Checkpoint, io: ModelIO, max_context: int, batch_size: int, dtype: torch.dtype | None,
                    profile: str = "default") -> nn.Module:
    """The architecture's stateful module with weights cast to `dtype` once each (tied tensors stay tied);
    dtype None keeps the stored tensors (the pieced conversion casts one piece at a time)."""
    mod = arch_module(ckpt.arch)
    cast: dict[int, torch.Tensor] = {}
    for v in ckpt.state_dict.values():
        if id(v) not in cast:
            cast[id(v)] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    sd = {k: cast[id(v)] for k, v in ckpt.state_dict.items()}
    del cast
    core = mod.build(ckpt.config, sd, max_context, scan="logdepth")  # logdepth: a fixed, traceable scan
    names = {s.kind: state_name(s.kind, profile) for s in io.states}
    return mod.stateful(core, batch_size, STATE_DTYPE, names, io.mask).eval()


# Trace sizes: 2 new tokens after 3 stored ones, so no size is 0 or 1 (those get specialised).
_SAMPLE = {"sequence": 2, "total_sequence": 5, "mask_rows": 2, "total_sequence_plus_one": 6}


def example_inputs(io: ModelIO, batch_size: int) -> tuple[torch.Tensor, ...]:
    sizes = {**_SAMPLE, "batch": batch_size}
    return tuple(torch.zeros([sizes.get(a, a) for a in t.shape], dtype=getattr(torch, t.dtype)) for t in io.inputs)


def coreml_inputs(io: ModelIO, batch_size: int, max_context: int, query_len: int | None) -> list:
    """One TensorType per input, named by `bindings`; the query length ranged 1..max unless fixed (decode)."""
    import coremltools as ct

    t = query_len or ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    dims = {"batch": batch_size, "sequence": t,
            "total_sequence": ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1),
            # swift-transformers' mask ("additive_plus_one"): one row, one column past the keys
            "mask_rows": ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1),
            "total_sequence_plus_one": ct.RangeDim(lower_bound=2, upper_bound=max_context + 1, default=2)}
    return [ct.TensorType(name=NAMES[s.name], shape=tuple(dims.get(a, a) for a in s.shape), dtype=np.dtype(s.dtype).type)
            for s in io.inputs]


def coreml_states(module: nn.Module, names: list[str]) -> list:
    import coremltools as ct

    return [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(module, n).shape), dtype=np.float16), name=n)
            for n in names]


def convert_function(traced, module: nn.Module, io: ModelIO, state_names: list[str], max_context: int,
                     options: CoreMLOptions, query_len: int | None = None, target: str = TARGET):
    """One Core ML function from the trace: ranged query length, or `query_len` fixed (decode)."""
    import coremltools as ct

    ct_target = check_target(target, has_states=bool(state_names))
    _patch_frontend()
    fp16 = options.precision == "fp16"
    model = ct.convert(
        traced,
        inputs=coreml_inputs(io, options.batch_size, max_context, query_len),
        outputs=[ct.TensorType(name=NAMES[t.name], dtype=np.float16 if fp16 else np.float32) for t in io.outputs],
        states=coreml_states(module, state_names),
        minimum_deployment_target=ct_target,
        compute_precision=compute_precision(fp16, getattr(arch_module(io.arch), "FP32_MODULES", ())),
        convert_to="mlprogram",
        skip_model_load=True,  # loading compiles with the Core ML framework: macOS only, and slow
    )
    check_state_writes(model._mil_program, state_names)
    return model


def compute_precision(fp16: bool, fp32_modules: tuple[str, ...] = ()):
    """coremltools' compute precision: fp32, or fp16 except the ops traced inside the module classes an
    architecture names in its optional `FP32_MODULES` (casts at their edges).

    Why: an RMS norm squares its input, and x^2 leaves fp16 above |x| = 256 (a trained Falcon-H1's residual
    reached 338 at a decode step: inf, then NaN logits); LLM exports keep such norms fp32 for that reason.
    """
    import coremltools as ct

    if not fp16:
        return ct.precision.FLOAT32
    if not fp32_modules:
        return ct.precision.FLOAT16
    from coremltools.converters.mil.mil.scope import ScopeSource

    keep = set(fp32_modules)

    def to_fp16(op) -> bool:
        return not keep.intersection(op.scopes.get(ScopeSource.TORCHSCRIPT_MODULE_TYPE, ()))

    return ct.transform.FP16ComputePrecision(op_selector=to_fp16)


def state_writes(program) -> dict[str, int]:
    """State name -> number of `coreml_update_state` ops writing it, over every function of `program`."""
    from coremltools.converters.mil.mil import types

    counts: dict[str, int] = {}
    for fn in program.functions.values():
        for name, var in fn.inputs.items():
            if types.is_state(var.sym_type):
                counts.setdefault(name, 0)
        for op in fn.operations:
            if op.op_type == "coreml_update_state":
                name = op.inputs["state"].name
                counts[name] = counts.get(name, 0) + 1
    return counts


def check_state_writes(program, state_names: list[str]) -> None:
    """Fail loudly when a state is never written: Core ML drops a write made through a view of a state
    buffer without any error (docs/traps.md, Core ML), which would make every later call see a stale cache."""
    counts = state_writes(program)
    unwritten = [n for n in state_names if counts.get(n, 0) == 0]
    if unwritten:
        raise RuntimeError(f"Core ML program never writes state(s) {unwritten}: a write through a view of a "
                           "state buffer was dropped by the converter; write through the root buffer (buf[i:j] = x)")


def weight_kinds(module: nn.Module) -> dict[str, str]:
    """Core ML const name -> "linear" | "embedding" for every weight compression may touch.

    coremltools names a traced parameter by its module path with dots as underscores.
    """
    kinds = {}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            kinds[f"{name}.weight".replace(".", "_")] = "linear" if isinstance(m, nn.Linear) else "embedding"
    return kinds


def drop_temp_package(model) -> None:
    """Delete the temporary .mlpackage coremltools wrote for `model` (ct.convert and compression each write
    one under the system temp dir), once its contents are saved elsewhere or compressed into a new model.

    Why: coremltools removes them only at interpreter exit, so a pieced 7B export kept every piece's copy
    until the end: ~200 MB per Falcon-Mamba-7B fp16 piece, 26 GB for its 132 pieces, beside the pieces and
    the package themselves (measured: /tmp filled during the export)."""
    import shutil

    if getattr(model, "is_temp_package", False) and getattr(model, "package_path", None):
        shutil.rmtree(model.package_path, ignore_errors=True)


def release_program(model) -> None:
    """Drop an MLModel's in-memory program (its weights stay in the saved package on disk).

    Why: coremltools' compression and save_multifunction reload the program from disk; keeping this copy
    too would hold the weights twice. pymil programs are cyclic, so collect explicitly.
    """
    model._mil_program = None
    gc.collect()
