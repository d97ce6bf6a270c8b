"""The architectures Perch exports, as data: HF names, variants, and what each one rejects.

`SUPPORTED` is the single table `perch export --list` prints and `detect_arch` matches against. A checkpoint
is recognised by its `model_type` (or, failing that, its `architectures`), then checked for the variants we
cannot export (ALiBi, RoPE scaling, non-bitsandbytes quantization, combinations transformers cannot run).
"""
from __future__ import annotations

from dataclasses import dataclass

from perch.errors import UnsupportedModel

SUPPORTED: dict[str, dict] = {
    "falcon": {
        "hf_model_types": ["falcon", "RefinedWebModel", "RefinedWeb"],
        "hf_architectures": ["FalconForCausalLM", "RWForCausalLM"],
        "description": "Falcon decoder with rotary attention (Falcon-7B/40B/180B, Falcon2-11B)",
        "variants": [
            "multi_query: one K,V head shared by all query heads (Falcon-7B)",
            "grouped: new_decoder_architecture, num_kv_heads K,V groups (Falcon-40B/180B, Falcon2-11B)",
            "multi_head: multi_query=false, one K,V head per query head",
            "attention and MLP in parallel (parallel_attn) or in sequence",
        ],
        "prefix": "transformer",  # the base model's attribute in FalconForCausalLM
        "embedding": "transformer.word_embeddings.weight",
    },
    "falcon_mamba": {
        "hf_model_types": ["falcon_mamba"],
        "hf_architectures": ["FalconMambaForCausalLM"],
        "description": "Falcon-Mamba selective state-space model (Falcon-Mamba-7B)",
        "variants": ["one variant: Mamba-1 mixer with RMS-normed B, C and dt"],
        "prefix": "backbone",
        "embedding": "backbone.embeddings.weight",
    },
}

_NOT_SUPPORTED_NOTE = "ALiBi Falcon checkpoints (falcon-rw-1b/7b), RoPE scaling, GPTQ/AWQ-quantized checkpoints"


def _supported_names() -> str:
    return ", ".join(f"{a} ({', '.join(e['hf_model_types'])})" for a, e in SUPPORTED.items())


def _unsupported(what: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"not supported: {what}. Perch exports: {_supported_names()}; `perch export --list` lists them."
    )


unsupported = _unsupported  # the name the architecture modules use


def detect_arch(config) -> str:
    """The Perch architecture name for a transformers config, or UnsupportedModel ("not supported: ...")."""
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    arch = next((a for a, e in SUPPORTED.items() if model_type in e["hf_model_types"]), None)
    if arch is None and not model_type:  # a config without model_type: trust its architectures
        arch = next((a for a, e in SUPPORTED.items() if set(architectures) & set(e["hf_architectures"])), None)
    if arch is None:
        raise _unsupported(f"model_type {model_type!r} (architectures {architectures or 'unset'})")
    heads = SUPPORTED[arch]["hf_architectures"]
    if architectures and not set(architectures) & set(heads):
        raise _unsupported(f"{', '.join(architectures)}: Perch exports causal language models ({', '.join(heads)})")
    _check_quantization(config)
    _check_rope(config)
    arch_module(arch).check_config(config)  # every field and value the architecture does not implement
    return arch


def _check_quantization(config) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers keeps an enum on config objects
    if method not in (None, "bitsandbytes"):
        raise _unsupported(f"{method}-quantized checkpoint (only bitsandbytes 4/8-bit is dequantized); "
                           "export from the unquantized model instead")


def _check_rope(config) -> None:
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_scaling`.
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if not isinstance(params, dict):
            continue
        kind = params.get("rope_type", params.get("type"))
        if kind not in (None, "default"):
            raise _unsupported(f"RoPE scaling {kind!r} ({attr}={params}); only default rotary embeddings export")


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


def falcon_variant(config) -> str:
    """One of "multi_query" (7B-style), "grouped" (new_decoder_architecture), "multi_head" (multi_query=false).

    Whether attention and MLP run in parallel is `falcon_layout(config).parallel_attn`.
    """
    return falcon_layout(config).variant


def describe_supported() -> str:
    """The text `perch export --list` prints: each architecture, its HF names and its variants."""
    lines = ["Architectures Perch exports (matched on config.json's model_type, then architectures):", ""]
    for arch, e in SUPPORTED.items():
        lines += [
            f"{arch}: {e['description']}",
            f"  model_type:    {', '.join(e['hf_model_types'])}",
            f"  architectures: {', '.join(e['hf_architectures'])}",
            *(f"  variant:       {v}" for v in e["variants"]),
            "",
        ]
    lines.append(f"Not supported: {_NOT_SUPPORTED_NOTE}.")
    return "\n".join(lines)


ARCH_MODULES = {"falcon": "perch.archs.falcon", "falcon_mamba": "perch.archs.falcon_mamba"}


def arch_module(arch: str):
    import importlib

    return importlib.import_module(ARCH_MODULES[arch])
