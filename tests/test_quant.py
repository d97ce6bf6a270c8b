"""The 4-bit quantizers and recipes (exporter/quant_search.py, gptq.py, quant_recipes.py), on real numbers.

End-to-end quality on the trained fixtures is benchmarks/quant_quality.py's job (BENCHMARKS.md); here: the
search never loses to min/max on its own objective, GPTQ lowers the *output* error it is built to lower,
the packed layout round-trips, and every backend offers the recipes by name.
"""
from __future__ import annotations

import numpy as np
import pytest

from perch.exporter import gptq, onnx_quant, quant_search
from perch.exporter.quant_recipes import RECIPES


def _weights(rows=64, k=128, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 8  # outliers, as trained weights have: where min/max wastes levels
    return w


def _dequant(q, s, z):
    return (q.astype(np.float32) - z[..., None]) * s[..., None]


@pytest.mark.parametrize("bits", [4, 8])
def test_search_never_worse_than_min_max(bits):
    x = _weights().reshape(64, 4, 32)
    e_rtn = ((_dequant(*quant_search.rtn(x, bits)) - x) ** 2).sum(-1)
    e_search = ((_dequant(*quant_search.search(x, bits)) - x) ** 2).sum(-1)
    assert (e_search <= e_rtn + 1e-6).all()
    assert e_search.sum() < 0.97 * e_rtn.sum()  # strictly better overall (6-7% here at 4 bits)


def test_search_respects_importance():
    x = _weights().reshape(64, 4, 32)
    imp = np.ones((4, 32), np.float32)
    imp[:, :4] = 100.0  # four channels that matter most
    plain = _dequant(*quant_search.search(x, 4))
    weighted = _dequant(*quant_search.search(x, 4, imp))
    err = lambda d: ((d - x)[..., :4] ** 2).sum()  # noqa: E731
    assert err(weighted) < err(plain)


def test_gptq_lowers_output_error():
    """GPTQ minimises ||X W^T - X Q^T||, not the weight error: on correlated inputs it must beat RTN there."""
    rng = np.random.default_rng(1)
    w = _weights(rows=32, k=64)
    mix = rng.standard_normal((64, 64)).astype(np.float32)
    x = rng.standard_normal((2048, 64)).astype(np.float32) @ mix  # correlated input channels
    h = (x.T @ x).astype(np.float64)
    q, s, z = gptq.gptq(w, h, 4, 32)
    w_gptq = gptq.dequantize(q, s, z, 64)
    w_rtn = quant_search.fake_quantize(w, 4, 32, "rtn")
    out = lambda wq: np.linalg.norm(x @ (w - wq).T)  # noqa: E731
    assert out(w_gptq) < 0.8 * out(w_rtn)
    assert q.max() <= 15 and z.max() <= 15


@pytest.mark.parametrize("algorithm", ["rtn", "search", "gptq"])
def test_packed_layout_round_trips(algorithm):
    w = _weights(rows=8, k=96)
    h = np.eye(96) if algorithm == "gptq" else None
    packed, scales, zeros = onnx_quant.quantize_blocks(w, 4, 32, algorithm, h)
    back = onnx_quant.dequantize_blocks(packed, scales, zeros, 4, 96)
    ref = quant_search.fake_quantize(w, 4, 32, "rtn" if algorithm == "rtn" else "search")
    if algorithm != "gptq":  # gptq with H = I is search's codes, too, up to ties
        np.testing.assert_allclose(back, ref, atol=1e-6)
    assert np.abs(back - w).max() < np.abs(w).max() / 4


def test_every_backend_offers_the_recipes():
    from perch.exporter import coreml_compress
    from perch.exporter.options import OPTIONS

    for name in ("int4", "int4-mixed", "int4-search", "int4-rtn", "int8"):
        assert name in onnx_quant.METHODS and name in coreml_compress.METHODS
        assert RECIPES[name].description and 4 <= RECIPES[name].bits_estimate <= 9
    # what the CLI and the options classes accept is exactly what each backend's METHODS table offers
    assert set(OPTIONS["onnx"].QUANTIZE) == {"none", *onnx_quant.METHODS}
    assert set(OPTIONS["coreml"].QUANTIZE) == {"none", *coreml_compress.METHODS}


def test_recipe_choices_by_tensor():
    r = RECIPES["int4"]
    assert r.choice("backbone.layers.0.mixer.dt_proj.weight", "linear", 32).bits == 8
    assert r.choice("backbone_layers_0_mixer_dt_proj_weight", "linear", 32).bits == 8  # Core ML const names
    assert r.choice("backbone.embeddings.weight", "embedding", 32).block == 16
    assert r.choice("lm_head.weight", "linear", 32).algorithm == "gptq"
    assert RECIPES["int4-mixed"].choice("lm_head.weight", "linear", 32).block == 16
    assert RECIPES["int4-rtn"].choice("backbone.layers.0.mixer.dt_proj.weight", "linear", 32) is None


@pytest.mark.parametrize("dist", ["normal", "student"])
def test_palettize_kmeans_is_a_converged_lloyd_fixed_point_and_beats_uniform(dist):
    from perch.exporter.coreml_compress import kmeans_lut

    rng = np.random.default_rng(1)
    raw = rng.standard_normal((16, 512)) if dist == "normal" else rng.standard_t(3, (16, 512))
    group = (raw * 0.02).astype(np.float16)
    lut, codes = kmeans_lut(group)
    x = group.reshape(-1).astype(np.float64)
    assert lut.dtype == group.dtype and lut.shape == (16,) and codes.dtype == np.uint8 and codes.shape == x.shape
    centres = lut.astype(np.float64)
    assert np.all(np.diff(centres) >= 0)
    # every value sits in its nearest centre, and every centre is the mean of its values (to fp16 rounding)
    nearest = np.abs(x[:, None] - centres[None, :]).min(axis=1)
    assert np.allclose(np.abs(x - centres[codes]), nearest, atol=1e-4)
    for c in np.unique(codes):
        assert abs(x[codes == c].mean() - centres[c]) <= 2e-3 * max(abs(centres[c]), 1e-2)
    uniform = np.linspace(x.min(), x.max(), 16)
    mse_uniform = (np.abs(x[:, None] - uniform[None, :]).min(axis=1) ** 2).mean()
    assert ((x - centres[codes]) ** 2).mean() < 0.7 * mse_uniform
