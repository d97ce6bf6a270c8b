"""Core ML conversion traps on tiny hand-made modules: a state written through a view (no state update op,
the state stays zero) and fp16 compute overflowing a norm's square unless the module is named fp32.

Real coremltools conversions, run back in Perch's MIL executor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import coremltools as ct

from perch.exporter import to_coreml
from perch.runtimes.mil.executor import MilExecutor

class _StateWriter(nn.Module):
    """A rolling buffer (the Mamba conv state pattern) in layer 1 of a stacked state."""

    def __init__(self, via_view: bool):
        super().__init__()
        self.via_view = via_view
        self.register_buffer("cache", torch.zeros(2, 1, 4, 8, dtype=torch.float16))

    def forward(self, x):  # x (1, 4, 1)
        if self.via_view:
            v = self.cache[1]
            new = torch.cat([v[:, :, 1:], x.to(v.dtype)], dim=2)
            v[:] = new  # through a view: Core ML drops this write, with no error
        else:
            new = torch.cat([self.cache[1][:, :, 1:], x.to(self.cache.dtype)], dim=2)
            self.cache[1:2] = new.unsqueeze(0)  # through the root buffer: kept
        return new.float().sum(-1)


@pytest.mark.parametrize("via_view", [True, False])
def test_state_written_through_view_is_caught(via_view, tmp_path):
    traced = torch.jit.trace(_StateWriter(via_view).eval(), (torch.zeros(1, 4, 1),))
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4, 1), dtype=np.float32)],
                       states=[ct.StateType(wrapped_type=ct.TensorType(shape=(2, 1, 4, 8), dtype=np.float16), name="cache")],
                       minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
                       compute_precision=ct.precision.FLOAT32)
    model.save(str(tmp_path / "m.mlpackage"))
    ex = MilExecutor(tmp_path / "m.mlpackage")
    state = ex.make_state()
    for i in range(3):
        ex.predict({"x": np.full((1, 4, 1), i + 1, np.float32)}, state)
    written = to_coreml.state_writes(model._mil_program)["cache"]
    if via_view:  # the trap: no state update op, and the state really stays zero
        assert written == 0 and not state["cache"].any()
        with pytest.raises(RuntimeError, match="never writes state"):
            to_coreml.check_state_writes(model._mil_program, ["cache"])
    else:
        assert written == 1 and state["cache"][1, 0, 0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3]
        to_coreml.check_state_writes(model._mil_program, ["cache"])


class _Squares(nn.Module):
    """An RMS norm (it squares its input) after a linear layer: fp16 overflows once |x| > 256."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        with torch.no_grad():  # identity: the input's magnitude reaches the square
            self.proj.weight.copy_(torch.eye(4))
            self.proj.bias.zero_()

    def forward(self, x):
        y = self.proj(x)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.sq = _Squares()

    def forward(self, x):
        return self.sq(x) * 2


@pytest.mark.parametrize("fp32_modules", [(), ("_Squares",)])
def test_fp16_compute_keeps_named_modules_fp32(fp32_modules, tmp_path):
    traced = torch.jit.trace(_Net().eval(), (torch.zeros(1, 4),))
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4), dtype=np.float32)],
                       minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
                       compute_precision=to_coreml.compute_precision(True, fp32_modules))
    model.save(str(tmp_path / "m.mlpackage"))
    ex = MilExecutor(tmp_path / "m.mlpackage")
    out = next(iter(ex.predict({"x": np.full((1, 4), 400.0, np.float32)}).values()))
    dtypes = {op.op_type: op.outputs[0].dtype for op in model._mil_program.functions["main"].operations}
    fp32 = ct.converters.mil.mil.types.fp32
    if fp32_modules:  # the norm's square stays fp32; the op outside the named module is still fp16
        assert dtypes["pow"] == fp32 and dtypes["mul"] != fp32 and np.allclose(out, 2.0)
    else:  # the trap itself: 400^2 is inf in fp16, rsqrt(inf) = 0, and the normed output is lost
        assert dtypes["pow"] != fp32 and not out.any()
