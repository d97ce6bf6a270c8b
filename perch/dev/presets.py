"""Built-in presets: random-weight checkpoints written with `save_pretrained`, so every command runs offline.

Tiny presets are for tests and the demo; full-size presets have the public shapes (random weights) for
speed and memory benchmarks, where weight values do not matter. A preset is materialised once into the
cache (`$PERCH_CACHE` or ~/.cache/perch) and then loaded through the same code as a real checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from perch.errors import PerchError

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

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("falcon-tiny", "falcon", {**_FALCON_TINY, **_SPECIAL}, "7B-style multi-query, parallel attention", tags=("tiny",)),
        Preset("falcon40b-tiny", "falcon", {**_FALCON_TINY, **_SPECIAL, "new_decoder_architecture": True,
               "num_attention_heads": 8, "num_kv_heads": 2}, "40B/Falcon2-style grouped attention, 2 KV groups", tags=("tiny",)),
        Preset("falcon-mamba-tiny", "falcon_mamba", {**_MAMBA_TINY, **_SPECIAL}, "Falcon-Mamba, 2 layers", tags=("tiny",)),
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
    """The preset's checkpoint directory, written once (atomically) into the cache."""
    p = get(name)
    key = hashlib.sha256(json.dumps([p.config, p.tokenizer_vocab, p.dtype, seed], sort_keys=True).encode()).hexdigest()[:10]
    final = cache_root() / "presets" / f"{name}-{key}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        write_preset(name, tmp, seed)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_preset(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Random-initialise the preset's transformers model and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from perch.dev.tokenizer import build_tokenizer, save_tokenizer

    p = get(name)
    config = make_config(name)
    dtype = getattr(torch, p.dtype)
    torch.manual_seed(seed)
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
