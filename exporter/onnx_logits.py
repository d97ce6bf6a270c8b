"""`logits_to_keep`: an optional graph input that lets a prefill compute the lm_head for its last positions only.

A generating client needs the logits of the last prompt position; the graph computes all of them, and the
lm_head (vocab x hidden per position) is the largest matmul of a prefill: ~25% of falcon-mid's prefill
FLOPs at 128 tokens, and a (T, 65024) float32 output (32 MiB at T = 128). transformers' own forward takes
`logits_to_keep` for the same reason, with the same meaning: 0 keeps every position, N the last N.

The input is an ONNX *overridable initializer* (a graph input that also has an initializer, value 0): a
client that does not know it feeds nothing and gets every position, exactly as before, and ONNX Runtime
does not list it among the inputs a caller must feed (optimum, ORT GenAI and transformers.js build their
feeds from the required inputs). Perch's runtime feeds 1 when it needs the last position only.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from perch.spec import LOGITS_TO_KEEP as NAME

LM_HEAD = "core.lm_head.weight"
INT64_MAX = np.iinfo(np.int64).max


def add_logits_to_keep(model: ir.Model) -> bool:
    """Slice the lm_head's input to its last `logits_to_keep` positions (all when 0); False when the graph has
    no single lm_head MatMul (nothing is changed then)."""
    graph = model.graph
    heads = [n for n in graph if n.op_type == "MatMul" and n.inputs[1] is not None
             and (n.inputs[1].name or "").startswith(LM_HEAD)]
    if len(heads) != 1 or heads[0].inputs[0].shape is None or len(heads[0].inputs[0].shape) != 3:
        return False  # the slice is along axis 1 of (batch, sequence, hidden)
    head, x = heads[0], heads[0].inputs[0]
    keep = ir.Value(name=NAME, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
    keep.const_value = ir.tensor(np.array(0, np.int64), name=NAME)
    graph.inputs.append(keep)
    graph.register_initializer(keep)  # an input with a default: overridable, never required
    c = {name: _const(graph, f"{NAME}.{name}", np.array(v, np.int64))
         for name, v in (("zero", [0]), ("end", [INT64_MAX]), ("axis", [1]), ("shape", [1]))}
    nodes = [
        ir.node("Shape", [x], attributes={"start": 1, "end": 2}, num_outputs=1),  # [T]
        ir.node("Reshape", [keep, c["shape"]], num_outputs=1),  # [n]
    ]
    t, n = nodes[0].outputs[0], nodes[1].outputs[0]
    nodes += [ir.node("Sub", [t, n], num_outputs=1), ir.node("Greater", [n, c["zero"]], num_outputs=1)]
    nodes.append(ir.node("Max", [nodes[2].outputs[0], c["zero"]], num_outputs=1))  # n > T keeps every position
    nodes.append(ir.node("Where", [nodes[3].outputs[0], nodes[4].outputs[0], c["zero"]], num_outputs=1))
    nodes.append(ir.node("Slice", [x, nodes[5].outputs[0], c["end"], c["axis"]], num_outputs=1))
    for i, node in enumerate(nodes):
        node.name = f"{NAME}.{i}"
        node.outputs[0].name = f"{NAME}.{i}.out"
    graph.insert_before(head, nodes)
    head.replace_input_with(0, nodes[-1].outputs[0])
    return True


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, shape=ir.Shape(list(array.shape)), type=ir.TensorType(ir.DataType.INT64))
    v.const_value = ir.tensor(array, name=name)
    graph.register_initializer(v)
    return v
