"""The reference runtime: the transformers model behind the step API, on CPU or CUDA.

This is the plain path every artifact is compared against. Falcon uses transformers' dynamic cache.
Falcon-Mamba feeds a chunk that follows stored state one token at a time: transformers' multi-token
forward with a non-empty cache restarts the SSM from zero (FINDINGS), so only full forwards and
single-token steps are trustworthy as a reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from perch.archs import arch_module
from perch.loading import Checkpoint, build_hf_model, load_checkpoint
from perch.dev.presets import resolve_model
from perch.runtimes.base import Runtime


def _layer_states(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv, ssm) of a Mamba layer across transformers versions (5.x cache layers, 4.x MambaCache)."""
    if hasattr(cache, "get_conv_state"):
        return cache.get_conv_state(layer), cache.get_recurrent_state(layer)
    return cache.conv_states[layer], cache.ssm_states[layer]


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class ReferenceRuntime(Runtime):
    """transformers' own model, fp32 on CPU by default; `device="cuda"` and bf16/fp16 where present."""

    name = "reference"

    def __init__(self, model: str | Path | Checkpoint, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_context: int | None = None, allow_pickle: bool = False, adapter: str | Path | None = None):
        if not isinstance(model, Checkpoint):
            model = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter)
        ckpt = model
        self.checkpoint, self.arch, self.config = ckpt, ckpt.arch, ckpt.config
        self.device, self.dtype = torch.device(device), dtype
        self.model = build_hf_model(ckpt.config, ckpt.state_dict, device=device, dtype=dtype).eval()
        self.vocab_size = ckpt.config.vocab_size
        self.max_context = max_context or getattr(ckpt.config, "max_position_embeddings", None) or 1 << 20
        self.io = None  # transformers' own model: no exported graph, names follow ModelIO's convention
        self.reset(1)

    def _reset(self, batch_size: int) -> None:
        self.cache = None

    @torch.inference_mode()
    def _forward(self, input_ids, mask, positions) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(self.device)
        hook = getattr(arch_module(self.arch), "reference_forward", None)
        if hook is not None:  # the architecture says how transformers runs it with a cache
            to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
            logits, self.cache = hook(self.model, self.cache, ids, to(mask), to(positions))
        elif self.arch == "falcon":
            logits = self._falcon(ids, torch.from_numpy(mask).to(self.device), torch.from_numpy(positions).to(self.device))
        elif self.cache is None:
            logits = self._mamba(ids, torch.from_numpy(mask[:, -ids.shape[1]:]).to(self.device))
        else:
            logits = torch.cat([self._mamba(ids[:, t : t + 1], None) for t in range(ids.shape[1])], dim=1)
        return logits.float().cpu().numpy()

    def _falcon(self, ids, mask, positions) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits

    def _mamba(self, ids, mask) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, cache_params=self.cache, use_cache=True)
        self.cache = out.cache_params
        return out.logits

    def state(self) -> dict[str, np.ndarray]:
        if self.cache is None:
            return {}
        hook = getattr(arch_module(self.arch), "reference_state", None)
        if hook is not None:
            return hook(self.cache, self.config)
        out: dict[str, np.ndarray] = {}
        for i in range(self.config.num_hidden_layers):
            if self.arch == "falcon":
                k, v = (self._untile(t) for t in _layer_kv(self.cache, i))
                out[f"key.{i}"], out[f"value.{i}"] = k, v
            else:
                conv, ssm = _layer_states(self.cache, i)
                out[f"conv.{i}"], out[f"ssm.{i}"] = conv.float().cpu().numpy(), ssm.float().cpu().numpy()
        return out

    def _untile(self, t: torch.Tensor) -> np.ndarray:
        """transformers stores the grouped layout's K,V repeated to every query head; keep one per group."""
        c = self.config
        if c.new_decoder_architecture and t.shape[1] != c.num_kv_heads:
            b, nh, s, hd = t.shape
            t = t.view(b, c.num_kv_heads, nh // c.num_kv_heads, s, hd)[:, :, 0]
        return t.float().cpu().numpy()

    def close(self) -> None:
        self.model, self.cache = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
