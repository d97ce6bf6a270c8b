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


def scan_ssd(x, dt, a, b, c, h0, chunk: int | None):
    """The same recurrence in the state-space-dual form (Mamba-2 paper, transformers' torch path), in fp32.

    Padded steps have dt=0: decay 1 and no input, so the state passes through them unchanged.
    """
    bsz, t, h, p = x.shape
    if chunk is None:  # one chunk: no padding, nothing shape-dependent for a trace to freeze
        xs, dts, bs, cs = (v.unsqueeze(1) for v in (x, dt, b, c))
    else:
        # One all-padding chunk more than needed: the trace's 3-token sample would otherwise have one chunk,
        # and torch.export fixes a size-1 axis at 1 (every prompt over `chunk` tokens then failed in ORT).
        n_chunks = (t + chunk - 1) // chunk + 1
        xs, dts, bs, cs = (_pad_time(v, n_chunks * chunk - t).unflatten(1, (n_chunks, chunk)) for v in (x, dt, b, c))
    la = dts * a  # (B, C, L, H) log-decay per step
    cum = torch.cumsum(la, dim=2)
    xdt = xs * dts[..., None]  # (B, C, L, H, P)
    seg = cum.unsqueeze(3) - cum.unsqueeze(2)  # (B, C, L(out), S(in), H): log-decay from s to l
    n = seg.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None, :, :, None]
    decay = torch.exp(torch.where(causal, seg, MASK_MIN))
    scores = torch.einsum("bclhn,bcshn->bclsh", cs, bs) * decay
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)
    # Each chunk's own contribution to the state at its end, then the state at every chunk start.
    to_end = torch.exp(cum[:, :, -1:] - cum)  # (B, C, L, H)
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", bs * to_end[..., None], xdt)
    totals = F.pad(cum[:, :, -1], (0, 0, 1, 0))  # (B, C+1, H): 0, then each chunk's total log-decay
    ctot = torch.cumsum(totals, dim=1)
    m = ctot.shape[1]
    tri = torch.ones(m, m, dtype=torch.bool, device=x.device).tril()[None, :, :, None]
    inter = torch.exp(torch.where(tri, ctot.unsqueeze(2) - ctot.unsqueeze(1), MASK_MIN))  # (B, out, in, H)
    states = torch.cat([h0.unsqueeze(1), chunk_states], dim=1)  # (B, C+1, H, P, N)
    starts = torch.einsum("bozh,bzhpn->bohpn", inter, states)
    y = y + torch.einsum("bclhn,bchpn->bclhp", cs, starts[:, :-1]) * torch.exp(cum)[..., None]
    return y.flatten(1, 2)[:, :t], starts[:, -1]


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
