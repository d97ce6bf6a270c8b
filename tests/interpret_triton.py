"""Perch's Triton kernels run in Triton's CPU interpreter; collected only by test_fast_reference.py, which runs
this file in a fresh process with TRITON_INTERPRET=1 (triton reads it once, when first imported, and other
tests import triton earlier through torch's exporters)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from perch.runtimes.pytorch import mamba_kernels as mk
from perch.runtimes.pytorch.fast import FastFalconMamba
from perch.runtimes.pytorch.reference import ReferenceRuntime
from perch.validate.runner import check
from perch.validate.tolerances import tolerance_for_precision

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_fast_reference.py"
FP32 = tolerance_for_precision("fp32")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _scan_inputs(dtype, b=2, t=5, d=80, n=16, r=12):
    """Random kernel inputs; d=80 is not a multiple of BLOCK_D, so the masked tail is exercised."""
    g = torch.Generator().manual_seed(t)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xz = rnd(b, t, 2 * d).to(dtype)
    return dict(state=rnd(b, d, n), u=rnd(b, t, d).to(dtype), dtl=rnd(b, t, d).to(dtype),
                xdbc=rnd(b, t, r + 2 * n).to(dtype), z=xz[..., d:], a=-torch.rand(d, n, generator=g) * 4,
                d=rnd(d), dt_bias=rnd(d))


# The interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest): bf16 agrees to ~1%, fp32 exactly.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.03)])
@pytest.mark.parametrize("t", [1, 7])
def test_ssm_scan_kernel_equals_its_torch_twin(dtype, tol, t):
    args = _scan_inputs(dtype, t=t)
    s1, s2 = args["state"].clone(), args["state"].clone()
    y1 = mk.ssm_scan_torch(**{**args, "state": s1}, eps=1e-6)
    y2 = mk.ssm_scan_triton(**{**args, "state": s2}, eps=1e-6)
    assert y2.shape == y1.shape and y2.dtype == dtype
    assert _rel(y2, y1) <= tol and _rel(s2, s1) <= tol
    assert _rel(s2, args["state"]) > 0.1  # the state moved


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.03)])
def test_conv_step_and_norm_kernels_equal_their_torch_twins(dtype, tol):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2 * 80, generator=g).to(dtype)[:, :80]  # a strided view, as in the runtime
    state, w, bias = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 80, 4), (80, 4), (80,)))
    s1, s2 = state.clone(), state.clone()
    assert _rel(mk.conv_step_triton(x, s2, w, bias), mk.conv_step_torch(x, s1, w, bias)) <= tol
    assert torch.equal(s1, s2) and torch.equal(s1[..., -1], x) and torch.equal(s1[..., 0], state[..., 1])
    res, delta = torch.randn(3, 48, generator=g), torch.randn(3, 48, generator=g).to(dtype)
    weight = torch.randn(48, generator=g).to(dtype)
    r1, r2 = res.clone(), res.clone()
    assert _rel(mk.add_rms_norm_triton(r2, delta, weight, 1e-5), mk.add_rms_norm_torch(r1, delta, weight, 1e-5)) <= tol
    assert torch.allclose(r1, r2) and torch.allclose(r1, res + delta.float())
    assert _rel(mk.add_rms_norm_triton(r2, None, weight, 1e-5), mk.add_rms_norm_torch(r1, None, weight, 1e-5)) <= tol


def test_fast_falcon_mamba_with_triton_kernels_equals_transformers(load_preset):
    ckpt = load_preset("falcon-mamba-tiny")
    ref = ReferenceRuntime(ckpt, max_context=64)
    fast = FastFalconMamba(ckpt.config, ckpt.state_dict, device="cpu", dtype=torch.float32, max_context=64,
                           cuda_graphs=False, kernels="triton")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, ckpt.config.vocab_size, n).tolist() for n in (9, 5)]  # batch 2, left-padded
    report = check(fast, ref, prompts, max_new_tokens=4, tolerances=FP32)
    assert report.passed, report.summary()


def test_fast_falcon_mamba_with_triton_kernels_in_bf16(load_preset):
    from tests.test_fast_reference import bf16_fidelity

    fid = bf16_fidelity(load_preset("falcon-mamba-tiny"), lambda c: FastFalconMamba(
        c.config, c.state_dict, device="cpu", dtype=torch.bfloat16, max_context=64, cuda_graphs=False, kernels="triton"))
    assert fid["top1"] == 1.0 and 0 < fid["kl"] < 1e-3, fid
