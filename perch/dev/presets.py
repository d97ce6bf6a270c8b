"""Built-in presets: random-weight checkpoints written with `save_pretrained`, so every command runs offline.

Tiny presets are for tests and the demo; full-size presets have the public shapes (random weights) for
speed and memory benchmarks, where weight values do not matter. A preset is materialised once into the
cache (`$PERCH_CACHE` or ~/.cache/perch) and then loaded through the same code as a real checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from perch.errors import PerchError
from perch.staging import build_once

TINY_VOCAB = 512  # the offline BPE tokenizer's size for tiny presets


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    config: dict
    description: str
    tokenizer_vocab: int = TINY_VOCAB
    dtype: str = "float32"  # full-size presets are written in bf16 (half the disk, what a GPU runs)
    tags: tuple[str, ...] = field(default_factory=tuple)


_FALCON_TINY = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
    parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False, max_position_embeddings=512,
)
_MAMBA_TINY = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, expand=2,
    time_step_rank=8, use_conv_bias=True, use_bias=False, mixer_rms_eps=1e-6,
)
_SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
# Falcon-H1: head_dim set apart from hidden/heads and non-unit µP multipliers (the published checkpoints have
# both), so a module that ignored either would fail the parity tests. Weights are drawn 5x wider than the
# 0.02 default: at 0.02 the random conv weights leave the SSM state near 1e-5, below fp16's normal range
# (6.1e-5), so Core ML's fp16 states would lose ~2% of it to subnormal rounding, an artifact of the preset.
_H1_TINY = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
    mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=False, max_position_embeddings=512,
    embedding_multiplier=5.65, lm_head_multiplier=1.0, key_multiplier=0.4, attention_in_multiplier=1.2,
    attention_out_multiplier=0.9, ssm_in_multiplier=1.3, ssm_out_multiplier=0.3, mlp_multipliers=[1.1, 0.6],
    ssm_multipliers=[0.8, 1.5, 1.2, 0.7, 1.1], initializer_range=0.1, tie_word_embeddings=False,
)
# Approximate public shapes of Falcon-H1-0.5B / 1.5B (random weights: for speed and memory only).
_H1_05B = dict(_H1_TINY, vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_hidden_layers=36,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24,
               mamba_d_head=64, mamba_d_state=128, mamba_chunk_size=128, max_position_embeddings=16384,
               lm_head_multiplier=0.04, initializer_range=0.02, rope_parameters={"rope_type": "default", "rope_theta": 1e11})

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("falcon-tiny", "falcon", {**_FALCON_TINY, **_SPECIAL}, "7B-style multi-query, parallel attention", tags=("tiny",)),
        Preset("falcon40b-tiny", "falcon", {**_FALCON_TINY, **_SPECIAL, "new_decoder_architecture": True,
               "num_attention_heads": 8, "num_kv_heads": 2}, "40B/Falcon2-style grouped attention, 2 KV groups", tags=("tiny",)),
        Preset("falcon-mamba-tiny", "falcon_mamba", {**_MAMBA_TINY, **_SPECIAL}, "Falcon-Mamba, 2 layers", tags=("tiny",)),
        Preset("falcon-h1-tiny", "falcon_h1", {**_H1_TINY, **_SPECIAL}, "Falcon-H1 hybrid attention + Mamba-2, 2 layers",
               tags=("tiny",)),
        Preset("falcon-h1-mid", "falcon_h1", {**_H1_TINY, **_SPECIAL, "vocab_size": 65024, "hidden_size": 1024,
               "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8, "head_dim": 64,
               "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_d_state": 64,
               "max_position_embeddings": 2048}, "mid-size Falcon-H1 (hidden 1024, 8 layers)", tags=("bench",)),
        Preset("falcon-h1-0.5b", "falcon_h1", {**_H1_05B, **_SPECIAL}, "Falcon-H1-0.5B shapes (0.52B params), random "
               "weights", dtype="bfloat16", tags=("full",)),
        Preset("falcon-h1-1.5b", "falcon_h1", {**_H1_05B, **_SPECIAL, "vocab_size": 65537, "hidden_size": 2048,
               "intermediate_size": 4096, "num_hidden_layers": 24, "head_dim": 128, "mamba_d_ssm": 3072,
               "mamba_n_heads": 48, "mamba_d_state": 256, "mamba_chunk_size": 256},
               "Falcon-H1-1.5B shapes (1.48B params), random weights", dtype="bfloat16", tags=("full",)),
        Preset("falcon-mid", "falcon", {**_FALCON_TINY, **_SPECIAL, "vocab_size": 65024, "hidden_size": 1024,
               "num_hidden_layers": 8, "num_attention_heads": 16, "max_position_embeddings": 2048},
               "mid-size 7B-style (hidden 1024, 8 layers) for CPU benchmarks", tags=("bench",)),
        Preset("falcon-mamba-mid", "falcon_mamba", {**_MAMBA_TINY, **_SPECIAL, "vocab_size": 65024, "hidden_size": 1024,
               "num_hidden_layers": 8, "time_step_rank": 64}, "mid-size Falcon-Mamba (hidden 1024, 8 layers)", tags=("bench",)),
        Preset("falcon-7b", "falcon", {**_FALCON_TINY, "vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32,
               "num_attention_heads": 71, "max_position_embeddings": 2048, "bos_token_id": 11, "eos_token_id": 11},
               "Falcon-7B shapes (6.9B params), random weights", dtype="bfloat16", tags=("full",)),
        Preset("falcon-40b", "falcon", {**_FALCON_TINY, "vocab_size": 65024, "hidden_size": 8192, "num_hidden_layers": 60,
               "num_attention_heads": 128, "num_kv_heads": 8, "new_decoder_architecture": True,
               "max_position_embeddings": 2048, "bos_token_id": 11, "eos_token_id": 11},
               "Falcon-40B shapes (41.8B params), random weights", dtype="bfloat16", tags=("full",)),
        Preset("falcon-mamba-7b", "falcon_mamba", {**_MAMBA_TINY, "vocab_size": 65024, "hidden_size": 4096,
               "num_hidden_layers": 64, "time_step_rank": 256, "bos_token_id": 0, "eos_token_id": 11, "pad_token_id": 0,
               "tie_word_embeddings": False}, "Falcon-Mamba-7B shapes (7.3B params), random weights",
               dtype="bfloat16", tags=("full",)),
    ]
}


def cache_root() -> Path:
    """Where presets, fixtures and other built things are cached: `$PERCH_CACHE`, or `~/.cache/perch`."""
    env = os.environ.get("PERCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "perch"


def make_config(name: str):
    """The transformers config object of a preset."""
    import transformers

    from perch.archs import arch_module

    p = get(name)
    mod = arch_module(p.arch)
    return getattr(transformers, mod.HF_CONFIG)(**p.config, architectures=[mod.HF_ARCHITECTURES[0]])


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise PerchError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_dir(name: str, seed: int = 0) -> Path:
    """The preset's checkpoint directory, written once into the cache (perch.staging: locked, atomic)."""
    p = get(name)
    key = hashlib.sha256(json.dumps([p.config, p.tokenizer_vocab, p.dtype, seed], sort_keys=True).encode()).hexdigest()[:10]
    final = cache_root() / "presets" / f"{name}-{key}"
    return build_once(final, lambda tmp: write_preset(name, tmp, seed), lambda d: (d / "config.json").is_file())


