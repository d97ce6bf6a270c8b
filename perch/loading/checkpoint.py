"""Find a checkpoint, read its config and weights, merge a LoRA adapter, and build the transformers model.

Weights come back keyed as in the HF causal-LM `state_dict` (`transformer.h.0...`, `backbone.layers.0...`,
`lm_head.weight`), memory-mapped where the dtype allows. bitsandbytes 4/8-bit checkpoints are dequantized in
plain torch from their serialized quant state, so exporting needs no bitsandbytes. Never runs remote code;
pickle checkpoints only on request.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perch.archs import arch_for_model_type, detect_arch, translate_config, unsupported
from perch.loading.bnb import _dequantize_bnb
from perch.loading.checks import check_state_dict
from perch.loading.files import arch_entry, read_json, read_tensor_file
from perch.loading.lora import merge_adapter
from perch.errors import PerchError

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- where the model is
def _hub_cache_dir() -> Path:
    # Read the environment at call time: huggingface_hub freezes its constants at import.
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_dir(model: str | Path) -> Path:
    """A local model directory, or the snapshot of a hub id (`org/name[@revision]`) already in the HF cache.

    Never touches the network (local_files_only), so it works with HF_HUB_OFFLINE=1.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise PerchError(f"{path} is a file: pass the model directory (the one holding config.json)")
    from huggingface_hub import snapshot_download

    cache = _hub_cache_dir()
    repo_id, _, revision = str(model).partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        raise PerchError(
            f"model {str(model)!r} not found: no directory {path.resolve()} and no cached snapshot of hub repo "
            f"{repo_id!r} in {cache}. Pass a local model directory, or download it while online first "
            f"(`hf download {repo_id}`); set HF_HOME or HF_HUB_CACHE if your cache lives elsewhere."
        ) from None


# ---------------------------------------------------------------- config
def load_config(model_dir: str | Path):
    """The transformers config in `model_dir/config.json`, never via remote code.

    Legacy names are mapped by the architecture (e.g. Falcon's RefinedWeb remote-code configs -> FalconConfig).
    """
    path = Path(model_dir) / "config.json"
    raw = read_json(path, "a model directory needs the config.json it was saved with")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise PerchError(f"{path} has no model_type: not a transformers config; re-save the model with save_pretrained")
    raw.pop("auto_map", None)  # the in-library class replaces any remote code it points to
    raw = _decode_special_floats(translate_config(raw))
    _check_required(path, raw)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if raw["model_type"] not in CONFIG_MAPPING:
        if arch_for_model_type(raw["model_type"]) is None:
            raise unsupported(f"model_type {raw['model_type']!r} (architectures {raw.get('architectures') or 'unset'})")
        raise PerchError(f"this transformers lacks model_type {raw['model_type']!r}: upgrade transformers")
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except (TypeError, ValueError) as e:
        raise PerchError(f"{path}: invalid {raw['model_type']} config ({e}); fix or re-save config.json") from e


def _decode_special_floats(raw: dict) -> dict:
    """transformers 5 writes inf/nan as {"__float__": "Infinity"} (Falcon-H1's time_step_limit) and decodes
    them only in its own file reader: do the same, or the config class rejects the field."""
    from transformers import PretrainedConfig

    decode = getattr(PretrainedConfig, "_decode_special_floats", None)
    return decode(raw) if decode is not None else raw


def _check_required(path: Path, raw: dict) -> None:
    """Fields that size the weights must be in config.json itself, never transformers' defaults."""
    mod = arch_for_model_type(raw["model_type"])
    if mod is None:
        return  # an unsupported model_type is refused, by name, where the architecture is resolved
    missing = [k for k in mod.REQUIRED_FIELDS if k not in raw]
    if missing:
        raise PerchError(f"{path} has no {', '.join(missing)}: transformers would fill in its defaults, which do "
                         "not describe these weights; add them to config.json with the values the model was "
                         "trained with")


