"""TorchScript control flow through Core ML: jit.script loops and ifs become MIL while_loop / cond."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import coremltools as ct

from perch.runtimes.mil.executor import MilExecutor

D, HEADS, VOCAB, MAX_T = 32, 4, 50, 16
FP16_U = 2.0**-11  # fp16 unit roundoff


from tests.test_mil_executor import convert, rel_err


# ---- control flow: jit.script loops and ifs become MIL while_loop / cond -------------------------------------


@torch.jit.script
def decay_scan(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """h_t = decay * h_{t-1} + x_t over axis 1, the shape of a Mamba selective-scan recurrence."""
    # No `out[:, t] = h`: ct.convert silently drops slice writes inside a loop (y came out as proj(0)).
    h = torch.zeros_like(x[:, 0])
    out = torch.zeros_like(x)
    steps = torch.arange(x.size(1)).view(1, -1, 1)
    for t in range(x.size(1)):
        h = decay * h + x[:, t]
        out = torch.where(steps == t, h.unsqueeze(1), out)
    return out


class Scan(nn.Module):
    def __init__(self):
        super().__init__()
        self.decay = nn.Parameter(torch.rand(D) * 0.9)
        self.proj = nn.Linear(D, D)

    def forward(self, x):  # (1, T, D)
        return self.proj(decay_scan(F.softplus(x), self.decay))


def test_scripted_loop_runs_as_while_loop(tmp_path):
    torch.manual_seed(0)
    module = Scan().eval()
    x = torch.randn(1, 4, D)
    inputs = [ct.TensorType(name="x", shape=(1, ct.RangeDim(1, MAX_T, 4), D), dtype=np.float32)]
    ex = MilExecutor(convert(module, x, inputs, tmp_path / "scan.mlpackage", outputs=[ct.TensorType(name="y")]))
    assert "while_loop" in ex.op_types
    for t in (1, 4, 11):
        x = np.random.default_rng(t).standard_normal((1, t, D)).astype(np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        assert rel_err(ex.predict({"x": x})["y"], ref) < 1e-5


@torch.jit.script
def branch(x: torch.Tensor) -> torch.Tensor:
    if bool(x.sum() > 0):
        return x * 2.0
    return x - 1.0


class Branch(nn.Module):
    def forward(self, x):
        return branch(x) + 1.0


def test_scripted_if_runs_as_cond(tmp_path):
    inputs = [ct.TensorType(name="x", shape=(2, 3), dtype=np.float32)]
    ex = MilExecutor(convert(Branch(), torch.ones(2, 3), inputs, tmp_path / "if.mlpackage", "fp16"))
    assert "cond" in ex.op_types
    for sign in (1.0, -1.0):
        x = sign * np.arange(1, 7, dtype=np.float32).reshape(2, 3)
        (y,) = ex.predict({"x": x}).values()
        np.testing.assert_array_equal(y, branch(torch.from_numpy(x)).numpy() + 1.0)
