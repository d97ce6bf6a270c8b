"""The fast GPU reference, checked on CPU: the whole runtime, with the fused paths swapped for their torch
twins, equals transformers in fp32 (prefill, decode, a chunk after stored state, left padding, state); its
Triton kernels run in Triton's CPU interpreter (tests/interpret_triton.py, in a fresh process). Tiny presets,
real transformers and real Triton; no mocks."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perch.errors import PerchError
from perch.runtimes.pytorch import mamba_kernels as mk
from perch.runtimes.pytorch.fast import FastFalcon, FastFalconMamba, open_gpu_reference
from perch.runtimes.pytorch.reference import ReferenceRuntime
from perch.validate.runner import check
from perch.validate.tolerances import tolerance_for_precision

CTX = 64
FP32 = tolerance_for_precision("fp32")
PRESET_OF = {"falcon": "falcon-tiny", "falcon_mamba": "falcon-mamba-tiny"}


def _fast(ckpt, arch: str, ctx: int = CTX, kernels: str = "torch"):
    if arch == "falcon":
        return FastFalcon(ckpt.config, ckpt.state_dict, device="cpu", dtype=torch.float32, max_context=ctx,
                          cuda_graphs=False)
    return FastFalconMamba(ckpt.config, ckpt.state_dict, device="cpu", dtype=torch.float32, max_context=ctx,
                           cuda_graphs=False, kernels=kernels)


@pytest.mark.parametrize("arch", sorted(PRESET_OF))
def test_fast_reference_equals_transformers_on_cpu(load_preset, arch):
    ckpt = load_preset(PRESET_OF[arch])
    ref, fast = ReferenceRuntime(ckpt, max_context=CTX), _fast(ckpt, arch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, ckpt.config.vocab_size, n).tolist() for n in (9, 5)]  # batch 2, left-padded
    report = check(fast, ref, prompts, max_new_tokens=6, tolerances=FP32)
    assert report.passed, report.summary()
    fast.reset(2)  # a chunk after stored state continues from it, batch 2
    ref.reset(2)
    ids = np.array([prompts[0][:5], prompts[0][4:9]])
    assert np.abs(fast.prefill(ids[:, :3]) - ref.prefill(ids[:, :3])).max() <= FP32.max_abs
    assert np.abs(fast.prefill(ids[:, 3:]) - ref.prefill(ids[:, 3:])).max() <= FP32.max_abs
    want, got = ref.state(), fast.state()
    assert set(got) == set(want)
    for name, value in want.items():  # the stored state itself, not only the logits
        assert np.abs(got[name] - value).max() <= 1e-4, name


def test_mamba_prefill_longer_than_a_chunk_continues_across_chunks(load_preset):
    ckpt = load_preset("falcon-mamba-tiny")
    ref, fast = ReferenceRuntime(ckpt, max_context=200), _fast(ckpt, "falcon_mamba", ctx=200)
    ids = np.random.default_rng(1).integers(1, ckpt.config.vocab_size, (1, 150))  # 3 chunks of <= 64 tokens
    assert np.abs(fast.prefill(ids) - ref.prefill(ids)).max() <= FP32.max_abs


def test_triton_kernels_in_the_interpreter():
    """Runs tests/interpret_triton.py in a fresh process: kernels vs twins, and the Triton runtime vs transformers."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it is in the [test] extra)")
    script = Path(__file__).with_name("interpret_triton.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)],
                         env=env, capture_output=True, text=True, cwd=script.parents[1], timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_triton_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PerchError, match="kernels='torch'"):
        mk.add_rms_norm_triton(torch.zeros(1, 8), None, torch.ones(8), 1e-5)


def test_unknown_kernels_is_a_perch_error(load_preset):
    with pytest.raises(PerchError, match="kernels='cuda'"):
        _fast(load_preset("falcon-mamba-tiny"), "falcon_mamba", kernels="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_reference_without_cuda_is_a_perch_error(load_preset):
    with pytest.raises(PerchError, match="CUDA"):
        open_gpu_reference(load_preset("falcon-tiny"))