def _plain_config(config):
    """A copy without quantization_config: the weights we hand on are already dequantized."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


# ---------------------------------------------------------------- weights
def _weight_files(model_dir: Path, allow_pickle: bool) -> tuple[str, list[Path]]:
    for fmt, (single, index) in (("safetensors", SAFETENSORS), ("pickle", PICKLE)):
        if (model_dir / index).is_file():
            files = _shards(model_dir / index)
        elif (model_dir / single).is_file():
            files = [model_dir / single]
        else:
            continue
        if fmt == "pickle" and not allow_pickle:
            raise PerchError(
                f"{model_dir} has only a pickle checkpoint ({files[0].name}); unpickling can run code, so it "
                "is off by default. Pass --allow-pickle (allow_pickle=True) if you trust the file, "
                "or convert it to safetensors."
            )
        return fmt, files
    found = sorted(p.name for p in model_dir.iterdir())
    raise PerchError(f"no weights in {model_dir}: expected {SAFETENSORS[0]}, a sharded {SAFETENSORS[1]}, "
                     f"or (with --allow-pickle) {PICKLE[0]}; found {found}")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise PerchError(f"{index} is not a valid shard index ({type(e).__name__}: {e}); it must be a JSON "
                         'object {"weight_map": {tensor: shard file}}: re-download it') from e
    if not names or not all(isinstance(n, str) for n in names):
        raise PerchError(f"{index} names no shard files (weight_map {weight_map!r:.60}); re-download it")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise PerchError(f"{index.name} lists shards missing from {index.parent}: {missing}; finish the download")
    return [index.parent / n for n in names]


def _read_weights(model_dir: Path, config, allow_pickle: bool, dtype: torch.dtype | None):
    fmt, files = _weight_files(model_dir, allow_pickle)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_tensor_file(f, fmt))
    bnb = _dequantize_bnb(sd, dtype)
    if dtype is not None:  # .to() returns the same mmapped tensor when the dtype already matches
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = _hf_keys(sd, config)
    info = {"format": fmt, "files": [str(f) for f in files], "dequantized_from": bnb}
    return sd, info


def _hf_keys(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Base-model checkpoints get the causal-LM prefix; a tied lm_head is the embedding, as in transformers."""
    entry = arch_entry(config)
    if entry is None:
        return sd
    prefix = entry.PREFIX + "."
    if sd and not any(k.startswith(prefix) for k in sd):
        sd = {k if k.startswith("lm_head.") else prefix + k: v for k, v in sd.items()}
    if getattr(config, "tie_word_embeddings", False) and entry.EMBEDDING in sd:
        sd["lm_head.weight"] = sd[entry.EMBEDDING]
    elif "lm_head.weight" not in sd:
        raise PerchError("the checkpoint has no lm_head.weight and config.tie_word_embeddings is false: it is a "
                         "base model without a language-model head; export the ...ForCausalLM checkpoint")
    return sd


