"""The ONNX in-place variant of Falcon: a fixed-size K,V buffer per layer, updated by ONNX Runtime's
`com.microsoft.GroupQueryAttention` with the past and present bound to the same OrtValue.

The default past/present graph concatenates the cache every step (a copy of the whole cache per layer per
token). Here each layer's buffer is (batch, num_kv_heads, max_context, head_dim); GroupQueryAttention writes
the new K,V at positions [total - T, total) and attends over [0, total). Left padding is an additive
attention bias (the same mask as the default graph); rotary is applied before the op, by our module, so
positions follow `position_ids` exactly as in the default graph.

For architectures with the "inplace" front-end (Falcon); Falcon-Mamba's states are fixed-size already.
"""
from __future__ import annotations

import torch
from torch import nn

from perch.archs.masks import additive_mask

# The optional GroupQueryAttention inputs between the required ones and attention_bias (opset com.microsoft 1):
# cos_cache, sin_cache, position_ids. We leave them empty: rotary happens in our module.
_GQA_SKIPPED_BEFORE_BIAS = 3


@torch.library.custom_op("perch::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, bias: torch.Tensor, num_heads: int,
                          kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager meaning of the ONNX op: query (B, T, nh*hd); key, value (B, T, nkv*hd); buffers (B, nkv, C, hd);
    bias (B, 1, T, total) additive. Writes the new K,V at [total-T, total) and attends causally over [0, total).
    Returns (output (B, T, nh*hd), present_key, present_value) with the buffers' shape."""
    b, t, _ = query.shape
    total, hd = bias.shape[-1], past_key.shape[-1]
    k_new = key.view(b, t, kv_num_heads, hd).transpose(1, 2)
    v_new = value.view(b, t, kv_num_heads, hd).transpose(1, 2)
    present_k, present_v = past_key.clone(), past_value.clone()
    present_k[:, :, total - t : total] = k_new
    present_v[:, :, total - t : total] = v_new
    causal = additive_mask(torch.ones(b, total, dtype=torch.long), t).to(bias.dtype)
    g = num_heads // kv_num_heads
    q = query.view(b, t, num_heads, hd).transpose(1, 2).reshape(b, kv_num_heads, g * t, hd) * hd**-0.5
    scores = (q @ present_k[:, :, :total].transpose(-1, -2)).view(b, kv_num_heads, g, t, total)
    scores = scores + (bias + causal).unsqueeze(1)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype).view(b, kv_num_heads, g * t, total)
    out = (probs @ present_v[:, :, :total]).view(b, num_heads, t, hd).transpose(1, 2).reshape(b, t, num_heads * hd)
    return out, present_k, present_v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, bias, num_heads, kv_num_heads):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _gqa_schema():
    """onnx ships no schemas for onnxruntime's contrib ops; onnxscript needs one to emit the node."""
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache", "position_ids", "attention_bias"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "tensor(int64)"}
    inputs = [OpSchema.FormalParameter(n, types.get(n, "T"), param_option=opt if i >= 7 or i in (3, 4) else
                                       OpSchema.FormalParameterOption.Single) for i, n in enumerate(names)]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "")],
    )


def _gqa_onnx(query, key, value, past_key, past_value, bias, num_heads: int, kv_num_heads: int):
    """torch op -> com.microsoft.GroupQueryAttention; seqlens_k and total_sequence_length derive from the bias."""
    import onnxscript
    from onnx import TensorProto
    from onnxscript import opset18 as op

    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    total = op.Slice(op.Shape(bias), [3], [4])  # (1,) int64: keys after this call
    batch = op.Slice(op.Shape(query), [0], [1])
    # Every row shares buffer positions (left padding is masked, not shifted): seqlens_k = total - 1 per row.
    seqlens_k = op.Cast(op.Expand(op.Sub(total, [1]), batch), to=TensorProto.INT32)
    total_scalar = op.Cast(op.Squeeze(total, [0]), to=TensorProto.INT32)
    return gqa(
        query, key, value, past_key, past_value, seqlens_k, total_scalar, *([None] * _GQA_SKIPPED_BEFORE_BIAS), bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads,
    )


TRANSLATIONS = {torch.ops.perch.group_query_attention.default: _gqa_onnx}


class Inplace(nn.Module):
    """(input_ids, attention_mask (B, total), position_ids, k0, v0, k1, ...) -> (logits, present k0, v0, ...).

    The K,V inputs are (B, nkv, max_context, hd) buffers; the presents have the same shape and are meant to
    be bound to the same memory. Any core whose forward takes an `attend` cache policy (an architecture
    that lists the "inplace" front-end) runs unchanged: this is only that policy.
    """

    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, input_ids, attention_mask, position_ids, *buffers):
        bias = additive_mask(attention_mask, input_ids.shape[1])  # (B, 1, T, total)
        present: list[torch.Tensor] = []

        def attend(i, attn, q, k, v, mask):  # q (B, nh, T, hd); k, v (B, nkv, T, hd)
            b, t = q.shape[0], q.shape[2]
            out, pk, pv = group_query_attention(
                q.transpose(1, 2).reshape(b, t, -1), k.transpose(1, 2).reshape(b, t, -1),
                v.transpose(1, 2).reshape(b, t, -1), buffers[2 * i], buffers[2 * i + 1], mask, attn.nh, attn.nkv)
            present.extend((pk, pv))
            return out

        return (self.core.run(input_ids, position_ids, bias, attend), *present)
