"""Core ML backend: a stateful iOS18 ML program, named the way swift-transformers loads a stateful LLM.

Pipeline: the architecture's `Stateful` module (fp16 state buffers updated in place) -> torch.jit.trace ->
ct.convert with fp16 `StateType`s and a ranged query length -> optional weight compression
(`perch.exporter.coreml_compress`) -> metadata -> `model.mlpackage`. With `multifunction`, the same trace is
converted twice (prefill: ranged length; decode: one token) and merged; `save_multifunction` then stores
each shared weight once, and both functions read and write the same states.

Names come from one naming function (`bindings`) over the architecture's "stateful" I/O spec: `inputIds`
(B, 1..max) int32, `causalMask` (B, 1, T, end) fp16 additive when the architecture attends (its length
places the new tokens at end-T..end-1, so one package serves prefill, decode and further chunks), states
`keyCache`/`valueCache` or `{kind}State`, output `logits` (B, T, vocab).
"""
from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perch.exporter import clients
from perch.exporter.coreml_compress import apply_compression, plan_compression
from perch.archs import arch_module
from perch.errors import PerchError
from perch.exporter.options import CoreMLOptions
from perch.loading import Checkpoint
from perch.spec import Binding, Manifest, ModelIO

PACKAGE = "model.mlpackage"
TARGET = "iOS18"
STATE_DTYPE = torch.float16  # Core ML states must be fp16 ("State only support fp16 dtype")
# The Core ML naming function's table: Apple's stateful-LLM recipe names, which swift-transformers detects.
NAMES = {"input_ids": "inputIds", "causal_mask": "causalMask", "logits": "logits"}
# Deployment targets by name, oldest first; states need iOS18 / macOS15 (specification version 9).
TARGETS = ("iOS15", "macOS12", "iOS16", "macOS13", "iOS17", "macOS14", "iOS18", "macOS15")
STATE_TARGETS = ("iOS18", "macOS15")
_SPEC_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


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
        eps = np.asarray(eps.val if eps is not None else 1e-5, dtype=np.float16 if x.dtype == types.fp16 else np.float32)
        axes = list(range(-len(shape.val), 0))
        context.add(mb.layer_norm(x=x, axes=axes, gamma=gamma, beta=beta, epsilon=eps, name=node.name))


def state_name(kind: str, profile: str = "default") -> str:
    """keyCache / valueCache for K,V (what swift-transformers looks for), {kind}State for any other state;
    a client profile may rename them (swift-transformers: Falcon-Mamba's conv/SSM states too)."""
    return clients.coreml_state_name(profile, kind) or {"key": "keyCache", "value": "valueCache"}.get(kind, f"{kind}State")


def bindings(io: ModelIO, profile: str = "default") -> tuple[Binding, ...]:
    """Canonical I/O -> Core ML features and layer-stacked states (layers first)."""
    out = [Binding(t.name, NAMES[t.name], "input", t.shape, t.dtype) for t in io.inputs]
    out += [Binding(t.name, NAMES[t.name], "output", t.shape, t.dtype) for t in io.outputs]
    out += [Binding(s.kind, state_name(s.kind, profile), "state", (s.num_layers, *s.shape), "float16") for s in io.states]
    return tuple(out)


def stateful_module(ckpt: Checkpoint, io: ModelIO, max_context: int, batch_size: int, dtype: torch.dtype,
                    profile: str = "default") -> nn.Module:
    """The architecture's stateful module with weights cast to `dtype` once each (tied tensors stay tied)."""
    mod = arch_module(ckpt.arch)
    cast: dict[int, torch.Tensor] = {}
    for v in ckpt.state_dict.values():
        if id(v) not in cast:
            cast[id(v)] = v.to(dtype) if v.is_floating_point() else v
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


def function_plan(options: CoreMLOptions) -> dict[str, int | None]:
    """Function name -> fixed query length (None: ranged). The first is the default function."""
    return {"prefill": None, "decode": 1} if options.multifunction else {"main": None}


def convert_functions(ckpt: Checkpoint, io: ModelIO, options: CoreMLOptions, max_context: int,
                      plan: dict[str, int | None]) -> tuple[dict, dict[str, str]]:
    """Trace once, convert each planned function. Returns ({name: MLModel}, weight kinds).

    The torch module is local: once this returns, the weights live on only in the programs' consts
    (which share the torch storage: one copy) and in each MLModel's saved weights on disk.
    """
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    module = stateful_module(ckpt, io, max_context, options.batch_size, dtype, options.profile)
    state_names = [state_name(s.kind, options.profile) for s in io.states]
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(io, options.batch_size), check_trace=False)
    parts = {name: convert_function(traced, module, io, state_names, max_context, options, q)
             for name, q in plan.items()}
    return parts, weight_kinds(module)


def release_program(model) -> None:
    """Drop an MLModel's in-memory program (its weights stay in the saved package on disk).

    Why: coremltools' compression and save_multifunction reload the program from disk; keeping this copy
    too would hold the weights twice. pymil programs are cyclic, so collect explicitly.
    """
    model._mil_program = None
    gc.collect()


