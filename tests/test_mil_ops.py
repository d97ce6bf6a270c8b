"""Perch's MIL kernels one by one: an op zoo converted from torch, and kernels against references.

The zoo modules make the torch frontend emit the elementwise, reduction, indexing, padding and conv ops
a transformer or Mamba export can hold; kernels no such program emits are checked against
coremltools' own value inference (or by hand where coremltools has no reference).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coremltools as ct

from perch.runtimes.mil import ops as mil_ops
from perch.runtimes.mil import ops_compress
from perch.runtimes.mil.executor import MilExecutor


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


# ---- op zoo: the elementwise, reduction, indexing and conv ops the torch frontend emits -----------


class Elementwise(nn.Module):
    def forward(self, x):  # (2, 3, 8)
        a = x.abs()
        outs = [(x - 1) / (a + 1), torch.floor_divide(x * 4, 3), torch.remainder(x, 0.7), a**1.5,
                torch.maximum(x, x.flip(-1)), torch.minimum(x, 0.2 * x), x.exp(), torch.log(a + 1),
                a.sqrt(), torch.rsqrt(a + 1), torch.reciprocal(a + 1), x.tanh(), x.sin(), x.cos(),
                x.sign(), (x * 3).floor(), (x * 3).ceil(), (x * 3).round(), torch.erf(x), torch.sigmoid(x),
                F.relu(x), F.gelu(x, approximate="tanh"), F.softplus(x), x.clamp(-0.5, 0.5),
                torch.where(torch.logical_or(torch.logical_and(x > 0, x < 1), torch.logical_not(x >= 1.5)), x, -x),
                (x != 0.5).float() + (x <= 0).float() + (x == x.flip(-1)).float(),
                F.silu(x), F.elu(x), F.leaky_relu(x, 0.1)]
        return torch.stack(outs, 0)


class Indexing(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([[[3, 0, 7]] * 5] * 2))  # (2, 5, 3)

    def forward(self, x):  # (2, 5, 8)
        red = torch.stack([x.mean(-1), x.sum(-1), x.amax(-1), x.amin(-1), x.norm(dim=-1),
                           torch.logsumexp(x, -1)], 0)
        top_v, top_i = x.topk(3, dim=-1)
        picked = torch.gather(x, -1, self.idx)
        scattered = x.scatter(-1, self.idx, picked * 2)
        nd = x[torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2])]  # (3, 8)
        sliced = torch.cat([x[:, 1:4:2], x[:, -1:]], 1).repeat(1, 2, 1).unsqueeze(0).squeeze(0)
        parts = x.chunk(2, -1)
        mixed = torch.einsum("bij,bkj->bik", parts[0], parts[1])
        padded = torch.cat([F.pad(x, (2, 1), mode=m) for m in ("constant", "reflect", "replicate")], -1)
        return (red, top_v, top_i.to(torch.int32), picked, scattered, nd, sliced, mixed, padded,
                x.cumsum(1), x.argmax(-1).to(torch.int32), x.softmax(1), x.triu(1), x.tril(-1))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv1d(4, 4, 3, groups=4, padding=2)  # Mamba-style causal conv (trimmed)
        self.strided = nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=1)
        self.same = nn.Conv1d(4, 4, 4, padding="same")
        self.conv2d = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)

    def forward(self, x, image):  # (1, 4, 12), (1, 4, 7, 9)
        return self.depthwise(x)[..., :12], self.strided(x), self.same(x), self.conv2d(image)


@pytest.mark.parametrize("module,shapes", [
    (Elementwise, [(2, 3, 8)]), (Indexing, [(2, 5, 8)]), (Convs, [(1, 4, 12), (1, 4, 7, 9)])],
    ids=["elementwise", "indexing", "convs"])
def test_op_zoo_matches_torch(module, shapes, tmp_path):
    torch.manual_seed(0)
    module = module().eval()
    xs = [torch.randn(s) for s in shapes]
    names = [f"x{i}" for i in range(len(xs))]
    inputs = [ct.TensorType(name=n, shape=s, dtype=np.float32) for n, s in zip(names, shapes)]
    traced = torch.jit.trace(module, tuple(xs))
    model = ct.convert(traced, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32)
    model.save(str(tmp_path / "zoo.mlpackage"))
    ex = MilExecutor(tmp_path / "zoo.mlpackage")
    with torch.no_grad():
        refs = module(*xs)
    refs = refs if isinstance(refs, tuple) else (refs,)
    out = ex.predict({n: x.numpy() for n, x in zip(names, xs)})
    assert len(out) == len(refs)
    for (name, got), ref in zip(out.items(), refs):
        ref = ref.numpy()
        assert got.shape == ref.shape, name
        if ref.dtype.kind == "i":
            np.testing.assert_array_equal(got, ref, err_msg=name)
        else:
            assert rel_err(got, ref) < 1e-5, f"{name}: {rel_err(got, ref):.2e}"


# ---- kernels no test program above emits, against coremltools' own value inference ----------------

_rng = np.random.default_rng(0)
_X = _rng.standard_normal((2, 3, 8)).astype(np.float32)
_I32 = lambda *v: np.array(v, np.int32)  # noqa: E731
KERNEL_CASES = {
    "mod": dict(x=_X, y=np.float32(0.7)),
    "einsum": dict(values=(_rng.standard_normal((2, 3, 1, 5)).astype(np.float32),
                           _rng.standard_normal((2, 5, 4, 6)).astype(np.float32)), equation="nchw,nwhu->nchu"),
    "reduce_prod": dict(x=_X, axes=_I32(1), keep_dims=True),
    "gather": dict(x=_X, indices=_I32([2, 0], [1, -1]), axis=1, batch_dims=1),
    "slice_by_size": dict(x=_X, begin=_I32(1, -2, 3), size=_I32(1, -1, 4)),
    "slice_by_index": dict(x=_X, begin=_I32(1, 0, 6), end=_I32(0, 2, 1), stride=_I32(1, 1, -2),
                           begin_mask=[False, True, False], end_mask=[True, False, False],
                           squeeze_mask=[True, False, False]),
    "gelu": dict(x=_X, mode="SIGMOID_APPROXIMATION"),
    "sigmoid_hard": dict(x=_X, alpha=0.2, beta=0.5),
    "topk": dict(x=_X, k=3, axis=1, ascending=True),
    "pad": dict(x=_X, pad=_I32(1, 2, 3, 1), mode="reflect"),
    "band_part": dict(x=_X, lower=1, upper=0),
    "reshape": dict(x=_X, shape=_I32(0, -1, 2, 0)),
    "split": dict(x=_X, split_sizes=_I32(2, 1, 5), axis=2),
    "scatter_along_axis": dict(data=_X, indices=_I32(*[[[1, 5]] * 3] * 2), updates=np.ones((2, 3, 2), np.float32),
                               axis=2, mode="update"),
    "range_1d": dict(end=np.float32(3.0), start=np.float32(0.5), step=np.float32(0.75)),
    "argsort": dict(x=_X, axis=1, ascending=False),
    "l2_norm": dict(x=_X, epsilon=1e-6),
    "reduce_log_sum_exp": dict(x=_X, axes=_I32(0, 2)),
    "clamped_relu": dict(x=_X, alpha=0.1, beta=0.5),
    "softplus_parametric": dict(x=_X, alpha=np.array([0.1, 0.2, 0.3], np.float32),
                                beta=np.array([1.0, 2.0, 3.0], np.float32)),
    "thresholded_relu": dict(x=_X, alpha=0.3),
    "flatten2d": dict(x=_X, axis=2),
    "non_zero": dict(x=_X > 0),
}


@pytest.mark.parametrize("op", sorted(KERNEL_CASES))
def test_kernel_matches_coremltools_value_inference(op):
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    kwargs = KERNEL_CASES[op]
    with Function({}, opset_version=ct.target.iOS18):
        ref = getattr(mb, op)(**kwargs)
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    ours = mil_ops.OPS[op](**kwargs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(refs)
    for got, want in zip(ours, refs):
        assert want.val is not None
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want.val, np.float64), rtol=1e-5, atol=1e-6)


def test_kernels_without_reference():
    """Where coremltools has no (or a wrong) reference: accumulating scatters, exclusive reverse cumsum,
    interleaved concat (its value inference ignores `interleave`), one_hot."""
    ops = mil_ops.OPS
    out = ops["scatter"](data=_X, indices=_I32(2, 0, 2), updates=np.ones((2, 3, 8), np.float32), axis=1, mode="add")
    np.testing.assert_allclose(out - _X, np.broadcast_to(np.array([1, 0, 2])[None, :, None], (2, 3, 8)), atol=1e-6)
    a, b = np.array([[1, 2], [3, 4], [5, 6]]), np.array([[7, 8], [9, 10], [11, 12]])  # the op's doc example
    np.testing.assert_array_equal(ops["concat"](values=(a, b), axis=0, interleave=True),
                                  [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])
    out = ops["scatter_nd"](data=_X, indices=_I32([0, 1], [1, 2], [0, 1]), updates=np.ones((3, 8), np.float32),
                            mode="mul")
    np.testing.assert_array_equal(out, _X)
    out = ops["cumsum"](x=_X, axis=2, exclusive=True, reverse=True)
    np.testing.assert_allclose(out[..., 0], _X[..., 1:].sum(-1), rtol=1e-5)
    assert np.all(out[..., -1] == 0)
    hot = ops["one_hot"](indices=_I32([1, 3], [0, 2]), one_hot_vector_size=4, axis=1, on_value=2.0, off_value=-1.0)
    assert hot.shape == (2, 4, 2) and hot[0, 1, 0] == 2.0 and hot[0, 0, 0] == -1.0


@pytest.mark.parametrize("slab", [8, 24, 40])
def test_lut_in_slabs_matches_coremltools(monkeypatch, slab):
    """The LUT gather runs in slabs of rows (to bound its intp copy): slabs of whole tables, slabs inside one
    table, and uneven last slabs give coremltools' dense weight exactly."""
    from coremltools.optimize import _utils as ct_utils

    monkeypatch.setattr(ops_compress, "_LUT_SLAB", slab)
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 4, (12, 8)).astype(np.uint8)
    for lut_shape, axis in (((1, 1, 4, 1), None), ((3, 1, 4, 1), None), ((6, 2, 4, 1), None),
                            ((2, 1, 4, 3), 0), ((4, 2, 4, 2), 1)):
        lut = rng.standard_normal(lut_shape).astype(np.float16)
        ours = mil_ops.OPS["constexpr_lut_to_dense"](indices=indices, lut=lut, vector_axis=axis)
        np.testing.assert_array_equal(ours, ct_utils.lut_to_dense(indices, lut, axis))


