"""Pieced Core ML conversion: one decoder layer at a time, compressed as it goes, joined into one package.

Why: coremltools converts a whole program in memory, with a numpy copy of every weight and more during its
passes; `perch export falcon-7b --to coreml` in one piece was killed at 23.9 GB on a 24 GiB machine
(docs/traps.md). Here each piece of the architecture's stateful front-end (perch/archs/pieces.py: the
embedding, each layer, the head) has its weights cast, is traced and converted as its own MIL program,
compressed, and saved; only then is the next piece's weight cast. `join` then concatenates the pieces'
operations (renamed apart, carries wired from one piece to the next) into one `main` function and their
weight blobs into one file, streaming: the joined program is the one-piece program, op for op.
"""
from __future__ import annotations

import contextlib
import gc
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perch.archs.pieces import PIECES, Carry, Piece
from perch.archs import arch_module
from perch.errors import PerchError
from perch.exporter import coreml_trace as tc
from perch.exporter.coreml_compress import apply_compression, merge_info, plan_compression
from perch.exporter.options import CoreMLOptions
from perch.spec import ModelIO

# Above this many parameters, export() converts in pieces on its own (a one-piece 1B program already
# takes ~10 GB during conversion; pieces stay at one layer's weights however large the model).
PIECED_ABOVE = 1_500_000_000
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
SPEC = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


def supported(arch: str) -> bool:
    return arch in PIECES


def should_piece(arch: str, params: int, forced: bool | None) -> bool:
    """Pieced when forced, or automatically for a large model of an architecture that has pieces."""
    if forced and not supported(arch):
        raise PerchError(f"pieced Core ML conversion is not available for {arch} (no pieces in perch/archs/pieces.py); "
                         "export it in one piece")
    return bool(forced) if forced is not None else (supported(arch) and params > PIECED_ABOVE)


@contextlib.contextmanager
def materialized(module: nn.Module, dtype: torch.dtype):
    """Cast `module`'s floating parameters to `dtype` for the duration, then put the stored ones back.

    The checkpoint's tensors stay memory-mapped; only this piece's cast copy is ever resident."""
    saved = []
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                saved.append((mod, name, p))
                mod._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    try:
        yield module
    finally:
        for mod, name, p in saved:
            mod._parameters[name] = p
        gc.collect()


def _dims(io: ModelIO, max_context: int) -> dict:
    import coremltools as ct

    return {"sequence": ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1),
            "total_sequence": ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)}


def piece_types(piece: Piece, carries: dict[str, Carry], io: ModelIO, options: CoreMLOptions,
                max_context: int) -> tuple[list, list, tuple]:
    """(ct inputs, ct outputs, example tensors) for one piece: the front-end's own inputs as in one piece,
    carries in the compute dtype (fp16 carries need no casts, so the joined program equals the one-piece)."""
    import coremltools as ct


    fp16 = options.precision == "fp16"
    cdtype, tdtype = (np.float16, torch.float16) if fp16 else (np.float32, torch.float32)
    own = dict(zip([t.name for t in io.inputs], tc.coreml_inputs(io, options.batch_size, max_context, None)))
    samples = dict(zip([t.name for t in io.inputs], tc.example_inputs(io, options.batch_size)))
    sizes = {**tc._SAMPLE, "batch": options.batch_size}
    dims = {**_dims(io, max_context), "batch": options.batch_size}
    inputs, examples = [], []
    for name in piece.inputs:
        if name in own:
            inputs.append(own[name])
            examples.append(samples[name])
            continue
        shape = carries[name].shape
        inputs.append(ct.TensorType(name=name, shape=tuple(dims.get(a, a) for a in shape), dtype=cdtype))
        examples.append(torch.zeros([sizes.get(a, a) for a in shape], dtype=tdtype))
    # Carries out are named apart from carries in (a var may not be both); logits keep their name.
    outputs = [ct.TensorType(name=tc.NAMES[n] if n in tc.NAMES else f"{n}_next", dtype=cdtype) for n in piece.outputs]
    return inputs, outputs, tuple(examples)


def convert_piece(piece: Piece, carries: dict[str, Carry], io: ModelIO, options: CoreMLOptions, max_context: int):
    """One piece -> an MLModel (weights saved in its own temporary package)."""
    import coremltools as ct


    inputs, outputs, examples = piece_types(piece, carries, io, options, max_context)
    tc._patch_frontend()
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(piece.module, examples, check_trace=False)
    fp16 = options.precision == "fp16"
    model = ct.convert(traced, inputs=inputs, outputs=outputs, states=tc.coreml_states(piece.module, list(piece.states)),
                       minimum_deployment_target=tc.check_target(tc.TARGET, has_states=bool(piece.states)),
                       compute_precision=tc.compute_precision(fp16, getattr(arch_module(io.arch), "FP32_MODULES", ())),
                       convert_to="mlprogram", skip_model_load=True)
    del traced
    if piece.states:
        tc.check_state_writes(model._mil_program, list(piece.states))
    return model


