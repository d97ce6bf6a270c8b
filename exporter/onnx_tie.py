"""One quantized copy of a tied embedding and lm_head.

The exporter unties the lm_head so that MatMulNBits can quantize it, and the quantizer then writes the
(vocab, hidden) table twice: once for MatMulNBits, once for the embedding's GatherBlockQuantized. When the
checkpoint ties them (transformers' `tie_word_embeddings`, the lm_head *is* the embedding tensor), both
quantize the same rows with the same blocks, so the bytes are identical: the scales and zero points have
the same layout in both ops and only the packed weight's shape differs ((vocab, blocks, bytes) for
MatMulNBits, (vocab, hidden*bits/8) for the gather). The gather reads the lm_head's copy through a Reshape.
Both ops take the recipe's tied choice, the head's block (onnx_quant.quantize(tied=True)), so the bytes match.
For falcon-mid int4 that is 33 MiB of a 134 MB file.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

LM_HEAD = "lm_head.weight"


def is_tied(state_dict: dict, embedding_key: str) -> bool:
    """The checkpoint's lm_head is its embedding tensor (the loader maps a tied lm_head to the same object)."""
    head, table = state_dict.get(LM_HEAD), state_dict.get(embedding_key)
    return head is not None and head is table


def share_tied_table(model: ir.Model, prefix: str, embedding_key: str) -> str | None:
    """Point the quantized embedding at the quantized lm_head's initializers; a note for the manifest, or None
    when the graph does not have the two ops this needs (nothing is changed then)."""
    graph = model.graph
    gather = _only(n for n in graph if n.op_type == "GatherBlockQuantized" and n.inputs[0].name.startswith(prefix + embedding_key))
    head = _only(n for n in graph if n.op_type == "MatMulNBits" and n.inputs[1].name.startswith(prefix + LM_HEAD))
    if gather is None or head is None:
        return None
    if (gather.attributes["bits"].value, gather.attributes["block_size"].value) != (
            head.attributes["bits"].value, head.attributes["block_size"].value):
        return None
    q, scales, zeros = head.inputs[1], head.inputs[2], head.inputs[3]
    rows, blocks, blob = q.shape
    shape = ir.Value(name=f"{q.name}.gather_shape", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    shape.const_value = ir.tensor(np.array([rows, blocks * blob], np.int64))
    graph.register_initializer(shape)
    flat = ir.node("Reshape", [q, shape], name=f"{gather.name}.shared_table", num_outputs=1)
    graph.insert_before(gather, flat)
    old = list(gather.inputs)
    if scales.producer() is not None:  # float16 scales cast to the compute type: the cast must run first
        cast = scales.producer()
        graph.remove(cast)
        graph.insert_before(gather, cast)
    gather.replace_input_with(0, flat.outputs[0])
    gather.replace_input_with(2, scales)
    gather.replace_input_with(3, zeros)
    for v in (old[0], old[2], old[3]):
        if not v.uses() and (cast := v.producer()) is not None:  # the gather's own scales cast, now dead
            v = cast.inputs[0]
            graph.remove(cast, safe=True)  # safe: also drops its use of the scales initializer
        if not v.uses():
            graph.initializers.pop(v.name, None)
    return (f"tied: the embedding's GatherBlockQuantized reads the lm_head's quantized table ({q.name}), "
            "one copy in the file")


def _only(nodes):
    found = list(nodes)
    return found[0] if len(found) == 1 else None