def write_preset(name: str, out_dir: str | os.PathLike, seed: int = 0, config=None) -> Path:
    """Random-initialise the preset's transformers model and save it with its tokenizer.

    Full-size presets stream (`perch.dev.streamed.write_streamed`: one layer in memory at a time, 1.5 GB
    for Falcon-7B instead of the whole 14 GB model); tiny ones go through `save_pretrained`.
    `config` overrides the preset's (a full-width preset at reduced depth, for the parity checks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from perch.dev.tokenizer import build_tokenizer, save_tokenizer

    p = get(name)
    config = config or make_config(name)
    dtype = getattr(torch, p.dtype)
    torch.manual_seed(seed)
    if "full" in p.tags:
        from perch.dev.streamed import write_streamed

        write_streamed(config, dtype, out_dir)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(build_tokenizer(p.tokenizer_vocab), out_dir)
    return Path(out_dir)


def describe() -> str:
    rows = [f"  {p.name:<18} {p.arch:<13} {p.description}" for p in PRESETS.values()]
    return "presets (random weights, built offline):\n" + "\n".join(rows)


def resolve_model(model: str | os.PathLike) -> str | Path:
    """A preset name becomes its cached checkpoint directory; anything else is passed on unchanged."""
    return preset_dir(str(model)) if str(model) in PRESETS else model
