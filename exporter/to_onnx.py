"""ONNX backend: trace an architecture's past/present module with torch's dynamo exporter, attach the
checkpoint's weights lazily, optionally quantize, and save (with external data when large).

Never two copies of the weights: the module is traced with stand-in weights (zero-stride views that own
no memory), and each initializer is bound to a lazy tensor that converts (and, for a linear layer,
transposes or quantizes) one checkpoint tensor at the moment it is written to disk. Peak memory is the
checkpoint as loaded (memory-mapped safetensors) plus one converted tensor.

Variants: "default" (explicit past/present tensors, optimum's naming, dynamic past length) and "inplace"
(Falcon: fixed-size K,V buffers updated by GroupQueryAttention, see exporter/onnx_gqa.py).
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import onnx_ir as ir
import torch

from perch.exporter import calibration, clients, onnx_fuse, onnx_logits, onnx_quant, onnx_tie
from perch.archs import arch_module
from perch.errors import PerchError
from perch.exporter.options import OnnxOptions
from perch.spec import Binding, Manifest, ModelIO

OPSET = 20  # LayerNormalization and Gelu as single ops; read by onnxruntime >= 1.17
# onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses (docs/traps.md, ONNX); 10 is read by ORT >= 1.16.
IR_VERSION = 10
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
# Above this many bytes of weights, write them to model.onnx.data: a protobuf cannot exceed 2 GiB, and a
# single-file save serializes the whole model in memory (~2x its size) where external data streams it.
EXTERNAL_DATA_THRESHOLD = 256 << 20
# Trace sizes: never 0 or 1, which torch.export specialises into constants (docs/traps.md, ONNX).
SAMPLE_SIZES = {"batch": 2, "sequence": 3, "context": 5}
PREFIX = "core."  # the wrappers keep the core as `self.core`: initializer names are "core." + state-dict key
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# torch's exporter warns once per torchvision op that it cannot register; Perch never uses torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


# ---- the ONNX naming function: canonical I/O -> ONNX names and dynamic axis names (optimum's convention)
ONNX_AXES = {"batch": "batch_size", "sequence": "sequence_length", "total_sequence": "total_sequence_length",
             "context": "past_sequence_length"}


def state_name(kind: str, layer: int, role: str, profile: str = "default") -> str:
    """optimum's names: past_key_values.{i}.key / present.{i}.key for K,V; past_{kind}_state.{i} otherwise,
    unless the client profile names the state its own way (transformers.js: past_conv.{i}, past_ssm.{i}).

    "key_value" is transformers.js' fused multi-query cache (exporter/clients.py, --for transformers.js)."""
    own = clients.onnx_state_name(profile, kind, layer, role)
    if own:
        return own
    if kind in ("key", "value", "key_value"):
        return f"past_key_values.{layer}.{kind}" if role == "past" else f"present.{layer}.{kind}"
    return f"past_{kind}_state.{layer}" if role == "past" else f"present_{kind}_state.{layer}"


def _axes(shape) -> tuple:
    return tuple(ONNX_AXES.get(a, a) if isinstance(a, str) else a for a in shape)


def bindings(io: ModelIO, profile: str = "default") -> tuple[Binding, ...]:
    """Every graph input and output, layer-major for the states (the order the graph declares them)."""
    out = [Binding(t.name, t.name, "input", _axes(t.shape), t.dtype) for t in io.inputs]
    out += [Binding(t.name, t.name, "output", _axes(t.shape), t.dtype) for t in io.outputs]
    for role in ("past", "present"):
        for i in range(io.num_layers):
            for s in io.states:
                shape = s.shape if role == "past" or "context" not in s.shape else \
                    tuple("total_sequence" if a == "context" else a for a in s.shape)
                out.append(Binding(f"{s.kind}.{i}", state_name(s.kind, i, role, profile), role, _axes(shape), s.dtype))
    return tuple(out)


