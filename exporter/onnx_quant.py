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

import numpy as np
import onnx_ir as ir

MSFT = "com.microsoft"
BITS = {"int4": 4, "int8": 8}
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


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w (rows, K) -> packed (rows, blocks, block*bits/8) uint8, scales (rows, blocks) float32, packed zero points.

    Asymmetric min/max per block with 0 inside the range (so 0.0 stays exact), the layout MatMulNBits and
    GatherBlockQuantized read: values packed low bits first along K, zero points packed the same way.
    """
    rows, k = w.shape
    nb, qmax = -(-k // block), (1 << bits) - 1
    packed = np.empty((rows, nb, block * bits // 8), np.uint8)
    scales = np.empty((rows, nb), np.float32)
    zeros = np.empty((rows, -(-nb * bits // 8)), np.uint8)
    for r0 in range(0, rows, ROWS_PER_CHUNK):
        x = np.asarray(w[r0 : r0 + ROWS_PER_CHUNK], dtype=np.float32)
        if k % block:
            x = np.pad(x, ((0, 0), (0, nb * block - k)))
        x = x.reshape(len(x), nb, block)
        lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(x / scale[..., None] + zp[..., None]), 0, qmax).astype(np.uint8)
        sl = slice(r0, r0 + len(x))
        packed[sl], scales[sl], zeros[sl] = _pack(q, bits), scale, _pack(zp.astype(np.uint8), bits)
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

    def __init__(self, load, bits: int, block: int, scale_dtype: np.dtype):
        self.load, self.bits, self.block, self.scale_dtype = load, bits, block, scale_dtype
        self.parts: list | None = None
        self.taken: set[int] = set()
        self.lock = threading.Lock()

    def part(self, i: int, shape: tuple[int, ...]) -> ir.Tensor:
        with self.lock:
            if self.parts is None:
                packed, scales, zeros = quantize_blocks(self.load(), self.bits, self.block)
                self.parts = [packed, scales.astype(self.scale_dtype), zeros]
            arr = self.parts[i].reshape(shape)
            self.taken.add(i)
            if len(self.taken) == 3:
                self.parts, self.taken = None, set()
            return ir.tensor(arr)


def _lazy_parts(graph: ir.Graph, name: str, load, rows: int, k: int, bits: int, block: int, float_dtype: ir.DataType,
                *, flat: bool = False) -> list[ir.Value]:
    """Register the packed weight, scales and zero points of `name` as lazy initializers.

    `flat`: packed bytes as (rows, K*bits/8), GatherBlockQuantized's layout; else (rows, blocks, bytes per block).
    """
    nb = -(-k // block)
    q = _LazyQuantized(load, bits, block, float_dtype.numpy())
    packed = (rows, nb * block * bits // 8) if flat else (rows, nb, block * bits // 8)
    specs = [("q", ir.DataType.UINT8, packed), ("scales", float_dtype, (rows, nb)),
             ("zero_points", ir.DataType.UINT8, (rows, -(-nb * bits // 8)))]
    values = []
    for i, (suffix, dtype, shape) in enumerate(specs):
        full = f"{name}.{suffix}"
        v = ir.Value(name=full, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
        v.const_value = ir.LazyTensor(lambda i=i, shape=shape: q.part(i, shape), dtype, ir.Shape(list(shape)),
                                      name=full)
        graph.register_initializer(v)
        values.append(v)
    return values


def _weight_out_in(value: ir.Value):
    """A loader of the weight in (out, in) layout: the exporter's source, else the transposed initializer."""
    return value.meta.get(WEIGHT_OUT_IN) or (lambda: np.ascontiguousarray(value.const_value.numpy().T))


def _display(name: str) -> str:
    return name.removeprefix("core.").removesuffix(".T")


def _skip_reason(name: str, k: int, block: int) -> str | None:
    for suffix, why in KEEP_FLOAT.items():
        if _display(name).endswith(suffix):
            return why
    if k < block:
        return f"input size {k} is smaller than one {block}-wide block"
    return None


