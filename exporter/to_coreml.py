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

import shutil
import time
from pathlib import Path

import torch

from perch.exporter import clients, coreml_pieces
from perch.exporter.coreml_compress import apply_compression, plan_compression
from perch.archs import arch_module
from perch.errors import PerchError
from perch.exporter.options import CoreMLOptions
from perch.loading import Checkpoint
from perch.spec import Binding, Manifest, ModelIO

from perch.exporter.coreml_trace import (  # noqa: F401 (re-exported: the backend's public names)
    NAMES, STATE_DTYPE, STATE_TARGETS, TARGET, TARGETS, _SAMPLE, _patch_frontend, check_state_writes, check_target,
    compute_precision, coreml_inputs, coreml_states, convert_function, drop_temp_package, example_inputs, release_program,
    state_name,
    state_writes,
    stateful_module, weight_kinds)

PACKAGE = "model.mlpackage"
_SPEC_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


def bindings(io: ModelIO, profile: str = "default") -> tuple[Binding, ...]:
    """Canonical I/O -> Core ML features and layer-stacked states (layers first)."""
    out = [Binding(t.name, NAMES[t.name], "input", t.shape, t.dtype) for t in io.inputs]
    out += [Binding(t.name, NAMES[t.name], "output", t.shape, t.dtype) for t in io.outputs]
    out += [Binding(s.kind, state_name(s.kind, profile), "state", (s.num_layers, *s.shape), "float16") for s in io.states]
    return tuple(out)


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


def export(ckpt: Checkpoint, out_dir: str | Path, options: CoreMLOptions) -> Manifest:
    """Convert `ckpt` into `out_dir/model.mlpackage` and return its manifest (the driver saves it)."""
    out_dir = Path(out_dir)
    max_context = options.context_for(ckpt.config)
    clients.client(options.profile, "coreml", ckpt.arch)
    io = clients.coreml_io(options.profile, arch_module(ckpt.arch).io_spec(ckpt.config, max_context, "stateful",
                                                                           state_dtype="float16"))
    t0 = time.perf_counter()
    plan = function_plan(options)
    pieced = coreml_pieces.should_piece(ckpt.arch, ckpt_params(ckpt), options.pieced)
    if pieced:
        quantization = _export_pieced(ckpt, io, options, max_context, out_dir)
    else:
        quantization = _export_whole(ckpt, io, options, max_context, plan, out_dir)
    names = bindings(io, options.profile)
    write_metadata(out_dir / PACKAGE, _metadata(ckpt, io, names, options, max_context))
    extras = {"deployment_target": TARGET, "default_function": next(iter(plan)),
              "clients": clients.support(options.profile, "coreml", ckpt.arch),
              "conversion_seconds": round(time.perf_counter() - t0, 2), "pieced": pieced}
    return Manifest(format="coreml", arch=ckpt.arch, io=io, hf_config=ckpt.config.to_dict(), max_context=max_context,
                    dtype=options.precision, bindings=names, profile=options.profile, batch_size=options.batch_size,
                    functions={name: ("ranged" if q is None else q) for name, q in plan.items()},
                    quantization=quantization, model_file=PACKAGE, extras=extras)


def ckpt_params(ckpt: Checkpoint) -> int:
    return sum(v.numel() for v in {id(v): v for v in ckpt.state_dict.values()}.values())


def _export_pieced(ckpt: Checkpoint, io: ModelIO, options: CoreMLOptions, max_context: int, out_dir: Path) -> dict:
    """Layer by layer (exporter/coreml_pieces.py): a 7B model converts in a few GB."""
    from perch.exporter.calibration import calibration_for
    from perch.progress import progress

    if options.multifunction:
        raise PerchError("--multifunction is not available with the pieced conversion that a model this large "
                         "needs (one function per package); export without --multifunction")
    cal = calibration_for(ckpt, options) if options.quantize != "none" else None
    work = out_dir / ".pieces"
    work.mkdir()
    n = ckpt.config.num_hidden_layers + 2
    try:
        with progress(2 * n, f"Core ML {options.quantize if options.quantize != 'none' else options.precision}",
                      unit="piece") as bar:
            parts, quantization = coreml_pieces.convert_pieces(ckpt, io, options, max_context, work, cal, bar)
            coreml_pieces.join(parts, out_dir / PACKAGE, bar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cal is not None:
        quantization["calibration"] = cal.info
    return quantization


def _export_whole(ckpt: Checkpoint, io: ModelIO, options: CoreMLOptions, max_context: int, plan: dict,
                  out_dir: Path) -> dict:
    """One trace, one conversion per function: fine up to ~1B parameters on a 24 GiB machine."""
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
            compressed = apply_compression(parts[name], plans[name], options.block_size, kinds, cal)
            drop_temp_package(parts[name])
            parts[name] = compressed
            release_program(parts[name])
    _save(parts, out_dir / PACKAGE, scratch=out_dir)
    for model in parts.values():
        drop_temp_package(model)
    return quantization


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
