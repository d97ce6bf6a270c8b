"""transformers.js' cache layout for multi-query Falcon: one fused K,V tensor per layer.

transformers.js (src/configs.js, getKeyValueNames) feeds `past_key_values.{i}.key_value` and reads
`present.{i}.key_value` whenever config.json says `multi_query`; it only passes the tensors back, so the
packing is ours: K in the first half of the last axis, V in the second, (B, kv_heads, S, 2 * head_dim).
A cache policy over Falcon's one forward (FalconCore.run), like the past/present and in-place ones.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from perch.archs.falcon import FalconCore, additive_mask
from perch.spec import ModelIO, StateSpec


class FalconFusedKV(nn.Module):
    """(input_ids, attention_mask, position_ids, kv0, kv1, ...) -> (logits, present kv0, kv1, ...)."""

    def __init__(self, core: FalconCore):
        super().__init__()
        self.core = core

    def forward(self, input_ids, attention_mask, position_ids, *past):
        mask = additive_mask(attention_mask, input_ids.shape[1])
        present: list[torch.Tensor] = []

        def attend(i, attn, q, k, v, mask):
            hd = k.shape[-1]
            k_all = torch.cat([past[i][..., :hd], k], dim=2)  # (B, nkv, S, hd)
            v_all = torch.cat([past[i][..., hd:], v], dim=2)
            present.append(torch.cat([k_all, v_all], dim=-1))
            return attn.attend(q, k_all, v_all, mask)

        return (self.core.run(input_ids, position_ids, mask, attend), *present)


def fused_kv_io(io: ModelIO) -> ModelIO:
    """Falcon's key and value states as one (batch, kv_heads, context, 2 * head_dim) state per layer."""
    key = io.state("key")
    shape = (*key.shape[:-1], 2 * int(key.shape[-1]))
    fused = StateSpec("key_value", shape, key.dtype, key.num_layers, "past_key_values.{i}.key_value",
                      "present.{i}.key_value", key.coreml_name)
    return dataclasses.replace(io, states=(fused,))