def export(ckpt, out_dir: str | Path, options: OnnxOptions) -> Manifest:
    """Write `out_dir/model.onnx` (+ `model.onnx.data` when large) for `ckpt`; return its Manifest."""
    t0 = time.perf_counter()
    mod = arch_module(ckpt.arch)
    frontend = "inplace" if options.variant == "inplace" else "past_present"
    if frontend not in mod.FRONTENDS:
        raise PerchError(f"--variant {options.variant}: {ckpt.arch} has no {frontend} front-end (its states are "
                         "fixed-size already, and its default graph keeps them in place); export without --variant")
    profile = clients.client(options.profile, "onnx", ckpt.arch)
    if profile.fuse_kv and frontend == "inplace":
        raise PerchError(f"--for {profile.name} feeds each step's present cache back as the next past (a growing cache); "
                         "the in-place variant shares one buffer between them: export without --variant inplace")
    max_context = options.context_for(ckpt.config)
    dtype = TORCH_DTYPES[options.precision]
    model, io = build_graph(ckpt, max_context, dtype, frontend, profile=options.profile)
    t_trace = time.perf_counter() - t0
    quant = {"method": "none"}
    if options.quantize != "none":
        cal = calibration.calibration_for(ckpt, options)
        quant = onnx_quant.quantize(model, options.quantize, options.block_size, embedding=PREFIX + mod.EMBEDDING,
                                    calibration=cal, tied=onnx_tie.is_tied(ckpt.state_dict, mod.EMBEDDING))
    saved = save_model(model, out_dir, subfolder=profile.onnx_subfolder, data_file=profile.data_file)
    if options.quantize != "none":
        quant["size_bytes"] = saved["bytes"]
    extras = {
        "opset": OPSET, "ir_version": IR_VERSION,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "external_data": saved["external_data"], "export_seconds": round(time.perf_counter() - t0, 2), "trace_seconds": round(t_trace, 2),
        "lm_head": "separate from the embedding (untied), so MatMulNBits can quantize it",
        "clients": clients.support(options.profile, "onnx", ckpt.arch),
    }
    return Manifest(format="onnx", arch=ckpt.arch, io=io, hf_config=ckpt.config.to_dict(), max_context=max_context,
                    dtype=options.precision, bindings=bindings(io, options.profile), variant=options.variant,
                    profile=options.profile, quantization=quant, model_file=saved["files"][0], files=saved["files"],
                    model_bytes=saved["bytes"], extras=extras)


def build_graph(ckpt, max_context: int, dtype: torch.dtype, frontend: str = "past_present",
                profile: str = "default") -> tuple[ir.Model, ModelIO]:
    """Trace, bind the checkpoint's weights lazily, and clean up: an in-memory model ready to quantize or save."""
    mod = arch_module(ckpt.arch)
    io = mod.io_spec(ckpt.config, max_context, frontend, state_dtype=str(dtype).removeprefix("torch."))
    io = clients.onnx_io(profile, io, ckpt.config)
    core = mod.build(ckpt.config, stand_in_weights(ckpt.state_dict, dtype), max_context, scan="scan")
    translations = {}
    if frontend == "inplace":
        from perch.exporter import onnx_gqa

        wrapper, translations = onnx_gqa.Inplace(core), onnx_gqa.TRANSLATIONS
    elif io.frontend == "past_present_fused":
        from perch.exporter.onnx_fused_kv import FalconFusedKV

        wrapper = FalconFusedKV(core)
    else:
        wrapper = mod.past_present(core)
    model = trace(wrapper, io, dtype, translations, profile)
    fold_weight_transposes(model, ckpt.state_dict, dtype)
    bind_weights(model, ckpt.state_dict, dtype)
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(model)  # folds only small constants (input size limit), never the weights
    onnx_fuse.apply(model)  # same math in kernels ORT runs faster on CPU (exporter/onnx_fuse.py)
    onnx_logits.add_logits_to_keep(model)  # an optional input: a prefill's lm_head for its last positions only
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "perch", _perch_version()
    variant = "inplace" if frontend == "inplace" else "default"
    # The graph's own record of its context (rotary tables, buffers): a runtime compares the manifest with it.
    model.metadata_props.update({"perch.arch": ckpt.arch, "perch.variant": variant, "perch.max_context": str(max_context)})
    return model, io