def convert_pieces(ckpt, io: ModelIO, options: CoreMLOptions, max_context: int, work: Path, cal=None,
                   progress=None):
    """Convert and compress every piece into `work`; returns ([(piece, package path)], merged quantization info)."""

    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    module = tc.stateful_module(ckpt, io, max_context, options.batch_size, None, options.profile)
    pieces, carries = PIECES[ckpt.arch](module)
    done, infos = [], []
    for k, piece in enumerate(pieces):
        with materialized(piece.module, dtype):
            model = convert_piece(piece, carries, io, options, max_context)
            kinds = tc.weight_kinds(piece.module)
            # a head tied to the embedding is compressed as the table is (kind embedding: its choice),
            # so both pieces hold the same codes and join() keeps one copy, as the one-piece dedup does
            kinds.update({src: "embedding" for src in piece.ties if src in kinds})
        if options.quantize != "none":
            plan = plan_compression(model._mil_program, options.quantize, options.block_size, kinds,
                                    tied=tuple(piece.ties))
            tc.release_program(model)
            compressed = apply_compression(model, plan, options.block_size, kinds, cal)
            tc.drop_temp_package(model)
            model = compressed
            infos.append(plan.info)
        tc.release_program(model)
        path = work / f"piece{k:03d}.mlpackage"
        model.save(str(path))
        tc.drop_temp_package(model)
        del model
        gc.collect()
        done.append((piece, path))
        if progress is not None:
            progress.advance(1, piece.name)
    return done, (merge_info(infos) if infos else {"method": "none"})


# ---- joining: proto ops renamed apart and concatenated; weight blobs appended with their offsets moved
def _read_spec(package: Path):
    from coremltools import proto

    spec = proto.Model_pb2.Model()
    spec.ParseFromString((package / SPEC).read_bytes())
    return spec


def _rename_block(block, names: dict[str, str], prefix: str, moved: dict[int, int]) -> None:
    """Rename every var `block` defines (prefix) and uses (through `names`); move blob offsets (`moved`)."""
    for inp in block.inputs:
        names[inp.name] = prefix + inp.name
        inp.name = names[inp.name]
    for op in block.operations:
        for arg in op.inputs.values():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    b.name = names.get(b.name, b.name)
                else:
                    _move_blob(b.value, moved)
        for v in op.attributes.values():
            _move_blob(v, moved)
        if "name" in op.attributes:
            s = op.attributes["name"].immediateValue.tensor.strings.values
            if len(s):
                s[0] = prefix + s[0]
        for nested in op.blocks:
            _rename_block(nested, names, prefix, moved)
        for out in op.outputs:
            names[out.name] = prefix + out.name
            out.name = names[out.name]
    for i, name in enumerate(block.outputs):
        block.outputs[i] = names.get(name, name)


def _move_blob(value, moved: dict[int, int]) -> None:
    if value.WhichOneof("value") == "blobFileValue":
        value.blobFileValue.offset = moved[value.blobFileValue.offset]


def _blob_offsets(block) -> set[int]:
    """Every blob offset `block`'s ops reference."""
    found = set()
    for op in block.operations:
        values = list(op.attributes.values()) + [b.value for a in op.inputs.values() for b in a.arguments
                                                 if b.WhichOneof("binding") == "value"]
        found.update(v.blobFileValue.offset for v in values if v.WhichOneof("value") == "blobFileValue")
        for nested in op.blocks:
            found |= _blob_offsets(nested)
    return found


def _op_name(op) -> str:
    return op.outputs[0].name if op.outputs else ""


def _tie(block, piece: Piece, defined: dict[int, set[str]]) -> dict[str, str]:
    """Drop the ops that build a tied weight (a head tied to the embedding) and point its users at the var
    the owning piece built for the same tensor: stored and compressed once, as the one-piece dedup does.
    Returns the renames; nothing is dropped when the owner holds no var of the same name (convert_pieces
    compresses a tied head as its table, so the names and the codes agree)."""
    renames, drop = {}, []
    for src, (owner, dst) in piece.ties.items():
        ops = [op for op in block.operations if _op_name(op).startswith(src)]
        made = {o.name for op in ops for o in op.outputs}
        used = {b.name for op in block.operations if op not in ops for a in op.inputs.values() for b in a.arguments
                if b.WhichOneof("binding") == "name" and b.name in made}
        target = {n: f"p{owner}_" + dst + n[len(src):] for n in used}
        if not used or not all(t in defined[owner] for t in target.values()):
            continue
        renames.update(target)
        drop.extend(ops)
    for op in drop:
        block.operations.remove(op)
    return renames


