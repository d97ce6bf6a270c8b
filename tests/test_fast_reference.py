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


def bf16_fidelity(ckpt, make_fast) -> dict:
    """The GPU run's dtype, on CPU: transformers bf16 full forward vs the fast path's prefill + decode, batch 2."""
    from perch.validate import metrics

    ckpt = type(ckpt)(ckpt.model_dir, ckpt.config, ckpt.arch,
                      {k: v.to(torch.bfloat16) for k, v in ckpt.state_dict.items()}, ckpt.source)
    ref, fast = ReferenceRuntime(ckpt, dtype=torch.bfloat16, max_context=CTX), make_fast(ckpt)
    seq = np.random.default_rng(0).integers(1, ckpt.config.vocab_size, 30)
    full = ref.prefill(seq[None])[0, 19:-1]
    fast.reset(2)
    rows = [fast.prefill(np.stack([seq[:20]] * 2))[1, -1]] + [fast.step(np.array([t, t]))[1] for t in seq[20:-1]]
    art = np.stack(rows)
    return {"top1": metrics.top1_agreement(full, art), "kl": metrics.kl_div(full, art)}


@pytest.mark.parametrize("arch", sorted(PRESET_OF))
def test_fast_reference_in_bf16_agrees_with_transformers_bf16(load_preset, arch):
    make = {"falcon": FastFalcon, "falcon_mamba": FastFalconMamba}[arch]
    fid = bf16_fidelity(load_preset(PRESET_OF[arch]), lambda c: make(
        c.config, c.state_dict, device="cpu", dtype=torch.bfloat16, max_context=CTX, cuda_graphs=False))
    assert fid["top1"] == 1.0 and 0 < fid["kl"] < 1e-3, fid  # bf16 rounding, not a wrong data flow


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


def test_kernels_auto_picks_the_torch_twins_on_cpu_and_unknown_kernels_is_a_perch_error(load_preset):
    ckpt = load_preset("falcon-mamba-tiny")
    assert _fast(ckpt, "falcon_mamba", kernels="auto").ssm_scan is mk.ssm_scan_torch
    with pytest.raises(PerchError, match="kernels='cuda'"):
        _fast(ckpt, "falcon_mamba", kernels="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_reference_without_cuda_is_a_perch_error(load_preset):
    with pytest.raises(PerchError, match="CUDA"):
        open_gpu_reference(load_preset("falcon-tiny"))


def _sig(**kinds: str) -> dict:
    return kinds


# The Triton kernels at Falcon-Mamba-7B's shapes, compiled to an H100/H200 (sm_90) binary on this CPU machine:
# Triton's compiler (through ptxas) needs no GPU, so type and lowering errors show up here, not in the GPU run.
SM90_JOBS = {
    "add_rms_norm_kernel": (_sig(res_ptr="*fp32", delta_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", H="i32", eps="fp32",
                                 HAS_DELTA="constexpr", BLOCK_H="constexpr"), {"HAS_DELTA": True, "BLOCK_H": 4096}),
    "conv_step_kernel": (_sig(x_ptr="*bf16", state_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", u_ptr="*bf16", D="i32",
                              stride_xb="i32", K="constexpr", KP="constexpr", HAS_BIAS="constexpr", BLOCK="constexpr"),
                         {"K": 4, "KP": 4, "HAS_BIAS": True, "BLOCK": mk.BLOCK_D}),
    "ssm_scan_kernel": (_sig(state_ptr="*fp32", u_ptr="*bf16", dtl_ptr="*bf16", xdbc_ptr="*bf16", z_ptr="*bf16",
                             y_ptr="*bf16", a_ptr="*fp32", d_ptr="*fp32", dtb_ptr="*fp32", T="i32", D="i32", eps="fp32",
                             **dict.fromkeys("su_b su_t sdt_b sdt_t sx_b sx_t sz_b sz_t sy_b sy_t".split(), "i32"),
                             R="constexpr", RP="constexpr", N="constexpr", BLOCK="constexpr"),
                        {"R": 256, "RP": 256, "N": 16, "BLOCK": mk.BLOCK_D}),
}


@pytest.mark.parametrize("name", sorted(SM90_JOBS))
def test_triton_kernels_compile_for_the_gpu_machine(name):
    if mk.triton is None:
        pytest.skip("triton is not installed (it is in the [test] extra)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(mk, name)
    signature, constexprs = SM90_JOBS[name]
    assert list(signature) == fn.arg_names  # the table follows the kernel's real arguments
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = mk.triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
