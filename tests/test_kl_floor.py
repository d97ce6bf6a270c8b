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