def join(parts: list[tuple[Piece, Path]], out: Path, progress=None) -> None:
    """Join converted pieces into one package at `out`: one `main` function, one weight file.

    Consumes the pieces: each piece's weight file is deleted once its records are appended, so the disk holds
    the package plus one piece at a time, not twice the package (a 14.5 GB Falcon-Mamba-7B fp16 export ran out
    of disk joining with the pieces kept)."""
    first = _read_spec(parts[0][1])
    fn_name = next(iter(first.mlProgram.functions))
    fn = first.mlProgram.functions[fn_name]
    opset = fn.opset
    shutil.copytree(parts[0][1], out, ignore=shutil.ignore_patterns("weight.bin"))
    merged = fn.block_specializations[opset]
    del merged.operations[:]
    del merged.outputs[:]
    fn_inputs = {i.name: i for i in fn.inputs}
    carry: dict[str, str] = {}  # carry name -> the joined program's var holding its latest value
    state_desc = []
    defined: dict[int, set[str]] = {}
    with open(out / WEIGHTS, "wb") as blob:
        blob.write(bytes(64))
        count = 0
        for k, (piece, path) in enumerate(parts):
            spec = _read_spec(path)
            f = spec.mlProgram.functions[fn_name]
            block = f.block_specializations[opset]
            names = {name: carry[name] for name in piece.inputs if name in carry}
            for inp in f.inputs:  # the front-end's inputs and states keep their names
                if inp.name not in names and inp.name not in fn_inputs:
                    fn_inputs[inp.name] = inp
            if piece.states and not state_desc:
                state_desc = list(spec.description.state)
            names.update(_tie(block, piece, defined))
            moved = _append_blob(path / WEIGHTS, blob, _blob_offsets(block))
            (path / WEIGHTS).unlink()  # the pieces live in the export's own work dir (.pieces)
            count += len(moved)
            _rename_block(block, names, f"p{k}_", moved)
            defined[k] = {o.name for op in block.operations for o in op.outputs}
            for name, var in zip(piece.outputs, block.outputs):
                carry[name] = var
            merged.operations.extend(block.operations)
            if progress is not None:
                progress.advance(1, f"join {piece.name}")
        blob.seek(0)
        blob.write(np.array([count, 2], dtype=np.uint32).tobytes())
    last = _read_spec(parts[-1][1])
    final = [o.name for o in last.description.output]
    merged.outputs.extend(carry[n] for n in parts[-1][0].outputs)
    _rename_outputs(merged, dict(zip(merged.outputs, final)))
    del fn.inputs[:]
    fn.inputs.extend(fn_inputs.values())
    del first.description.output[:]
    first.description.output.extend(last.description.output)
    del first.description.state[:]
    first.description.state.extend(state_desc)
    (out / SPEC).write_bytes(first.SerializeToString())


def _rename_outputs(block, renames: dict[str, str]) -> None:
    """The joined function's outputs take their declared names (`logits`), wherever the var is used."""
    for op in block.operations:
        for o in op.outputs:
            if o.name in renames:
                o.name = renames[o.name]
        for arg in op.inputs.values():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name" and b.name in renames:
                    b.name = renames[b.name]
    for i, name in enumerate(block.outputs):
        block.outputs[i] = renames.get(name, name)


_HEADER, _META = 64, 64


def _append_blob(src: Path, dst, keep: set[int]) -> dict[int, int]:
    """Append the records of a MIL weight file that `keep` names (by offset) to `dst`, each at a 64-byte
    boundary with its data offset moved to where it lands. Returns {old offset: new offset}. Streams.

    Format (coremltools MILBlob StorageFormat.hpp): a 64-byte header (uint32 count, uint32 version), then per
    record a 64-byte metadata block (uint32 sentinel 0xDEADBEEF, uint32 dtype, uint64 size, uint64 data
    offset, ...) and its data, each at a 64-byte boundary."""
    moved = {}
    with open(src, "rb") as f:
        count = int(np.frombuffer(f.read(_HEADER)[:4], dtype=np.uint32)[0])
        for _ in range(count):
            at = f.tell()
            meta = bytearray(f.read(_META))
            sentinel = int(np.frombuffer(bytes(meta[:4]), dtype=np.uint32)[0])
            if sentinel != 0xDEADBEEF:
                raise PerchError(f"{src}: not a MIL weight blob record at {at} (sentinel {sentinel:#x})")
            size, offset = (int(v) for v in np.frombuffer(bytes(meta[8:24]), dtype=np.uint64))
            if at in keep:
                dst.write(bytes((-dst.tell()) % 64))
                moved[at] = dst.tell()
                meta[16:24] = np.array([moved[at] + _META], dtype=np.uint64).tobytes()
                dst.write(meta)
                f.seek(offset)
                shutil.copyfileobj(_Limited(f, size), dst, 1 << 24)
            f.seek(offset + size + (-(offset + size)) % 64)
    return moved


class _Limited:
    """A read-only view of the next `n` bytes of a file, for copyfileobj."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data
