"""Our export-ready modules equal transformers (fp32, max abs logit difference <= 1e-4), for every
registered architecture and tiny preset: full prefill, prefill + 8 decode steps, a chunked prefill that
continues from state (against a full forward), batch 2 with left padding, and the stateful front-end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perch.runtimes.pytorch.eager import EagerRuntime
from perch.archs import arch_module
from perch.dev.presets import PRESETS
from perch.runtimes.pytorch.reference import ReferenceRuntime
from tests.matrix import ARCHS, TINY_PRESETS, buffer_names, prompt, stateful_args

TOL = 1e-4
# Falcon variants that are config, not presets: each must equal transformers too.
FALCON_VARIANTS = {
    "sequential": dict(parallel_attn=False),
    "multi_head_bias": dict(multi_query=False, bias=True),
    "grouped_one_norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8, num_ln_in_parallel_attn=1),
}


def hf_logits(ckpt, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """One full transformers forward (never its chunked path: FalconMamba's restarts the SSM)."""
    ref = ReferenceRuntime(ckpt)
    ref.reset(ids.shape[0])
    return ref.prefill(ids, mask)


# Falcon has no scan; Falcon-Mamba runs with each of its three scan forms.
CASES = [(n, s) for row in ARCHS.values() for n in row["presets"] for s in row["scans"]]


@pytest.mark.parametrize("name,scan", CASES)
def test_full_prefill_and_decode_match_transformers(load_preset, name, scan):
    ckpt = load_preset(name)
    ids = prompt(1, 24, ckpt.config.vocab_size)
    full = hf_logits(ckpt, ids)
    ours = EagerRuntime(ckpt, max_context=64, scan=scan)
    ours.reset(1)
    got = [ours.prefill(ids[:, :16])]
    for t in range(16, 24):  # 8 decode steps, teacher-forced
        got.append(ours.step(ids[:, t])[:, None])
    assert np.abs(np.concatenate(got, 1) - full).max() <= TOL


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_chunked_prefill_continues_from_state(load_preset, name):
    ckpt = load_preset(name)
    ids = prompt(2, 20, ckpt.config.vocab_size, seed=1)
    full = hf_logits(ckpt, ids)
    ours = EagerRuntime(ckpt, max_context=64)
    ours.reset(2)
    got = np.concatenate([ours.prefill(ids[:, :7]), ours.prefill(ids[:, 7:9]), ours.prefill(ids[:, 9:])], 1)
    assert np.abs(got - full).max() <= TOL


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_batch_with_left_padding_matches_transformers_steps(load_preset, name):
    ckpt = load_preset(name)
    ids = prompt(2, 12, ckpt.config.vocab_size, seed=2)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 is a shorter prompt, left-padded
    ids[1, :4] = 0
    ref, ours = ReferenceRuntime(ckpt), EagerRuntime(ckpt, max_context=64)
    for rt in (ref, ours):
        rt.reset(2)
    a, b = ref.prefill(ids, mask), ours.prefill(ids, mask)
    assert np.abs(a - b)[mask.astype(bool)].max() <= TOL  # padded positions' logits are meaningless
    for _ in range(8):
        tok = a[:, -1].argmax(-1) if a.ndim == 3 else a.argmax(-1)
        a, b = ref.step(tok), ours.step(tok)
        assert np.abs(a - b).max() <= TOL
    real = ours.mask.astype(bool)  # K,V at padded positions are never attended: compare real ones only
    for k, v in ref.state().items():
        w = ours.state()[k]
        if k.startswith(("key.", "value.")):
            v, w = (np.concatenate([x[r][:, real[r]] for r in range(2)], axis=1) for x in (v, w))
        assert np.abs(v - w).max() <= TOL, k


@pytest.mark.parametrize("variant", sorted(FALCON_VARIANTS))
def test_falcon_variants_match_transformers(tmp_path, variant):
    from transformers import FalconConfig, FalconForCausalLM

    from perch.loading import load_checkpoint

    cfg = FalconConfig(**{**PRESETS["falcon-tiny"].config, **FALCON_VARIANTS[variant]})
    torch.manual_seed(0)
    FalconForCausalLM(cfg).save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    ids = prompt(2, 14, cfg.vocab_size, seed=3)
    ours = EagerRuntime(ckpt, max_context=32)
    ours.reset(2)
    got = np.concatenate([ours.prefill(ids[:, :10]), ours.prefill(ids[:, 10:])], 1)
    assert np.abs(got - hf_logits(ckpt, ids)).max() <= TOL


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_stateful_front_end_matches_transformers(load_preset, name):
    """The fixed-buffer module (what Core ML converts) in fp32 state: prefill, 3 steps, a second chunk."""
    ckpt = load_preset(name)
    mod = arch_module(ckpt.arch)
    core = mod.build(ckpt.config, dict(ckpt.state_dict), 64, scan="logdepth")
    io = mod.io_spec(ckpt.config, 64, "stateful")
    model = mod.stateful(core, 1, torch.float32, buffer_names(io))
    ids = torch.from_numpy(prompt(1, 20, ckpt.config.vocab_size, seed=4))
    chunks = [(0, 12), (12, 13), (13, 14), (14, 15), (15, 20)]
    outs = []
    with torch.no_grad():
        for s, e in chunks:
            outs.append(model(*stateful_args(io, ids[:, s:e], e)))
    assert np.abs(torch.cat(outs, 1).numpy() - hf_logits(ckpt, ids.numpy())).max() <= TOL
