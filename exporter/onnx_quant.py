"""Weight-only quantization of an in-memory ONNX model (onnx_ir), one weight at a time.

- MatMul(x, W) with a constant W -> `com.microsoft.MatMulNBits` (4 or 8 bits, asymmetric, blocks of
  `block_size` along the input axis), the lm_head included (the exporter unties it from the embedding).
- The embedding Gather -> `com.microsoft.GatherBlockQuantized`: no faster (a Gather reads only B*T rows)
  but the embedding is a large share of the file (44% of falcon-mid's weights), so it shrinks the artifact.
- Everything else stays float, and the report says why, by name.

Each quantized initializer is lazy: the weight is read, quantized and packed when the file is written, and
dropped right after, so quantizing a 7B model never holds more than one float weight at a time.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from perch.exporter import calibration as calib
from perch.exporter import gptq, onnx_tie, quant_search
from perch.exporter.onnx_tie import LM_HEAD
from perch.exporter.quant_recipes import RECIPES, Choice, recipe
from perch.progress import progress

# The --quantize methods this backend offers (name -> Recipe: description, bits_estimate, per-tensor choices).
METHODS = dict(RECIPES)

MSFT = "com.microsoft"
# Activations quantized to int8 inside MatMulNBits: the fastest CPU kernel (docs/traps.md, ONNX: 2-5x over fp32). With
# float activations (level 1) 8-bit weights take a slow path: 360 ms vs 11 ms for 8 1024x4096 MatMuls here.
ACCURACY_LEVEL = 4
ROWS_PER_CHUNK = 4096  # bounds the float temporaries while quantizing a (vocab, hidden) head
# value.meta key: a callable giving a folded weight in its (out, in) layout (set by the exporter).
WEIGHT_OUT_IN = "perch.weight_out_in"
# Weights kept in float on purpose: checkpoint-name suffix -> why.
KEEP_FLOAT = {
    "mixer.dt_proj.weight": "Mamba step size: it feeds softplus and exp(A*dt) in every state update, and it "
                            "holds ~2% of Falcon-Mamba-7B's weights: accuracy risk for almost no saving",
}


def quantize_blocks(w: np.ndarray, bits: int, block: int, algorithm: str = "rtn", hessian: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w (rows, K) -> packed (rows, blocks, block*bits/8) uint8, scales (rows, blocks) float32, packed zero points.

    Asymmetric per block (0.0 stays exact), the layout MatMulNBits and GatherBlockQuantized read: values packed
    low bits first along K, zero points packed the same way. `algorithm`: "rtn" (min/max), "search" or "gptq"
    (perch.exporter.quant_search / gptq; gptq needs the layer's input `hessian`, (K, K)).
    """
    rows, k = w.shape
    nb = -(-k // block)
    packed = np.empty((rows, nb, block * bits // 8), np.uint8)
    scales = np.empty((rows, nb), np.float32)
    zeros = np.empty((rows, -(-nb * bits // 8)), np.uint8)
    pad = nb * block - k
    if hessian is not None and pad:
        hessian = np.pad(hessian, ((0, pad), (0, pad)))
    imp = None if hessian is None else np.diag(hessian).astype(np.float32).reshape(nb, block)
    for r0 in range(0, rows, ROWS_PER_CHUNK):
        x = np.pad(np.asarray(w[r0 : r0 + ROWS_PER_CHUNK], dtype=np.float32), ((0, 0), (0, pad)))
        if algorithm == "gptq" and hessian is not None:
            q, scale, zp = gptq.gptq(x, hessian, bits, block)
        elif algorithm in ("search", "gptq"):
            q, scale, zp = quant_search.search(x.reshape(len(x), nb, block), bits, imp)
        else:
            q, scale, zp = quant_search.rtn(x.reshape(len(x), nb, block), bits)
        sl = slice(r0, r0 + len(x))
        packed[sl], scales[sl], zeros[sl] = _pack(q, bits), scale, _pack(zp, bits)
    return packed, scales, zeros


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (odd lengths padded with 0)."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float weight (rows, K) a quantized one stands for (tests and error estimates)."""
    def unpack(a, n):
        if bits == 8:
            return a[..., :n].astype(np.float32)
        out = np.stack([a & 0xF, a >> 4], axis=-1).reshape(a.shape[:-1] + (-1,))
        return out[..., :n].astype(np.float32)

    rows, nb, _ = packed.shape
    q = unpack(packed, packed.shape[-1] * 8 // bits)
    zp = unpack(zeros, nb)
    w = (q - zp[..., None]) * scales[..., None].astype(np.float32)
    return w.reshape(rows, -1)[:, :k]


class _LazyQuantized:
    """Quantizes one weight on first use, hands out its three parts, and forgets them once all were taken."""

    def __init__(self, load, choice: Choice, hessian: np.ndarray | None):
        self.load, self.choice, self.hessian = load, choice, hessian
        self.parts: list | None = None
        self.taken: set[int] = set()
        self.lock = threading.Lock()

    def part(self, i: int, shape: tuple[int, ...]) -> ir.Tensor:
        with self.lock:
            if self.parts is None:
                c = self.choice
                packed, scales, zeros = quantize_blocks(self.load(), c.bits, c.block, c.algorithm, self.hessian)
                self.parts = [packed, scales.astype(np.float16), zeros]
            arr = self.parts[i].reshape(shape)
            self.taken.add(i)
            if len(self.taken) == 3:
                self.parts, self.taken = None, set()
            return ir.tensor(arr)


def _lazy_parts(graph: ir.Graph, name: str, load, rows: int, k: int, choice: Choice, float_dtype: ir.DataType,
                before: ir.Node, hessian: np.ndarray | None = None, *, flat: bool = False) -> list[ir.Value]:
    """Register the packed weight, float16 scales and zero points of `name` as lazy initializers.

    Scales are stored as float16 (half the bytes of float32: 4.625 instead of 5.125 bits per weight at blocks
    of 32) and cast to the graph's float type by a Cast that ONNX Runtime constant-folds at load, so the
    kernels see what they saw before. `flat`: packed bytes as (rows, K*bits/8), GatherBlockQuantized's
    layout; else (rows, blocks, bytes per block).
    """
    bits, block = choice.bits, choice.block
    nb = -(-k // block)
    q = _LazyQuantized(load, choice, hessian)
    packed = (rows, nb * block * bits // 8) if flat else (rows, nb, block * bits // 8)
    specs = [("q", ir.DataType.UINT8, packed), ("scales", ir.DataType.FLOAT16, (rows, nb)),
             ("zero_points", ir.DataType.UINT8, (rows, -(-nb * bits // 8)))]
    values = []
    for i, (suffix, dtype, shape) in enumerate(specs):
        full = f"{name}.{suffix}"
        v = ir.Value(name=full, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
        v.const_value = ir.LazyTensor(lambda i=i, shape=shape: q.part(i, shape), dtype, ir.Shape(list(shape)),
                                      name=full)
        graph.register_initializer(v)
        values.append(v)
    if float_dtype != ir.DataType.FLOAT16:
        cast = ir.node("Cast", [values[1]], attributes={"to": float_dtype}, name=f"{name}.scales_cast")
        cast.outputs[0].name = f"{name}.scales_{float_dtype.name.lower()}"
        cast.outputs[0].shape, cast.outputs[0].type = ir.Shape([rows, nb]), ir.TensorType(float_dtype)
        graph.insert_before(before, cast)
        values[1] = cast.outputs[0]
    return values


def _weight_out_in(value: ir.Value):
    """A loader of the weight in (out, in) layout: the exporter's source, else the transposed initializer."""
    return value.meta.get(WEIGHT_OUT_IN) or (lambda: np.ascontiguousarray(value.const_value.numpy().T))


def _display(name: str) -> str:
    return name.removeprefix("core.").removesuffix(".T")


def _skip_reason(name: str, k: int, choice: Choice | None) -> str | None:
    if choice is None:
        for suffix, why in KEEP_FLOAT.items():
            if _display(name).endswith(suffix):
                return why
        return "kept float by the recipe"
    if k < choice.block:
        return f"input size {k} is smaller than one {choice.block}-wide block"
    return None


def _swap(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` was; its output keeps the old name (it may be a graph output such as logits)."""
    graph.insert_before(old, new)
    out, name = old.outputs[0], old.outputs[0].name
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    graph.remove(old, safe=True)
    new.outputs[0].name = name


def _replace_matmul(graph: ir.Graph, node: ir.Node, choice: Choice, hessian: np.ndarray | None) -> None:
    w = node.inputs[1]
    k, n = w.shape
    q, scales, zeros = _lazy_parts(graph, w.name, _weight_out_in(w), n, k, choice, w.dtype, node, hessian)
    new = ir.node("MatMulNBits", [node.inputs[0], q, scales, zeros], domain=MSFT, num_outputs=1,
                  attributes={"K": k, "N": n, "bits": choice.bits, "block_size": choice.block,
                              "accuracy_level": ACCURACY_LEVEL}, name=node.name)
    _swap(graph, node, new)
    if not w.uses():
        graph.initializers.pop(w.name)


def _replace_gather(graph: ir.Graph, node: ir.Node, choice: Choice) -> None:
    table = node.inputs[0]
    rows, k = table.shape
    load = lambda: np.asarray(table.const_value.numpy())  # noqa: E731: (vocab, hidden) is already (out, in)
    q, scales, zeros = _lazy_parts(graph, table.name, load, rows, k, choice, table.dtype, node, flat=True)
    new = ir.node("GatherBlockQuantized", [q, node.inputs[1], scales, zeros], domain=MSFT, num_outputs=1,
                  attributes={"bits": choice.bits, "block_size": choice.block, "gather_axis": 0, "quantize_axis": 1},
                  name=node.name)
    _swap(graph, node, new)
    if not table.uses():
        graph.initializers.pop(table.name)


def _is_float_weight(v: ir.Value | None) -> bool:
    return (v is not None and v.is_initializer() and v.shape is not None and len(v.shape) == 2
            and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16))


def quantize(model: ir.Model, method: str, block_size: int, *, embedding: str | None = None,
             calibration: calib.Calibration | None = None, tied: bool = False) -> dict:
    """Quantize `model` in place by the recipe `method` (quant_recipes.RECIPES); return the manifest's record.

    `calibration` (input Hessians) is needed by GPTQ recipes; without it their linear layers fall back to
    the scale search, and the record says so. `tied`: the checkpoint's lm_head is its embedding; both ops
    then take the recipe's tied choice (the head's block), so they quantize the table to the same bytes and
    onnx_tie can store one copy (counted once in bits per weight).
    """
    rec = recipe(method)
    t = _Tally({}, {}, {"quantized": 0, "bits": 0})
    graph, head_count = model.graph, None
    candidates = [n for n in graph if _target(n, embedding)]
    # The graph is rewritten here in seconds; the search itself runs as each weight is saved (lazy tensors).
    with progress(len(candidates), f"ONNX {method}", unit="tensor") as bar:
        for node in candidates:
            kind = _target(node, embedding)  # again: an earlier replacement may have taken this weight
            bar.advance(1, _display(node.inputs[1 if kind == "MatMul" else 0].name))
            if kind == "MatMul":
                head_count = _quantize_matmul(graph, node, rec, block_size, embedding, tied, calibration, t) or head_count
            elif kind == "Gather":
                _quantize_gather(graph, node, rec, block_size, embedding, tied, t)
    done, kept, params = t.done, t.kept, t.params
    model.opset_imports[MSFT] = 1
    note = None
    if head_count and (note := onnx_tie.share_tied_table(model, embedding.removesuffix(_display(embedding)),
                                                          _display(embedding))):
        params["quantized"] -= head_count[0]  # one stored table: its weights and bits count once
        params["bits"] -= head_count[1]
    report = _report(model, rec, block_size, done, kept, params, calibration)
    if note:
        report["tied_table"] = note
    if rec.calibration and calibration is None:
        report["note"] = "no calibration data (no checkpoint to run): GPTQ tensors fell back to the scale search"
    return report


@dataclass
class _Tally:
    done: dict[str, Choice]  # display name -> how it was quantized
    kept: dict[str, str]  # display name -> why it stays float
    params: dict[str, int]  # quantized weights and their stored bits


def _quantize_matmul(graph: ir.Graph, node: ir.Node, rec, block_size: int, embedding: str | None, tied: bool,
                     calibration, t: _Tally) -> tuple[int, int] | None:
    """Replace one float-weight MatMul by MatMulNBits; returns the head's counts when it shares the table."""
    w = node.inputs[1]
    name = _display(w.name)
    shared = tied and embedding is not None and name == LM_HEAD
    choice = rec.tied_choice(block_size) if shared else rec.choice(name, "linear", block_size)
    hess = calib.hessian_for(calibration, name) if choice and choice.algorithm == "gptq" else None
    if choice and choice.algorithm == "gptq" and hess is None:
        choice = Choice(choice.bits, choice.block, "search")
    reason = _skip_reason(w.name, w.shape[0], choice)
    if reason:
        t.kept[name] = reason
        return None
    t.done[name] = choice
    counted = _count(t.params, w.shape, choice)
    _replace_matmul(graph, node, choice, hess)
    return counted if shared else None


def _quantize_gather(graph: ir.Graph, node: ir.Node, rec, block_size: int, embedding: str, tied: bool,
                     t: _Tally) -> None:
    """Replace the embedding's Gather by GatherBlockQuantized (unless the hidden size does not fit a block)."""
    choice = rec.tied_choice(block_size) if tied else rec.choice(_display(embedding), "embedding", block_size)
    if node.inputs[0].shape[1] % choice.block:
        t.kept[_display(embedding)] = f"hidden size is not a multiple of the {choice.block}-wide block"
        return
    t.done[_display(embedding)] = choice
    _count(t.params, node.inputs[0].shape, choice)
    _replace_gather(graph, node, choice)


def _target(node: ir.Node, embedding: str | None) -> str | None:
    """"MatMul" for a float-weight MatMul, "Gather" for the embedding's lookup, None for anything else."""
    if node.op_type == "MatMul" and node.domain == "" and _is_float_weight(node.inputs[1]):
        return "MatMul"
    if node.op_type == "Gather" and _is_float_weight(node.inputs[0]) and node.inputs[0].name == embedding:
        return "Gather"
    return None


def _count(params: dict, shape, c: Choice) -> tuple[int, int]:
    """Stored bits of one quantized weight: codes, float16 scales, packed zero points (per block)."""
    rows, k = shape if len(shape) == 2 else (1, shape[0])
    n, bits = int(rows) * int(k), int(rows) * -(-int(k) // c.block) * (c.block * c.bits + 16 + c.bits)
    params["quantized"] += n
    params["bits"] += bits
    return n, bits


def _report(model: ir.Model, rec, block: int, done: dict[str, Choice], kept: dict, params: dict, cal) -> dict:
    small, float_2d, ssm_2d = [], [0, 0], [0, 0]
    for name, v in model.graph.initializers.items():
        if v.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or not name.startswith("core."):
            continue  # quantized parts, and constants folded from the graph rather than checkpoint weights
        shown = _display(name)
        if shown in done or name.endswith((".scales", ".zero_points")):
            continue
        is_2d = v.shape is not None and len(v.shape) >= 2 and not name.startswith("core.rope_")
        if is_2d:
            float_2d[0] += int(np.prod(list(v.shape)))
            float_2d[1] += int(np.prod(list(v.shape))) * 8 * v.dtype.itemsize
        if shown in kept:
            continue
        if name.startswith("core.rope_"):
            kept[shown] = "rotary table: read one row per position, and exact angles matter at long context"
        elif is_2d:
            kept[shown] = "not a MatMul or embedding weight (convolution or SSM parameter): no block-quantized op"
            ssm_2d[0] += int(np.prod(list(v.shape)))
            ssm_2d[1] += int(np.prod(list(v.shape))) * 8 * v.dtype.itemsize
        else:
            small.append(shown)
    if small:
        kept["1-D tensors"] = (f"{len(small)} norm weights, biases and per-channel parameters: a negligible share "
                               "of the size, and norms are precision-sensitive")
    bpw = (params["bits"] + float_2d[1]) / max(params["quantized"] + float_2d[0], 1)
    # llama.cpp's count for the same weights (GGUF): MatMul and embedding weights only, the SSM's A_log left out
    linear = (params["bits"] + float_2d[1] - ssm_2d[1]) / max(params["quantized"] + float_2d[0] - ssm_2d[0], 1)
    return {
        "method": rec.name, "description": rec.description, "bits": rec.bits, "block_size": block, "symmetric": False,
        "bits_per_weight": round(bpw, 3),
        "bits_per_weight_basis": "stored bits (codes, float16 scales, zero points; float weights at their size) "
                                 "over the parameters of every 2-D weight",
        "bits_per_linear_weight": round(linear, 3),  # the same over MatMul/embedding weights (no SSM A_log)
        "scales": "float16, cast to the compute type in the graph (folded by ONNX Runtime at load)",
        "ops": {"linear": "com.microsoft.MatMulNBits", "embedding": "com.microsoft.GatherBlockQuantized"},
        "accuracy_level": ACCURACY_LEVEL, "quantized": list(done), "tensors": _choices(done),
        "calibration": cal.info if cal is not None and any(c.algorithm == "gptq" for c in done.values()) else None,
        "not_quantized": kept,
    }


def _choices(done: dict[str, Choice]) -> dict[str, list[str]]:
    """Tensors grouped by what they got, e.g. {"4-bit gptq, blocks of 32": [...]}: the per-tensor record."""
    out: dict[str, list[str]] = {}
    for name, c in done.items():
        out.setdefault(f"{c.bits}-bit {c.algorithm}, blocks of {c.block}", []).append(name)
    return out