def load_state_dict(model_dir: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = torch.float32,
                    config=None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors keyed as in the HF causal-LM state_dict, floating tensors cast to `dtype`.

    Safetensors (single or sharded) by default; pickle `.bin` only with `allow_pickle` (weights_only=True).
    bitsandbytes 4-bit (nf4/fp4, double quant) and 8-bit weights are dequantized to `dtype`.
    `dtype=None` keeps the stored dtypes.
    """
    model_dir = Path(model_dir)
    return _read_weights(model_dir, config or load_config(model_dir), allow_pickle, dtype)[0]


# ---------------------------------------------------------------- the transformers model
def build_hf_model(config, state_dict: dict[str, torch.Tensor], *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = torch.float32):
    """The transformers causal LM built on `meta` and given `state_dict`'s tensors (assign=True): one copy.

    Non-persistent buffers (rotary inv_freq, Falcon-Mamba's weightless norms) are re-initialised the way
    transformers does after loading. A config/weights mismatch raises PerchError listing the first problems.
    """
    from transformers import AutoModelForCausalLM

    config, device = _plain_config(config), torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _check_keys(model.state_dict(), state_dict)
    moved: dict[int, torch.Tensor] = {}  # by identity, so a tied embedding/lm_head is converted once
    for v in state_dict.values():
        if id(v) not in moved:
            moved[id(v)] = v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
    model.load_state_dict({k: moved[id(v)] for k, v in state_dict.items()}, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _init_buffers(model, device)
    return model.eval()


def _check_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    kinds = {
        "shape mismatches": [f"{k}: weights {tuple(got[k].shape)} vs config {tuple(v.shape)}"
                             for k, v in expected.items() if k in got and got[k].shape != v.shape],
        "missing from the weights": [k for k in expected if k not in got],
        "not in the config's model": [k for k in got if k not in expected],
    }
    problems = [f"{len(p)} {kind}: {'; '.join(p[:3])}{' ...' if len(p) > 3 else ''}" for kind, p in kinds.items() if p]
    if problems:
        raise PerchError(f"config.json does not match the weights: {' | '.join(problems)}. Use the config.json "
                         "saved with these weights (same size, heads and variant).")


def _init_buffers(model, device: torch.device) -> None:
    # Non-persistent buffers are not in the state dict, so they are still on meta. transformers fills them in
    # `_init_weights` after loading (rotary inv_freq from the config, norms to ones); do the same, with the
    # module's loaded parameters flagged as initialised so they are left alone.
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if not meta:
            continue
        for b in meta:
            module._buffers[b] = torch.full_like(module._buffers[b], float("nan"), device=device)
        for p in module.parameters(recurse=False):
            p._is_hf_initialized = True
        model._init_weights(module)
        if any(torch.isnan(module._buffers[b]).any() for b in meta):
            _init_from_ancestors(model, name)
        if any(torch.isnan(module._buffers[b]).any() for b in meta):
            _rebuild_buffers(model, name, module, meta, device)


def _init_from_ancestors(model, name: str) -> None:
    # Some buffers are filled by an enclosing module's `_init_weights` (Falcon-H1's µP `mup_vector` by
    # FalconH1Model, for every layer's mixer): offer each ancestor, its loaded weights flagged as done.
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        for p in ancestor.parameters():
            p._is_hf_initialized = True
        model._init_weights(ancestor)


def _rebuild_buffers(model, name: str, module, buffers: list[str], device: torch.device) -> None:
    # Older transformers (4.x) leave rotary buffers to the module's constructor: build a fresh one.
    try:
        with torch.device(device):
            fresh = type(module)(model.config)
    except TypeError as e:
        raise RuntimeError(f"cannot initialise buffers {buffers} of {name} ({type(module).__name__}) with this "
                           "transformers version") from e
    for b in buffers:
        module._buffers[b] = fresh._buffers[b]


# ---------------------------------------------------------------- all together
@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: what it is (`arch`, `config`), its HF-keyed weights, and where they came from."""

    model_dir: Path
    config: Any
    arch: str
    state_dict: dict = field(repr=False)
    source: dict = field(default_factory=dict)


def load_checkpoint(model: str | Path, *, allow_pickle: bool = False, adapter: str | Path | None = None,
                    dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """Resolve, read config and weights (dequantizing bitsandbytes), merge `adapter`, and check the arch.

    `source` is JSON-ready: path, format, files, adapter path, and `dequantized_from` ("nf4", "int8", ...).
    """
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    arch = detect_arch(config)
    state_dict, info = _read_weights(model_dir, config, allow_pickle, dtype)
    if hasattr(config, "quantization_config"):
        config = _plain_config(config)
    adapter_dir = resolve_model_dir(adapter) if adapter is not None else None
    if adapter_dir is not None:
        state_dict = merge_adapter(state_dict, adapter_dir, config, allow_pickle=allow_pickle)
    check_state_dict(config, state_dict, where=f"the checkpoint in {model_dir}")
    source = {"model": str(model), "path": str(model_dir), **info,
              "adapter": str(adapter_dir) if adapter_dir else None,
              "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "stored"}
    return Checkpoint(model_dir, config, arch, state_dict, source)