def export(ckpt: Checkpoint, out_dir: str | Path, options: CoreMLOptions) -> Manifest:
    """Convert `ckpt` into `out_dir/model.mlpackage` and return its manifest (the driver saves it)."""
    out_dir = Path(out_dir)
    max_context = options.context_for(ckpt.config)
    clients.client(options.profile, "coreml", ckpt.arch)
    io = clients.coreml_io(options.profile, arch_module(ckpt.arch).io_spec(ckpt.config, max_context, "stateful",
                                                                           state_dtype="float16"))
    t0 = time.perf_counter()
    plan = function_plan(options)
    parts, kinds = convert_functions(ckpt, io, options, max_context, plan)
    quantization: dict = {"method": "none"}
    plans = {}
    if options.quantize != "none":
        plans = {n: plan_compression(m._mil_program, options.quantize, options.block_size, kinds) for n, m in parts.items()}
        quantization = next(iter(plans.values())).info
    for model in parts.values():
        release_program(model)
    if plans:
        from perch.exporter.calibration import calibration_for

        cal = calibration_for(ckpt, options)
        if cal is not None:
            quantization["calibration"] = cal.info
        for name in parts:  # one function at a time: each reloads its weights from disk
            parts[name] = apply_compression(parts[name], plans[name], options.block_size, kinds, cal)
            release_program(parts[name])
    _save(parts, out_dir / PACKAGE, scratch=out_dir)
    del parts
    names = bindings(io, options.profile)
    write_metadata(out_dir / PACKAGE, _metadata(ckpt, io, names, options, max_context))
    extras = {"deployment_target": TARGET, "default_function": next(iter(plan)),
              "clients": clients.support(options.profile, "coreml", ckpt.arch),
              "conversion_seconds": round(time.perf_counter() - t0, 2)}
    return Manifest(format="coreml", arch=ckpt.arch, io=io, hf_config=ckpt.config.to_dict(), max_context=max_context,
                    dtype=options.precision, bindings=names, profile=options.profile, batch_size=options.batch_size,
                    functions={name: ("ranged" if q is None else q) for name, q in plan.items()},
                    quantization=quantization, model_file=PACKAGE, extras=extras)


def _save(parts: dict, package: Path, scratch: Path) -> None:
    """One function: save as is. Several: save each, then merge (shared weights stored once)."""
    import coremltools as ct

    if len(parts) == 1:
        next(iter(parts.values())).save(str(package))
        return
    tmp = [scratch / f".{name}.mlpackage" for name in parts]
    try:
        for path, model in zip(tmp, parts.values()):
            model.save(str(path))
        desc = ct.utils.MultiFunctionDescriptor()
        for path, name in zip(tmp, parts):
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = next(iter(parts))
        ct.utils.save_multifunction(desc, str(package))
    finally:
        for path in tmp:
            shutil.rmtree(path, ignore_errors=True)


def _model_name(ckpt: Checkpoint) -> str:
    """What swift-transformers fetches config and tokenizer by: the hub id when there is one."""
    model = str(ckpt.source.get("model") or "")
    if model and not Path(model).expanduser().exists():
        return model
    return getattr(ckpt.config, "_name_or_path", "") or Path(ckpt.model_dir).name


def _metadata(ckpt: Checkpoint, io: ModelIO, names: tuple[Binding, ...], options: CoreMLOptions,
              max_context: int) -> dict:
    from perch import __version__

    arch = (getattr(ckpt.config, "architectures", None) or [""])[0]
    precision = options.precision if options.quantize == "none" else options.quantize
    states = ", ".join(b.name for b in names if b.role == "state")
    return {
        "author": "Perch",
        "short_description": f"{arch or ckpt.arch} ({precision}) with its state ({states}) as Core ML state, "
                             f"up to {max_context} tokens",
        "version": __version__,
        "user_defined": {
            # swift-transformers reads the name (LanguageModel.modelName); the rest follows HF exporters.
            "co.huggingface.exporters.name": _model_name(ckpt),
            "co.huggingface.exporters.task": "text-generation",
            "co.huggingface.exporters.architecture": arch,
            "co.huggingface.exporters.framework": "pytorch",
            "co.huggingface.exporters.precision": options.precision,
            "perch.version": __version__,
            "perch.arch": ckpt.arch,
            "perch.quantization": options.quantize,
            "perch.max_context": str(max_context),
        },
        "inputs": {NAMES["input_ids"]: "Token ids of the new tokens (batch, 1..max_context), int32",
                   NAMES["causal_mask"]: MASK_TEXT.get(io.mask, "")},
        "outputs": {NAMES["logits"]: "Next-token scores (batch, new tokens, vocab)"},
    }


MASK_TEXT = {
    "additive": "Additive causal mask (batch, 1, new tokens, stored + new tokens): 0 to attend, -1e4 to mask; its "
                "length sets the position of the new tokens",
    "additive_plus_one": "Additive mask (batch, 1, 1 or new tokens, stored + new tokens + 1), as swift-transformers "
                         "sends it: zeros attend (causality is applied inside), -1e4 masks padding; the last column is unused",
}


def write_metadata(package: Path, meta: dict) -> None:
    """Write author, description and user-defined metadata into the package's spec file in place."""
    from coremltools.proto import Model_pb2

    path = Path(package) / _SPEC_FILE
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    desc = spec.description
    desc.metadata.author = meta["author"]
    desc.metadata.shortDescription = meta["short_description"]
    desc.metadata.versionString = meta["version"]
    desc.metadata.userDefined.update(meta["user_defined"])
    features = list(desc.input) + list(desc.output) + [f for fn in desc.functions for f in (*fn.input, *fn.output)]
    for feature in features:
        text = meta["inputs"].get(feature.name) or meta["outputs"].get(feature.name)
        if text:
            feature.shortDescription = text
    path.write_bytes(spec.SerializeToString())
