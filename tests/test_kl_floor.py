"""`perch check`'s KL and max_abs limits follow the logits' scale: rounding noise that keeps rel_l2 fixed gives a KL
that grows with the square of the logits, so a correct export of a sharper model must not fail on KL alone;
a broken one still fails (on rel_l2, which is scale-free)."""
from __future__ import annotations

import numpy as np

from perch.validate import metrics
from perch.validate.report import PromptResult
from perch.validate.runner import STEP_METRICS, _step_failures
from perch.validate.tolerances import kl_floor, max_abs_floor, tolerance_for_precision

TOL = tolerance_for_precision("fp32+fp16state")


def _result(ref: np.ndarray, art: np.ndarray) -> PromptResult:
    steps = {name: fn(ref, art).tolist() for name, (fn, _) in STEP_METRICS.items()}
    steps["kl_floor"], steps["max_abs_floor"] = kl_floor(ref, TOL).tolist(), max_abs_floor(ref, TOL).tolist()
    return PromptResult(0, None, [1], [], [], 0, steps, {})


def _noisy(scale: float, rel: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((16, 512)) * scale
    noise = rng.standard_normal(ref.shape)
    art = ref + noise * rel * np.linalg.norm(ref, axis=-1, keepdims=True) / np.linalg.norm(noise, axis=-1, keepdims=True)
    return ref, art


def test_rounding_noise_on_sharp_logits_passes_and_the_old_fixed_limit_would_not():
    ref, art = _noisy(scale=10.0, rel=3e-4)  # rel_l2 like a correct Core ML fp32 export (measured 2.2e-4)
    kl = metrics.row_kl(ref, art)
    assert kl.max() > TOL.max_kl  # the fixed limits alone fail this correct artifact
    assert metrics.row_max_abs(ref, art).max() > TOL.max_abs
    assert _step_failures(_result(ref, art), TOL) == []


def test_the_floor_never_rescues_a_broken_artifact_and_leaves_quantized_limits_alone():
    ref, art = _noisy(scale=8.0, rel=0.2)  # the size of a broken export's error
    metrics_failed = {f.metric for f in _step_failures(_result(ref, art), TOL)}
    assert "rel_l2" in metrics_failed
    assert not kl_floor(ref, tolerance_for_precision("int4")).any()
    small = kl_floor(ref / 8, TOL)
    assert np.allclose(kl_floor(ref, TOL), 64 * small)  # quadratic in the logits' scale


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even), back in float32: what a bf16 model's logits are."""
    import torch

    return torch.from_numpy(np.asarray(x, dtype=np.float32)).bfloat16().float().numpy()


def test_a_top1_flip_the_bf16_reference_cannot_order_is_a_tie_and_a_real_flip_is_not():
    ref = np.zeros((3, 8), dtype=np.float32)
    ref[:, 0], ref[:, 1] = 5.0, 5.0  # row 0: an exact tie in the reference (bf16 step at 5.0 is 2**-5)
    ref[1, 1] = 5.0 - 2**-5  # row 1: one bf16 step below its top
    ref[2, 1] = 5.0 - 2 * 2**-5  # row 2: two steps below: the reference does order these
    art = ref.copy()
    art[:, 1] += 0.1  # the artifact prefers token 1 in every row
    assert np.array_equal(_bf16(ref), ref)
    assert metrics.row_top1(ref, art).tolist() == [0.0, 0.0, 0.0]  # plain argmax: three flips
    assert metrics.row_top1(ref, art, ref_bits=8).tolist() == [1.0, 1.0, 0.0]
    assert metrics.row_top1(ref, art, ref_bits=24).tolist() == [1.0, 0.0, 0.0]  # fp32: only the exact tie
    assert metrics.row_top1_gap(ref, art).tolist() == [0.0, 2**-5, 2**-4]


def test_the_reference_runtime_reports_its_logit_grid(load_preset):
    import torch

    from perch.runtimes.pytorch.reference import ReferenceRuntime

    ckpt = load_preset("falcon-tiny")
    assert ReferenceRuntime(ckpt).logit_bits is None
    bf16 = ReferenceRuntime(ckpt, dtype=torch.bfloat16)
    logits = bf16.prefill(np.array([[1, 2, 3]]))
    assert bf16.logit_bits == 8 and np.array_equal(_bf16(logits), logits)  # its logits are on that grid