def test_dequantization_kernels_match_coremltools():
    """Grouped and vector LUTs, block-wise offsets, affine: against coremltools' own decompress."""
    from coremltools.optimize import _utils as ct_utils

    rng = np.random.default_rng(0)
    indices = rng.integers(0, 4, (6, 8)).astype(np.uint8)
    for lut_shape, axis in (((2, 1, 4, 1), None), ((1, 2, 4, 3), 0), ((3, 1, 4, 2), 1)):
        lut = rng.standard_normal(lut_shape).astype(np.float16)
        ours = mil_ops.OPS["constexpr_lut_to_dense"](indices=indices, lut=lut, vector_axis=axis)
        np.testing.assert_array_equal(ours, ct_utils.lut_to_dense(indices, lut, axis))
    data = rng.integers(-8, 8, (6, 64)).astype(np.int8)
    scale, offset = rng.random((3, 2)).astype(np.float32), rng.integers(-2, 2, (3, 2)).astype(np.int8)
    ours = mil_ops.OPS["constexpr_blockwise_shift_scale"](data=data, scale=scale, offset=offset)
    rows, cols = np.arange(6)[:, None] // 2, np.arange(64)[None] // 32
    np.testing.assert_allclose(ours, scale[rows, cols] * (data - offset[rows, cols]), rtol=1e-6)
    q, zp, sc = data.astype(np.uint8), np.full(64, 3, np.uint8), rng.random(64).astype(np.float32)
    ours = mil_ops.OPS["constexpr_affine_dequantize"](quantized_data=q, zero_point=zp, scale=sc, axis=1)
    ref = ct_utils.dequantize_by_scale_and_zp(q, sc, zp, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
