"""Reading one checkpoint file, and the architecture facts loading needs: shared by checkpoints and adapters."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from perch.archs import arch_for_model_type
from perch.errors import PerchError


def read_tensor_file(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    try:
        if fmt == "safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped, zero-copy
                return {k: f.get_tensor(k) for k in f.keys()}
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors and unpickling raise many types for one cause: a bad file
        raise PerchError(f"cannot read {path}: {e}. The file is corrupt, truncated or not a checkpoint: "
                         "re-download it.") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PerchError(f"{path} does not hold a flat state dict of tensors; re-save it with save_pretrained")
    return sd


def arch_entry(config):
    """The architecture module of a config (its PREFIX and EMBEDDING keys), or None."""
    return arch_for_model_type(getattr(config, "model_type", None))


def read_json(path: Path, missing: str) -> object:
    """A JSON file's content; PerchError naming the file and the fix when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PerchError(f"{path} not found: {missing}") from None
    except (OSError, ValueError) as e:
        raise PerchError(f"{path} is unreadable or not valid JSON ({e}); re-download or re-save it") from e
