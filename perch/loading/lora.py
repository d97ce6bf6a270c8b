"""PEFT LoRA adapters (as QLoRA fine-tuning saves them) merged into a state dict: W += scale * B @ A."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from perch.errors import PerchError
from perch.loading.files import arch_entry, read_json, read_tensor_file


# Adapter features that change the model beyond W += scale * B @ A: merging them here would be wrong.
_LORA_REJECT = ("use_dora", "layer_replication", "alora_invocation_tokens", "target_parameters",
                "trainable_token_indices", "use_qalora", "use_bdlora", "arrow_config")
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|base_layer\.bias|base_layer\.weight)$")


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    cfg = read_json(path, "pass the directory PEFT's save_pretrained wrote")
    if cfg.get("peft_type") != "LORA":
        raise PerchError(f"adapter {adapter_dir}: PEFT type {cfg.get('peft_type')!r} is not supported, only LoRA; "
                         "merge it with peft's merge_and_unload(), save, and export the merged model")
    bad = [k for k in _LORA_REJECT if cfg.get(k)]
    if bad:
        raise PerchError(f"adapter {adapter_dir}: {', '.join(bad)} is not supported (DoRA and LoRA variants do "
                         "not merge as W += s*B@A); merge with peft's merge_and_unload() and export that model")
    return cfg


def _adapter_tensors(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    for name, fmt in (("adapter_model.safetensors", "safetensors"), ("adapter_model.bin", "pickle")):
        if (adapter_dir / name).is_file():
            if fmt == "pickle" and not allow_pickle:
                raise PerchError(f"{adapter_dir / name} is a pickle file; pass --allow-pickle if you trust it")
            sd = read_tensor_file(adapter_dir / name, fmt)
            return {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    raise PerchError(f"no adapter_model.safetensors in {adapter_dir}")


def _lora_scale(cfg: dict, module: str, rank: int) -> float:
    def pattern(patterns: dict, default):  # peft's get_pattern_key: the first key matching the name's tail
        key = next((k for k in patterns or {} if re.match(rf"(.*\.)?({k})$", module)), None)
        return default if key is None else patterns[key]

    r, alpha = pattern(cfg.get("rank_pattern"), cfg["r"]), pattern(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    if r != rank:
        raise PerchError(f"adapter module {module}: adapter_config says r={r} but lora_A has rank {rank}")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def merge_adapter(state_dict: dict[str, torch.Tensor], adapter_dir: str | Path, config, *,
                  allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """`state_dict` with a PEFT LoRA adapter merged in (W += scale * B @ A), as peft's merge_and_unload does.

    fan_in_fan_out is ignored as peft ignores it for nn.Linear (every Falcon/Falcon-Mamba target); embedding
    LoRA merges transposed. Bias and modules_to_save tensors replace the base ones.
    """
    adapter_dir = Path(adapter_dir)
    cfg, tensors = _adapter_config(adapter_dir), _adapter_tensors(adapter_dir, allow_pickle)
    entry, sd = arch_entry(config), dict(state_dict)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and entry is not None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        mod, part = (m["mod"], m["part"]) if m else key.rpartition(".")[::2]
        if "lora_" in key and not m:
            raise PerchError(f"adapter tensor {key} is not a plain LoRA weight (DoRA or another variant?)")
        groups.setdefault(mod, {})[part.removeprefix("base_layer.")] = value
    for mod, parts in groups.items():
        _merge_module(sd, mod, parts, cfg, entry, tied)
    if tied:
        sd["lm_head.weight"] = sd[entry.EMBEDDING]
    return sd


def _target(sd: dict, mod: str, suffix: str, entry: dict | None, tied: bool) -> str:
    key = f"{mod}.{suffix}"
    if tied and key == "lm_head.weight":
        return entry.EMBEDDING  # one tensor: peft merges into the shared parameter
    for cand in (key, f"{entry.PREFIX}.{key}" if entry else key):
        if cand in sd:
            return cand
    raise PerchError(f"adapter targets {key}, which this model does not have: the adapter was trained "
                     "for another base model")


def _merge_module(sd: dict, mod: str, parts: dict, cfg: dict, entry: dict | None, tied: bool) -> None:
    a, b = parts.pop("lora_A.weight", parts.pop("lora_embedding_A", None)), parts.pop("lora_B.weight", None)
    emb_b, lora_bias = parts.pop("lora_embedding_B", None), parts.pop("lora_B.bias", None)
    b = b if b is not None else emb_b
    for suffix, value in parts.items():  # bias / modules_to_save tensors replace the base ones
        key = _target(sd, mod, suffix, entry, tied)
        _same_shape(key, sd[key], value)
        sd[key] = value.to(sd[key].dtype)
    if a is None and b is None:
        return
    if a is None or b is None:
        raise PerchError(f"adapter module {mod} has only one of lora_A / lora_B; the adapter file is incomplete")
    key, scale = _target(sd, mod, "weight", entry, tied), _lora_scale(cfg, mod, a.shape[0])
    delta = b.float() @ a.float() * scale
    delta = delta.T if emb_b is not None else delta  # peft's Embedding LoRA stores A (r, vocab), B (dim, r)
    _same_shape(key, sd[key], delta)
    sd[key] = (sd[key].float() + delta).to(sd[key].dtype)
    if lora_bias is not None:
        bias = _target(sd, mod, "bias", entry, tied)
        sd[bias] = (sd[bias].float() + lora_bias.float() * scale).to(sd[bias].dtype)


def _same_shape(key: str, base: torch.Tensor, update: torch.Tensor) -> None:
    if base.shape != update.shape:
        raise PerchError(f"adapter update for {key} has shape {tuple(update.shape)} but the model's is "
                         f"{tuple(base.shape)}: the adapter was trained for another base model")
