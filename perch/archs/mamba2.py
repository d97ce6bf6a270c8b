"""The Mamba-2 mixer's pieces that do not depend on a checkpoint layout: its scan (a scalar decay per head) in
a sequential and a state-space-dual form, and its gated grouped RMS norm. Falcon-H1's mixer uses them; a
plain Mamba-2 architecture would too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perch.archs.masks import MASK_MIN


def scan_loop(x, dt, a, b, c, h0):
    """h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T; y_t = h_t c_t. x (B,T,H,P); dt (B,T,H); a (H,);
    b, c (B,T,H,N); h0 (B,H,P,N) -> y (B,T,H,P), h_T."""
    ys, h = [], h0
    for t in range(x.shape[1]):
        da = torch.exp(dt[:, t] * a)[:, :, None, None]  # (B, H, 1, 1)
        h = da * h + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :]
        ys.append((h * c[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


def _pad_time(t: torch.Tensor, pad) -> torch.Tensor:
    return F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))


def _chunks(v: torch.Tensor, n_chunks, size, t) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, C, L, ...): padded to C chunks of L steps, heads first."""
    v = v.unsqueeze(1) if n_chunks is None else _pad_time(v, n_chunks * size - t).unflatten(1, (n_chunks, size))
    return v.permute(0, 3, 1, 2, *range(4, v.ndim))


def _masked_exp(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of a (..., out, in) log-decay table, 0 where in > out."""
    n = log_decay.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_decay.device).tril()
    return torch.exp(torch.where(causal, log_decay, MASK_MIN))


def scan_ssd(x, dt, a, b, c, h0, chunk: int | None):
    """The same recurrence in the state-space-dual form (Mamba-2 paper, transformers' torch path), in fp32.

    Padded steps have dt=0: decay 1 and no input, so the state passes through them unchanged. Every
    contraction is a batched MatMul over (batch, head, chunk), heads first so the state (B, H, P, N) needs
    no transposes: ONNX Runtime's CPU Einsum took 37% of a falcon-h1-mid decode step (28.6 of 77.5 ms in
    its profiler) for the same products.
    """
    t, p = x.shape[1], x.shape[3]
    n_chunks = size = None
    if chunk is not None:
        # Chunks no longer than the call: a one-token decode step is two 1-token chunks, not 64 padded
        # positions. One all-padding chunk more than needed: the trace's 3-token sample would otherwise
        # have one chunk, and torch.export fixes a size-1 axis at 1 (every prompt over `chunk` tokens then
        # failed in ORT).
        size = torch.sym_min(t, chunk)
        n_chunks = (t + size - 1) // size + 1
    xs, bs, cs = (_chunks(v, n_chunks, size, t) for v in (x, b, c))  # (B, H, C, L, P|N)
    dts = _chunks(dt.unsqueeze(-1), n_chunks, size, t)  # (B, H, C, L, 1)
    cum = torch.cumsum(dts * a[:, None, None, None], dim=3)  # (B, H, C, L, 1): log-decay from chunk start
    xdt = xs * dts
    decay = _masked_exp(cum - cum.transpose(3, 4))  # (B, H, C, L(out), S(in))
    y = ((cs @ bs.transpose(3, 4)) * decay) @ xdt  # (B, H, C, L, P)
    # Each chunk's own contribution to the state at its end, then the state at every chunk start.
    to_end = torch.exp(cum[:, :, :, -1:] - cum)  # (B, H, C, L, 1)
    chunk_states = (xdt * to_end).transpose(3, 4) @ bs  # (B, H, C, P, N)
    ctot = torch.cumsum(F.pad(cum[:, :, :, -1], (0, 0, 1, 0)), dim=2)  # (B, H, C+1, 1): 0, then chunk totals
    inter = _masked_exp(ctot - ctot.transpose(2, 3))  # (B, H, out, in)
    states = torch.cat([h0.unsqueeze(2), chunk_states], dim=2)  # (B, H, C+1, P, N)
    starts = (inter @ states.flatten(3)).unflatten(3, (p, -1))
    y = y + (cs @ starts[:, :, :-1].transpose(3, 4)) * torch.exp(cum)
    return y.permute(0, 2, 3, 1, 4).flatten(1, 2)[:, :t], starts[:, :, -1]


class GatedNorm(nn.Module):
    """The mixer's grouped RMS norm with a SiLU gate before or after it (FalconH1RMSNormGated), in fp32."""

    def __init__(self, size: int, eps: float, groups: int, norm_before_gate: bool):
        super().__init__()
        self.weight, self.eps, self.groups, self.before = nn.Parameter(torch.ones(size)), eps, groups, norm_before_gate

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        g = F.silu(gate.float())
        y = y.float() if self.before else y.float() * g
        yg = y.unflatten(-1, (self.groups, -1))
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        y = (self.weight.float().unflatten(-1, (self.groups, -1)) * yg).flatten(-2)
        return y * g if self.before else y
