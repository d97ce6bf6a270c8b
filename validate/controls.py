"""Negative controls: runtimes that are wrong on purpose, so a check can be shown to fail (tests and the
tolerance calibration share them), and the fp16-state simulation Core ML's states imply."""
from __future__ import annotations

import torch

from perch.loading import Checkpoint
from perch.runtimes.pytorch.eager import EagerRuntime


class ShiftedDecode(EagerRuntime):
    """Off by one: every decode step rotates its query and key one position too far."""

    name = "broken-position"

    def _forward(self, ids, mask, positions):
        return super()._forward(ids, mask, positions + 1 if ids.shape[1] == 1 else positions)


def has_positions(runtime: EagerRuntime) -> bool:
    """Only a model fed positions can get them wrong (an SSM has none)."""
    return any(s.name == "position_ids" for s in runtime.io.inputs)


class DroppedStateWrite(EagerRuntime):
    """Layer 1's state write never lands (Core ML's silent miscompile): its cache grows by zeros and its
    fixed-size states stay as they were."""

    name = "broken-state-write"

    def _forward(self, ids, mask, positions):
        before = dict(self.past)
        out = super()._forward(ids, mask, positions)
        for key in [k for k in before if k.endswith(".1")]:
            new, old = self.past[key], before[key]
            grown = new.shape[2] - old.shape[2] if new.shape != old.shape else 0
            self.past[key] = torch.cat([old, torch.zeros_like(new[:, :, old.shape[2]:])], 2) if grown else old
        return out


class Fp16State(EagerRuntime):
    """fp32 compute, state rounded to fp16 between calls: what Core ML's fp16-only states do."""

    name = "fp32+fp16state"

    def _forward(self, ids, mask, positions):
        out = super()._forward(ids, mask, positions)
        self.past = {k: v.half().float() for k, v in self.past.items()}
        return out


def perturbed(ckpt: Checkpoint, layer: int = 1, scale: float = 1.05) -> Checkpoint:
    """A copy whose first 2-D weight in `layer` is scaled by `scale`."""
    sd = dict(ckpt.state_dict)
    key = next(k for k in sd if f".{layer}." in k and k.endswith(".weight") and sd[k].ndim == 2)
    sd[key] = sd[key] * scale
    return Checkpoint(ckpt.model_dir, ckpt.config, ckpt.arch, sd, ckpt.source)
