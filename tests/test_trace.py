"""Both architectures trace cleanly with torch.jit.trace and torch.export, and the traced graphs still
compute the same thing at a sequence length other than the one traced with."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perch.archs import arch_module
from perch.runtimes.base import empty_state, model_inputs
from tests.matrix import TINY_PRESETS, buffer_names, stateful_args


def past_present_args(ckpt, mod, batch: int, t: int, past: int):
    io = mod.io_spec(ckpt.config, 64, "past_present")
    ids = np.random.default_rng(t).integers(1, ckpt.config.vocab_size, size=(batch, t))
    mask = np.ones((batch, past + t), dtype=np.int64)
    positions = np.arange(past, past + t)[None].repeat(batch, 0)
    feeds = model_inputs(io, ids, mask, positions)
    state = empty_state(io, batch)
    if past:  # a non-empty past of the right shapes (values irrelevant for tracing)
        rng = np.random.default_rng(1)
        state = {k: rng.standard_normal(io.state(k.split(".")[0]).concrete_shape(batch, past)).astype(np.float32)
                 for k in state}
    return tuple(torch.from_numpy(feeds[s.name]) for s in io.inputs) + tuple(torch.from_numpy(v) for v in state.values())


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_jit_trace_stateful(load_preset, name):
    ckpt = load_preset(name)
    mod = arch_module(ckpt.arch)
    io = mod.io_spec(ckpt.config, 64, "stateful")
    model = mod.stateful(mod.build(ckpt.config, dict(ckpt.state_dict), 64, scan="logdepth"), 1, torch.float32,
                         buffer_names(io))
    args = stateful_args(io, torch.randint(1, ckpt.config.vocab_size, (1, 5)), 5)
    with torch.no_grad():
        traced = torch.jit.trace(model, args, check_trace=False)
    assert traced.graph is not None


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_torch_export_past_present_dynamic(load_preset, name):
    ckpt = load_preset(name)
    mod = arch_module(ckpt.arch)
    graph = mod.past_present(mod.build(ckpt.config, dict(ckpt.state_dict), 64, scan="scan"))
    args = past_present_args(ckpt, mod, 2, 5, 3)
    # DYNAMIC lets torch.export derive the relations (Falcon: mask length = past + sequence).
    dyn = torch.export.Dim.DYNAMIC
    io = mod.io_spec(ckpt.config, 64, "past_present")
    inputs = tuple({a: dyn for a, axis in enumerate(s.shape) if isinstance(axis, str)} for s in io.inputs)
    per_state = [{a: dyn for a, axis in enumerate(s.shape) if isinstance(axis, str)} for s in io.states]
    shapes = (*inputs, tuple(per_state[j % len(per_state)] for j in range(len(args) - len(inputs))))
    with torch.no_grad():
        ep = torch.export.export(graph, args, dynamic_shapes=shapes)
        other = past_present_args(ckpt, mod, 1, 9, 4)  # another batch, length and past than traced
        want, got = graph(*other), ep.module()(*other)
    assert all(torch.allclose(w, g, atol=1e-5) for w, g in zip(want, got))
