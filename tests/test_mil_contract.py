"""The Core ML contract points coremltools' own test suite taught the executor (tests/coremltools_suite):
rank-0 outputs come back as (1,), gather / scatter indices go through one normalisation, programs that
disagree at their default input shapes are refused at load, and the list / normalisation ops exist."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import coremltools as ct
from coremltools.converters.mil.mil import Builder as mb

from perch.errors import PerchError
from perch.runtimes.mil import ops as mil_ops
from perch.runtimes.mil.executor import MilExecutor
from perch.runtimes.mil.ops_index import normalize_indices

OPS = mil_ops.OPS


def _package(prog, path, precision=ct.precision.FLOAT32):
    model = ct.convert(prog, source="milinternal", convert_to="mlprogram", compute_precision=precision,
                       minimum_deployment_target=ct.target.iOS18)
    model.save(str(path))
    return MilExecutor(path)


def test_rank0_outputs_come_back_with_shape_1(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.reduce_sum(x=x, keep_dims=False), mb.reduce_max(x=x, axes=[1])

    ex = _package(prog, tmp_path / "sum.mlpackage")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    total, rows = ex.predict({"x": x}).values()
    assert total.shape == (1,) and total[0] == 15.0  # Core ML has no rank-0 multiarray
    np.testing.assert_array_equal(rows, [2.0, 5.0])


def test_index_normalisation():
    idx, ok = normalize_indices(np.array([-4, -1, 0, 3, 4, 65535]), 4)
    np.testing.assert_array_equal(ok, [True, True, True, True, False, False])
    np.testing.assert_array_equal(idx[ok], [0, 3, 0, 3])
    idx, ok = normalize_indices(np.array([[-1, 2], [0, -2]]), (3, 2))  # per indexed axis, *_nd style
    np.testing.assert_array_equal(ok, [[True, False], [True, True]])
    np.testing.assert_array_equal(idx[ok], [2, 0, 0])


def test_gathers_take_negative_indices_and_refuse_out_of_bounds():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(OPS["gather"](x=x, indices=np.array([-1, 0]), axis=1), x[:, [3, 0]])
    np.testing.assert_array_equal(OPS["gather_nd"](x=x, indices=np.array([[-1, -2]])), [x[2, 2]])
    np.testing.assert_array_equal(OPS["gather_along_axis"](x=x, indices=np.array([[-1], [0], [1]]), axis=1),
                                  [[3], [4], [9]])
    with pytest.raises(IndexError, match="out of bounds"):
        OPS["gather"](x=x, indices=np.array([4]), axis=1)


def test_scatters_drop_out_of_bounds_updates_unless_validating():
    # coremltools' int16 cast pass turns an index of -1 into uint16 65535; Core ML skips that write.
    data = np.zeros((3, 4), np.float32)
    idx = np.array([[1, 65535], [1, 0], [-1, 1]])
    out = OPS["scatter_nd"](data=data, indices=idx, updates=np.array([1.0, 5.0, 8.0], np.float32), mode="update")
    want = np.zeros((3, 4), np.float32)
    want[1, 0], want[2, 1] = 5.0, 8.0
    np.testing.assert_array_equal(out, want)
    with pytest.raises(IndexError, match="validate_indices"):
        OPS["scatter_nd"](data=data, indices=idx, updates=np.ones(3, np.float32), validate_indices=True)
    out = OPS["scatter"](data=data, indices=np.array([-1, 7]), updates=np.ones((2, 4), np.float32), axis=0)
    np.testing.assert_array_equal(out.sum(1), [0, 0, 4])
    out = OPS["scatter_along_axis"](data=data, indices=np.array([[-1, 9]] * 3), updates=np.ones((3, 2), np.float32),
                                    axis=1, mode="add")
    np.testing.assert_array_equal(out[:, 3], [1, 1, 1])
    assert out.sum() == 3


def test_stack_that_disagrees_at_default_shapes_is_refused_at_load(tmp_path):
    class Stack(torch.nn.Module):
        def forward(self, a, b):
            return torch.stack([a, b])

    traced = torch.jit.trace(Stack().eval(), (torch.rand(2, 4), torch.rand(2, 4)))
    for default, refused in ((2, True), (4, False)):
        inputs = [ct.TensorType(name="a", shape=(2, 4)), ct.TensorType(name="b", shape=(2, ct.RangeDim(1, 8, default)))]
        model = ct.convert(traced, inputs=inputs, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                           minimum_deployment_target=ct.target.iOS17)
        path = tmp_path / f"stack{default}.mlpackage"
        model.save(str(path))
        if refused:
            with pytest.raises(PerchError, match="default input shapes"):
                MilExecutor(path)
        else:
            a = np.random.rand(2, 4).astype(np.float32)
            (out,) = MilExecutor(path).predict({"a": a, "b": a}).values()
            np.testing.assert_array_equal(out, np.stack([a, a]))


def test_list_ops_run_as_a_program(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        ls = mb.make_list(init_length=2, dynamic_length=True, elem_shape=[2, 3], dtype="fp32")
        ls = mb.list_write(ls=ls, index=0, value=x)
        ls = mb.list_write(ls=ls, index=2, value=mb.mul(x=x, y=2.0))  # grows the dynamic list
        stacked = mb.list_gather(ls=ls, indices=[2, 0, 1])
        return stacked, mb.list_read(ls=ls, index=2), mb.list_length(ls=ls)

    ex = _package(prog, tmp_path / "list.mlpackage")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    stacked, read, length = ex.predict({"x": x}).values()
    np.testing.assert_allclose(stacked, np.stack([2 * x, x, np.zeros_like(x)]), rtol=1e-6)
    np.testing.assert_allclose(read, 2 * x, rtol=1e-6)
    assert int(length[0]) == 3


def test_instance_norm_and_reshape_like_match_torch():
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 4)).astype(np.float32)
    gamma, beta = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, -1.0, 3.0], np.float32)
    ref = F.instance_norm(torch.from_numpy(x), weight=torch.from_numpy(gamma), bias=torch.from_numpy(beta), eps=1e-5)
    np.testing.assert_allclose(OPS["instance_norm"](x=x, gamma=gamma, beta=beta, epsilon=1e-5), ref.numpy(),
                               rtol=1e-4, atol=1e-5)
    out = OPS["reshape_like"](x=x, ref_tensors=(np.zeros((6, 9)), np.zeros((1, 20))), begins=(0, 1), ends=(1, 2),
                              end_masks=(False, True))
    assert out.shape == (6, 20)