def stand_in_weights(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero-stride views with the checkpoint's shapes: tracing needs shapes and dtypes, not values."""
    return {k: torch.zeros((), dtype=dtype if v.is_floating_point() else v.dtype).expand(v.shape)
            for k, v in state_dict.items()}


def _example(shape, dtype: torch.dtype, sizes: dict[str, int]) -> tuple[torch.Tensor, dict[int, str]]:
    dims = [sizes[a] if isinstance(a, str) else a for a in shape]
    axes = {i: ONNX_AXES.get(a, a) for i, a in enumerate(shape) if isinstance(a, str)}
    if dtype == torch.int64:
        return torch.ones(dims, dtype=dtype), axes
    return torch.randn(dims).to(dtype), axes


def example_inputs(io: ModelIO, dtype: torch.dtype) -> tuple[tuple, tuple]:
    """Trace inputs and their dynamic axes, by the names and axes `io` declares."""
    sizes = {**SAMPLE_SIZES, "total_sequence": SAMPLE_SIZES["context"] + SAMPLE_SIZES["sequence"]}
    args, dyn = [], []
    for spec in io.inputs:
        t, axes = _example(spec.shape, getattr(torch, spec.dtype), sizes)
        if spec.name == "position_ids":  # positions of the new tokens after the sample past
            t = torch.arange(sizes["context"], sizes["total_sequence"]).expand(t.shape).contiguous()
        args.append(t)
        dyn.append(axes)
    past_dyn = []
    for i in range(io.num_layers):
        for s in io.states:
            t, axes = _example(s.shape, getattr(torch, s.dtype), sizes)
            args.append(t)
            past_dyn.append(axes)
    return tuple(args), (*dyn, tuple(past_dyn))


def trace(wrapper: torch.nn.Module, io: ModelIO, dtype: torch.dtype, translations: dict,
          profile: str = "default") -> ir.Model:
    """torch.onnx's dynamo exporter, unoptimized (we fold and bind the weights ourselves first)."""
    args, dynamic_shapes = example_inputs(io, dtype)
    names = bindings(io, profile)
    names_in = [b.name for b in names if b.role in ("input", "past")]
    names_out = [b.name for b in names if b.role in ("output", "present")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's deprecation chatter about dynamic-shape renames
        program = torch.onnx.export(
            wrapper.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=names_in,
            output_names=names_out, opset_version=OPSET, optimize=False, verbose=False,
            custom_translation_table=translations or None,
        )
    return program.model


def _source_key(value: ir.Value, state_dict: dict) -> str | None:
    if value.name and value.name.startswith(PREFIX) and value.name[len(PREFIX):] in state_dict:
        return value.name[len(PREFIX):]
    return None


def _lazy(fn, dtype: ir.DataType, shape, name: str) -> ir.LazyTensor:
    return ir.LazyTensor(fn, dtype, ir.Shape(list(shape)), name=name)


def _to_numpy(t: torch.Tensor, dtype: torch.dtype):
    """One checkpoint tensor in the export dtype, as a contiguous numpy array (a copy of this tensor only)."""
    t = t.detach()
    if t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().numpy()


def fold_weight_transposes(model: ir.Model, state_dict: dict, dtype: torch.dtype) -> None:
    """Transpose(weight) -> a transposed weight computed at save time: a linear layer becomes MatMul(x, W^T)
    without a second copy in memory, and the quantizer sees each weight as one initializer."""
    for node in list(model.graph):
        if node.op_type != "Transpose" or not node.inputs[0].is_initializer():
            continue
        key = _source_key(node.inputs[0], state_dict)
        if key is None or len(node.inputs[0].shape) != 2:
            continue
        src, out = state_dict[key], node.outputs[0]
        shape = list(reversed(list(node.inputs[0].shape)))
        value = ir.Value(name=node.inputs[0].name + ".T", shape=ir.Shape(shape), type=node.inputs[0].type)
        value.const_value = _lazy(lambda src=src: ir.tensor(_to_numpy(src, dtype).T.copy()),
                                  node.inputs[0].dtype, shape, value.name)
        # The quantizer wants the (out, in) layout back: hand it the source, not a transpose of a transpose.
        value.meta[onnx_quant.WEIGHT_OUT_IN] = lambda src=src: _to_numpy(src, dtype)
        model.graph.register_initializer(value)
        out.replace_all_uses_with(value)
        model.graph.remove(node, safe=True)


def bind_weights(model: ir.Model, state_dict: dict, dtype: torch.dtype) -> None:
    """Point every stand-in initializer at its checkpoint tensor (lazily); drop the ones no longer used."""
    for name, value in list(model.graph.initializers.items()):
        key = _source_key(value, state_dict)
        if key is None:
            continue
        if not value.uses() and not value.is_graph_output():
            del model.graph.initializers[name]
            continue
        src = state_dict[key]
        value.const_value = _lazy(lambda src=src: ir.tensor(_to_numpy(src, dtype)), value.dtype, value.shape, name)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, out_dir: str | Path, threshold: int | None = None, subfolder: str = "",
               data_file: str = DATA_FILE) -> dict:
    """Save as `[subfolder/]model.onnx`, the weights in `data_file` beside it above the threshold.

    `subfolder` and `data_file` follow a client's convention (transformers.js: onnx/, model.onnx_data)."""
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    out_dir = Path(out_dir)
    (out_dir / subfolder).mkdir(parents=True, exist_ok=True)
    external = weight_bytes(model) > threshold
    model_path = Path(subfolder) / MODEL_FILE
    from perch.progress import progress

    lazy = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    with progress(len(lazy), "ONNX weights", unit="tensor") as bar:
        _count_writes(lazy, bar)
        try:
            ir.save(model, out_dir / model_path, external_data=data_file if external else None)
        except (ValueError, OSError) as e:  # protobuf "Failed to serialize proto", disk full
            raise PerchError(f"writing {out_dir / model_path} failed ({e}); check free disk space") from e
    files = [str(model_path)] + ([str(Path(subfolder) / data_file)] if external else [])
    return {"external_data": external, "files": files, "bytes": sum((out_dir / f).stat().st_size for f in files)}


def _count_writes(values: list, bar) -> None:
    """Advance `bar` as each lazy weight is computed (the writer computes them one at a time, in order)."""
    for v in values:
        t = v.const_value
        v.const_value = ir.LazyTensor(lambda t=t, name=v.name: _advanced(t, bar, name), t.dtype, t.shape, name=t.name)


def _advanced(t, bar, name: str):
    out = t._evaluate() if hasattr(t, "_evaluate") else ir.tensor(t.numpy())
    bar.advance(1, name)
    return out


def _perch_version() -> str:
    from perch import __version__

    return __version__


def quantize_artifact(src: str | Path, out: str | Path, method: str, block_size: int = 32,
                      calibration: calibration.Calibration | None = None) -> Manifest:
    """Quantize an existing float ONNX export into a new directory, without tracing again.

    The float weights stream from `src`'s files (external data is memory-mapped), one tensor at a time.
    GPTQ recipes need `calibration` (`perch.exporter.calibration.calibrate(checkpoint)`); without it their
    linear layers use the scale search, and the manifest notes it.
    """
    from perch.exporter.export import copy_side_files
    from perch.staging import check_destination, staged_dir

    src, out = Path(src), Path(out)
    manifest = Manifest.load(src)
    if manifest.format != "onnx" or manifest.quantization.get("method", "none") != "none":
        raise PerchError(f"{src}: quantize_artifact needs an unquantized ONNX export (this one is "
                         f"{manifest.format}, quantization {manifest.quantization.get('method')})")
    check_destination(out)
    model = ir.load(src / manifest.model_file)
    embedding = PREFIX + arch_module(manifest.arch).EMBEDDING
    # The float export stores equal tables when the config ties them (transformers ties them at load too).
    quant = onnx_quant.quantize(model, method, block_size, embedding=embedding, calibration=calibration,
                                tied=bool(manifest.hf_config.get("tie_word_embeddings")))
    with staged_dir(out) as tmp:
        profile = clients.client(manifest.profile, "onnx")  # keep the source's client layout
        saved = save_model(model, tmp, subfolder=profile.onnx_subfolder, data_file=profile.data_file)
        copy_side_files(src, tmp)
        manifest.quantization = {**quant, "size_bytes": saved["bytes"]}
        manifest.files, manifest.model_bytes = saved["files"], saved["bytes"]
        manifest.extras.update(external_data=saved["external_data"], quantized_from=str(src))
        manifest.extras["client_files"] = clients.write_side_files(manifest, tmp)
        manifest.save(tmp)
    return manifest
