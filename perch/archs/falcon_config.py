"""Falcon's config side: RefinedWeb translation, the attention layout a config implies, what is refused
by name, and the fused QKV split. The module (perch/archs/falcon.py) re-exports these names."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_LEGACY_KEYS = {"n_embed": "hidden_size", "n_head": "num_attention_heads", "n_head_kv": "num_kv_heads",
                "n_layer": "num_hidden_layers"}


def translate_config(raw: dict) -> dict:
    """RW remote-code config -> FalconConfig keys, as transformers' `convert_custom_code_checkpoint.py` does.

    Why: Falcon shipped as remote code first; RefinedWeb (40B) is what FalconConfig calls
    new_decoder_architecture, and n_head_kv marks it too.
    """
    if raw.get("model_type") not in ("RefinedWebModel", "RefinedWeb"):
        return raw
    out = {_LEGACY_KEYS.get(k, k): v for k, v in raw.items()}
    out["new_decoder_architecture"] = raw["model_type"] == "RefinedWeb" or "n_head_kv" in raw
    out["model_type"] = "falcon"
    out["architectures"] = ["FalconForCausalLM" if a == "RWForCausalLM" else a
                            for a in raw.get("architectures") or ["RWForCausalLM"]]
    return out


@dataclass(frozen=True)
class FalconLayout:
    """What a Falcon config means once transformers' precedence rules are applied.

    `num_kv_heads` is the number of K,V heads stored in `query_key_value` (1 for multi_query);
    `layer_norms` names the LayerNorm modules each decoder layer has, in the order they are applied.
    """

    variant: str
    parallel_attn: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_norms: tuple[str, ...]


def _unsupported(what: str):
    from perch.archs import unsupported

    return unsupported(what)


def falcon_layout(config) -> FalconLayout:
    """Resolve a FalconConfig into its layout; UnsupportedModel for ALiBi and combinations HF cannot run."""
    if getattr(config, "alibi", False):
        raise _unsupported("ALiBi positional bias (alibi=true, e.g. tiiuae/falcon-rw-1b); "
                           "Perch exports rotary Falcon models (falcon-7b, falcon-40b, falcon-11B)")
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        raise _unsupported("apply_residual_connection_post_layernorm=true (transformers' Falcon ignores it)")
    nh = config.num_attention_heads
    new_decoder = bool(config.new_decoder_architecture)
    n_ln = getattr(config, "num_ln_in_parallel_attn", None)
    if new_decoder:
        # transformers documents parallel_attn as ignored here, but its layer then builds the sequential
        # norms and fails in forward (no ln_attn): no reference exists to validate an export against.
        if not config.parallel_attn:
            raise _unsupported("new_decoder_architecture with parallel_attn=false (transformers cannot run it)")
        nkv, variant = config.num_kv_heads, "grouped"
        norms = ("ln_attn", "ln_mlp") if n_ln in (None, 2) else ("input_layernorm",)
    else:
        if n_ln == 2 and config.parallel_attn:
            raise _unsupported("num_ln_in_parallel_attn=2 without new_decoder_architecture "
                               "(transformers cannot run it)")
        nkv, variant = (1, "multi_query") if config.multi_query else (nh, "multi_head")
        if not config.multi_query and config.num_kv_heads not in (None, nh):
            raise _unsupported(f"multi_query=false with num_kv_heads={config.num_kv_heads} != {nh} heads")
        norms = ("input_layernorm",) if config.parallel_attn else ("input_layernorm", "post_attention_layernorm")
    if nkv < 1 or nh % nkv:
        raise _unsupported(f"{nh} attention heads in {nkv} K,V groups (heads must divide evenly)")
    return FalconLayout(variant, new_decoder or bool(config.parallel_attn), nh, nkv, config.hidden_size // nh, norms)


# config.json must state these: transformers would otherwise fill in Falcon-7B's sizes (4544, 71, 32).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers")
ACTIVATIONS = ("gelu",)  # FalconMLP applies exact (erf) gelu, as transformers' "gelu"
_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings")


def check_config(config) -> None:
    """Refuse every Falcon setting this module does not implement, naming the field, the value and the fix."""
    act = getattr(config, "activation", "gelu")
    if act not in ACTIVATIONS:
        raise _unsupported(f"activation={act!r}: this Falcon exporter implements activation='gelu' only "
                           "(exporting another would give wrong numbers)")
    for key in _SIZES + (("ffn_hidden_size",) if getattr(config, "ffn_hidden_size", None) is not None else ()):
        value = getattr(config, key, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _unsupported(f"{key}={value!r}: config.json needs a positive whole number for {key}")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads:
        raise _unsupported(f"hidden_size={hidden} with num_attention_heads={heads}: hidden_size must be divisible "
                           "by num_attention_heads; fix config.json to the values the weights were trained with")
    if (hidden // heads) % 2:
        raise _unsupported(f"head size {hidden // heads} (hidden_size / num_attention_heads) is odd: rotary "
                           "embeddings rotate pairs of channels; use an even head size")
    falcon_layout(config)  # variants: ALiBi, combinations transformers cannot run, K,V groups


def falcon_variant(config) -> str:
    """One of "multi_query" (7B-style), "grouped" (new_decoder_architecture), "multi_head" (multi_query=false)."""
    return falcon_layout(config).variant


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def num_kv_heads(config) -> int:
    """The true number of K,V heads the checkpoint stores (transformers' sdpa path tiles them)."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def split_fused_qkv(fused: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, qkv) -> q (B, nh, T, hd), k and v (B, nkv, T, hd).

    Why: Falcon fuses Q,K,V in one projection, interleaved per KV group: for each group, its query heads,
    then one K head, then one V head (modeling_falcon `_split_heads`). The multi-head layout interleaves
    q,k,v per head. Query head j belongs to K,V group j // (nh / nkv) in every layout.
    """
    b, t, _ = fused.shape
    nh, hd, nkv = config.num_attention_heads, config.hidden_size // config.num_attention_heads, num_kv_heads(config)
    if config.new_decoder_architecture or config.multi_query:
        g = nh // nkv
        x = fused.view(b, t, nkv, g + 2, hd)
        q = x[:, :, :, :g].reshape(b, t, nh, hd)
        k, v = x[:, :, :, g], x[:, :, :, g + 1]  # (B, T, nkv, hd)
    else:
        x = fused.view(b, t, nh, 3, hd)
        q, k, v = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
