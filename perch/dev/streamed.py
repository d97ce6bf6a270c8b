"""Write a full-size random checkpoint one block at a time, as safetensors shards with an index.

Why: `from_config(...).save_pretrained()` holds the whole model (14 GB for Falcon-7B in bf16) and more while
it saves; on a 24 GiB machine shared with other work that is the difference between fitting and not. Here
the model is built on the meta device, and each top-level block (embedding, one decoder layer, final norm,
head) is materialised on the CPU, initialised with transformers' own `_init_weights`, written, and dropped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

SHARD_BYTES = 2 << 30  # ~2 GiB per shard, like save_pretrained's default 5 GB but kinder to page cache


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted prefix, module) for every leaf-holding block: decoder layers one by one, the rest whole."""
    out = []
    for name, mod in model.named_children():
        layers = next((c for c in mod.children() if isinstance(c, nn.ModuleList)), None) if name != "lm_head" else None
        if layers is None:
            out.append((name, mod))
            continue
        lname = next(n for n, c in mod.named_children() if c is layers)
        for cname, child in mod.named_children():
            if child is layers:
                out.extend((f"{name}.{lname}.{i}", layer) for i, layer in enumerate(layers))
            else:
                out.append((f"{name}.{cname}", child))
    return out


def write_streamed(config, dtype: torch.dtype, out_dir: str | os.PathLike) -> Path:
    """Save a random `config` model into `out_dir` (config.json, shards, index) without ever holding it whole."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = _tied_names(model)
    index, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, size = {}, 0

    for prefix, block in blocks(model):
        block.to_empty(device="cpu")
        with torch.no_grad():
            block.apply(model._init_weights)
        for k, v in block.state_dict().items():
            name = f"{prefix}.{k}"
            if name in tied:
                continue
            shard[name] = v.detach().to(dtype).contiguous()
            size += v.numel() * v.element_size()
        if size >= SHARD_BYTES:
            flush()
        block.to("meta")
    flush()
    # One shard keeps save_pretrained's single-file name, so loaders that look for it still find it.
    if n == 1:
        (out / "model-00001.safetensors").rename(out / "model.safetensors")
    else:
        total = sum((out / f).stat().st_size for f in set(index.values()))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2))
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    return out


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share a tensor with an earlier one (a tied head): saved once, as transformers does."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
