"""Perch's own export-ready modules run eagerly in torch, behind the step API.

The same past/present graph that the ONNX backend exports, before any conversion: the reference for
"did the export change anything", and what `perch check --bisect` uses to find the first layer that drifts.
"""
from __future__ import annotations

import numpy as np
import torch

from perch.archs import arch_module
from perch.loading import Checkpoint
from perch.runtimes.base import Runtime, empty_state, model_inputs


class EagerRuntime(Runtime):
    name = "perch-eager"

    def __init__(self, ckpt: Checkpoint, *, max_context: int = 256, dtype: torch.dtype = torch.float32, **options):
        mod = arch_module(ckpt.arch)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
        self.core = mod.build(ckpt.config, sd, max_context, **options)
        self.graph = mod.past_present(self.core)
        self.io = mod.io_spec(ckpt.config, max_context, "past_present", state_dtype=str(dtype).removeprefix("torch."))
        self.vocab_size, self.max_context = ckpt.config.vocab_size, max_context
        self.hidden: list[torch.Tensor] = []
        self.reset(1)

    def _reset(self, batch_size: int) -> None:
        self.past = {k: torch.from_numpy(v) for k, v in empty_state(self.io, batch_size).items()}

    @torch.inference_mode()
    def _forward(self, input_ids, mask, positions) -> np.ndarray:
        feeds = model_inputs(self.io, input_ids, mask, positions)
        names = list(self.past)
        outs = self.graph(*(torch.from_numpy(feeds[s.name]) for s in self.io.inputs), *self.past.values())
        self.past = dict(zip(names, outs[1:]))
        return outs[0].numpy()

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.float().numpy() for k, v in self.past.items()}