def _swap(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` was; its output keeps the old name (it may be a graph output such as logits)."""
    graph.insert_before(old, new)
    out, name = old.outputs[0], old.outputs[0].name
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    graph.remove(old, safe=True)
    new.outputs[0].name = name


def _replace_matmul(graph: ir.Graph, node: ir.Node, bits: int, block: int) -> None:
    w = node.inputs[1]
    k, n = w.shape
    q, scales, zeros = _lazy_parts(graph, w.name, _weight_out_in(w), n, k, bits, block, w.dtype)
    new = ir.node("MatMulNBits", [node.inputs[0], q, scales, zeros], domain=MSFT, num_outputs=1,
                  attributes={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL},
                  name=node.name)
    _swap(graph, node, new)
    if not w.uses():
        graph.initializers.pop(w.name)


def _replace_gather(graph: ir.Graph, node: ir.Node, bits: int, block: int) -> None:
    table = node.inputs[0]
    rows, k = table.shape
    load = lambda: np.asarray(table.const_value.numpy())  # noqa: E731: (vocab, hidden) is already (out, in)
    q, scales, zeros = _lazy_parts(graph, table.name, load, rows, k, bits, block, table.dtype, flat=True)
    new = ir.node("GatherBlockQuantized", [q, node.inputs[1], scales, zeros], domain=MSFT, num_outputs=1,
                  attributes={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1}, name=node.name)
    _swap(graph, node, new)
    if not table.uses():
        graph.initializers.pop(table.name)


def _is_float_weight(v: ir.Value | None) -> bool:
    return (v is not None and v.is_initializer() and v.shape is not None and len(v.shape) == 2
            and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16))


def quantize(model: ir.Model, method: str, block_size: int, *, embedding: str | None = None) -> dict:
    """Quantize `model` in place; return the manifest's quantization record (what, how, what not and why)."""
    bits = BITS[method]
    done, kept = [], {}
    graph = model.graph
    for node in list(graph):
        if node.op_type == "MatMul" and node.domain == "" and _is_float_weight(node.inputs[1]):
            w = node.inputs[1]
            reason = _skip_reason(w.name, w.shape[0], block_size)
            if reason:
                kept[_display(w.name)] = reason
                continue
            done.append(_display(w.name))
            _replace_matmul(graph, node, bits, block_size)
        elif node.op_type == "Gather" and _is_float_weight(node.inputs[0]) and node.inputs[0].name == embedding:
            if node.inputs[0].shape[1] % block_size:
                kept[_display(embedding)] = f"hidden size is not a multiple of the {block_size}-wide block"
                continue
            done.append(_display(embedding))
            _replace_gather(graph, node, bits, block_size)
    model.opset_imports[MSFT] = 1
    return _report(model, method, bits, block_size, done, kept)


def _report(model: ir.Model, method: str, bits: int, block: int, done: list[str], kept: dict) -> dict:
    small = []
    for name, v in model.graph.initializers.items():
        if v.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or not name.startswith("core."):
            continue  # quantized parts, and constants folded from the graph rather than checkpoint weights
        shown = _display(name)
        if shown in kept or shown in done or name.endswith((".scales", ".zero_points")):
            continue
        if name.startswith("core.rope_"):
            kept[shown] = "rotary table: read one row per position, and exact angles matter at long context"
        elif v.shape is not None and len(v.shape) >= 2:
            kept[shown] = "not a MatMul or embedding weight (convolution or SSM parameter): no block-quantized op"
        else:
            small.append(shown)
    if small:
        kept["1-D tensors"] = (f"{len(small)} norm weights, biases and per-channel parameters: a negligible share "
                               "of the size, and norms are precision-sensitive")
    return {
        "method": method, "bits": bits, "block_size": block, "symmetric": False,
        "ops": {"linear": "com.microsoft.MatMulNBits", "embedding": "com.microsoft.GatherBlockQuantized"},
        "accuracy_level": ACCURACY_LEVEL, "quantized": done, "not_quantized": kept,
    }
