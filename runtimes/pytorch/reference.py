"""The reference runtime: the transformers model behind the step API, on CPU or CUDA.

This is the plain path every artifact is compared against. How transformers' model may be called with its
cache (and how to read that cache back) is each architecture's `reference_forward` / `reference_state`:
e.g. Falcon-Mamba's multi-token forward with a cache restarts the SSM, so it steps token by token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from perch.archs import arch_module
from perch.loading import Checkpoint, build_hf_model, load_checkpoint
from perch.dev.presets import resolve_model
from perch.runtimes.base import Runtime


class ReferenceRuntime(Runtime):
    """transformers' own model, fp32 on CPU by default; `device="cuda"` and bf16/fp16 where present."""

    name = "reference"

    def __init__(self, model: str | Path | Checkpoint, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_context: int | None = None, allow_pickle: bool = False, adapter: str | Path | None = None):
        if not isinstance(model, Checkpoint):
            model = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter)
        ckpt = model
        self.checkpoint, self.arch, self.config = ckpt, ckpt.arch, ckpt.config
        self.arch_mod = arch_module(ckpt.arch)
        self.device, self.dtype = torch.device(device), dtype
        # the check treats a top-1 flip inside one step of this grid as a tie (bf16: 8 bits, fp16: 11)
        self.logit_bits = {torch.bfloat16: 8, torch.float16: 11}.get(dtype)
        self.model = build_hf_model(ckpt.config, ckpt.state_dict, device=device, dtype=dtype).eval()
        self.vocab_size = ckpt.config.vocab_size
        self.max_context = max_context or getattr(ckpt.config, "max_position_embeddings", None) or 1 << 20
        self.io = None  # transformers' own model: no exported graph, names follow ModelIO's convention
        self.reset(1)

    def _reset(self, batch_size: int) -> None:
        self.cache = None

    @torch.inference_mode()
    def _forward(self, input_ids, mask, positions) -> np.ndarray:
        dev = self.device
        logits, self.cache = self.arch_mod.reference_forward(
            self.model, self.cache, torch.from_numpy(input_ids).to(dev), torch.from_numpy(mask).to(dev),
            torch.from_numpy(positions).to(dev))
        return logits.float().cpu().numpy()

    def state(self) -> dict[str, np.ndarray]:
        if self.cache is None:
            return {}
        return {k: v.float().cpu().numpy() for k, v in self.arch_mod.reference_state(self.cache, self.config).items()}

    def close(self) -> None:
        self.model, self.cache = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
