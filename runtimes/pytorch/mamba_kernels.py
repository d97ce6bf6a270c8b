"""Falcon-Mamba's per-layer kernels for the fast reference: Triton kernels of our own and their torch twins.

Why our own: the mamba-ssm / causal-conv1d extensions take 6-9 minutes to compile on the GPU machine and
have no wheels that reach it; Triton ships with torch there. Three kernels cover a layer between its matmuls:
- `add_rms_norm`: residual add (fp32 stream) + the block's RMS norm, one launch instead of about ten;
- `conv_step`: one token of the depthwise causal conv: shift the state, dot with the weights, bias, SiLU;
- `ssm_scan`: the selective scan over T >= 1 tokens from a stored state, with everything around it fused:
  Falcon-Mamba's weightless RMS norms on dt (applied after `dt_proj`: a scalar per token commutes with a
  bias-free linear map), B and C; dt bias and softplus; state update; C readout; D skip; SiLU(z) gate.
  Decode calls it with T = 1, prefill with the whole chunk (sequential in T, parallel over batch x channels).

Each torch twin is the same function (same arguments, same in-place state update) written with
`perch.archs.falcon_mamba`'s scan, so the recurrence has one definition; tests check the Triton kernels
against the twins in Triton's CPU interpreter (TRITON_INTERPRET=1) and the twins against transformers.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from perch.errors import PerchError

BLOCK_D = 64  # channels per program: 64 x N=16 fp32 state stays in registers


# ---- torch twins (CPU, tests, and the reference semantics of the Triton kernels)
def add_rms_norm_torch(res: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """res (B, H) fp32 += delta, in place; returns RMSNorm(res cast to the weight's dtype), as transformers'
    FalconMamba block does (residual in fp32, norm input in the model dtype)."""
    if delta is not None:
        res.add_(delta.float())
    x = res.to(weight.dtype).float()
    return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(weight.dtype)


def conv_step_torch(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, D) one token; state (B, D, K) the last K inputs, shifted in place -> SiLU(conv) (B, D)."""
    full = torch.cat([state[..., 1:], x[..., None].to(state.dtype)], dim=-1)
    state.copy_(full)
    y = (full.float() * weight.float()).sum(-1) + (bias.float() if bias is not None else 0.0)
    return F.silu(y).to(x.dtype)


def ssm_scan_torch(state, u, dtl, xdbc, z, a, d, dt_bias, eps: float) -> torch.Tensor:
    """state (B, D, N) fp32, updated in place; u, dtl, z (B, T, D): conv output, dt_proj(dt) before its norm
    and bias, gate; xdbc (B, T, R+2N): x_proj's output (dt, B, C, not yet normed); a (D, N) = -exp(A_log);
    d, dt_bias (D,) -> y (B, T, D) in u's dtype."""
    from perch.archs.falcon_mamba import selective_scan, weightless_rms

    n = a.shape[1]
    dt_raw, b, c = torch.split(xdbc, [xdbc.shape[-1] - 2 * n, n, n], dim=-1)
    inv = torch.rsqrt(dt_raw.float().square().mean(-1, keepdim=True) + eps)  # the dt norm, as a scale
    dt = F.softplus(dtl.float() * inv + dt_bias.float())
    b, c = weightless_rms(b, eps).float(), weightless_rms(c, eps).float()
    y, last = selective_scan(u.float(), dt, b, c, a.float(), d.float(), z.float().transpose(1, 2), state.float())
    state.copy_(last)
    return y.transpose(1, 2).to(u.dtype)


# ---- Triton kernels (module level: Triton resolves `tl` through the kernel's globals, and reads
# TRITON_INTERPRET when a kernel is decorated, i.e. when this module is first imported)
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twins still work
    triton = tl = None


def _jit(fn):
    """triton.jit where triton is installed; elsewhere the plain function (never launched: `_kernels` refuses)."""
    return triton.jit(fn) if triton is not None else fn


@_jit
def add_rms_norm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, H, eps,
                        HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    m = h < H
    x = tl.load(res_ptr + row * H + h, mask=m, other=0.0)
    if HAS_DELTA:
        x += tl.load(delta_ptr + row * H + h, mask=m, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * H + h, x, mask=m)
    x = x.to(out_ptr.dtype.element_ty).to(tl.float32)  # the norm's input is in the model dtype
    normed = (x * tl.rsqrt(tl.sum(x * x, 0) / H + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + h, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + h, (w * normed).to(out_ptr.dtype.element_ty), mask=m)

@_jit
def conv_step_kernel(x_ptr, state_ptr, w_ptr, b_ptr, u_ptr, D, stride_xb,
                     K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    bi, pd = tl.program_id(0), tl.program_id(1)
    dd = pd * BLOCK + tl.arange(0, BLOCK)
    dm = dd < D
    k = tl.arange(0, KP)
    x = tl.load(x_ptr + bi * stride_xb + dd, mask=dm, other=0.0)
    srow = state_ptr + bi * D * K + dd[:, None] * K
    shifted = tl.load(srow + k[None, :] + 1, mask=dm[:, None] & (k[None, :] + 1 < K), other=0.0)
    win = tl.where(k[None, :] == K - 1, x[:, None].to(shifted.dtype), shifted)  # (BLOCK, KP)
    wmask = dm[:, None] & (k[None, :] < K)
    w = tl.load(w_ptr + dd[:, None] * K + k[None, :], mask=wmask, other=0.0).to(tl.float32)
    y = tl.sum(win.to(tl.float32) * w, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + dd, mask=dm, other=0.0).to(tl.float32)
    tl.store(srow + k[None, :], win, mask=wmask)
    tl.store(u_ptr + bi * D + dd, (y * tl.sigmoid(y)).to(u_ptr.dtype.element_ty), mask=dm)

@_jit
def ssm_scan_kernel(state_ptr, u_ptr, dtl_ptr, xdbc_ptr, z_ptr, y_ptr, a_ptr, d_ptr, dtb_ptr,
                    T, D, eps, su_b, su_t, sdt_b, sdt_t, sx_b, sx_t, sz_b, sz_t, sy_b, sy_t,
                    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    bi, pd = tl.program_id(0), tl.program_id(1)
    dd = pd * BLOCK + tl.arange(0, BLOCK)
    dm = dd < D
    n = tl.arange(0, N)
    r = tl.arange(0, RP)
    sptr = state_ptr + bi * D * N + dd[:, None] * N + n[None, :]
    h = tl.load(sptr, mask=dm[:, None], other=0.0)
    a = tl.load(a_ptr + dd[:, None] * N + n[None, :], mask=dm[:, None], other=0.0)
    dskip = tl.load(d_ptr + dd, mask=dm, other=0.0).to(tl.float32)
    dtb = tl.load(dtb_ptr + dd, mask=dm, other=0.0).to(tl.float32)
    for t in range(T):
        xrow = xdbc_ptr + bi * sx_b + t * sx_t
        dtr = tl.load(xrow + r, mask=r < R, other=0.0).to(tl.float32)
        bb = tl.load(xrow + R + n).to(tl.float32)
        cc = tl.load(xrow + R + N + n).to(tl.float32)
        # weightless RMS norms, rounded to the model dtype as transformers does
        bb = (bb * tl.rsqrt(tl.sum(bb * bb, 0) / N + eps)).to(xdbc_ptr.dtype.element_ty).to(tl.float32)
        cc = (cc * tl.rsqrt(tl.sum(cc * cc, 0) / N + eps)).to(xdbc_ptr.dtype.element_ty).to(tl.float32)
        u = tl.load(u_ptr + bi * su_b + t * su_t + dd, mask=dm, other=0.0).to(tl.float32)
        dt = tl.load(dtl_ptr + bi * sdt_b + t * sdt_t + dd, mask=dm, other=0.0).to(tl.float32)
        dt = dt * tl.rsqrt(tl.sum(dtr * dtr, 0) / R + eps) + dtb
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, torch's threshold
        h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bb[None, :]
        y = tl.sum(h * cc[None, :], 1) + u * dskip
        z = tl.load(z_ptr + bi * sz_b + t * sz_t + dd, mask=dm, other=0.0).to(tl.float32)
        tl.store(y_ptr + bi * sy_b + t * sy_t + dd, (y * z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=dm)
    tl.store(sptr, h, mask=dm[:, None])


def _kernels(*tensors: torch.Tensor):
    if triton is None:
        raise PerchError("kernels='triton' needs triton (it ships with CUDA builds of torch; "
                         "`pip install triton` elsewhere)")
    if os.environ.get("TRITON_INTERPRET") != "1" and any(t.device.type != "cuda" for t in tensors):
        raise PerchError("the Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before "
                         "triton is imported); use kernels='torch' on CPU")
    return triton, add_rms_norm_kernel, conv_step_kernel, ssm_scan_kernel


def _last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"kernel input of shape {tuple(t.shape)} needs a unit stride on its last dimension")


def add_rms_norm_triton(res, delta, weight, eps: float) -> torch.Tensor:
    triton, kernel, _, _ = _kernels(res)
    b, hsize = res.shape
    out = torch.empty(b, hsize, dtype=weight.dtype, device=res.device)
    kernel[(b,)](res, res if delta is None else delta.contiguous(), weight, out, hsize, eps,
                 HAS_DELTA=delta is not None, BLOCK_H=triton.next_power_of_2(hsize))
    return out


def conv_step_triton(x, state, weight, bias) -> torch.Tensor:
    triton, _, kernel, _ = _kernels(x, state)
    b, d = x.shape
    k = state.shape[-1]
    _last_dim_contiguous(x)
    if not state.is_contiguous() or not weight.is_contiguous():
        raise ValueError("conv_step needs a contiguous state (B, D, K) and weight (D, K)")
    u = torch.empty(b, d, dtype=x.dtype, device=x.device)
    kernel[(b, triton.cdiv(d, BLOCK_D))](x, state, weight, weight if bias is None else bias, u, d, x.stride(0),
                                         K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None, BLOCK=BLOCK_D)
    return u


def ssm_scan_triton(state, u, dtl, xdbc, z, a, d, dt_bias, eps: float) -> torch.Tensor:
    triton, _, _, kernel = _kernels(state, u)
    b, t, dim = u.shape
    n = a.shape[1]
    if not state.is_contiguous() or state.dtype != torch.float32 or not a.is_contiguous():
        raise ValueError("ssm_scan needs a contiguous fp32 state (B, D, N) and a contiguous A (D, N)")
    if n & (n - 1):
        raise ValueError(f"ssm_scan needs a power-of-two state size, got {n}")
    _last_dim_contiguous(u, dtl, xdbc, z)
    y = torch.empty(b, t, dim, dtype=u.dtype, device=u.device)
    r = xdbc.shape[-1] - 2 * n
    kernel[(b, triton.cdiv(dim, BLOCK_D))](
        state, u, dtl, xdbc, z, y, a, d, dt_bias, t, dim, eps,
        u.stride(0), u.stride(1), dtl.stride(0), dtl.stride(1), xdbc.stride(0), xdbc.stride(1),
        z.stride(0), z.stride(1), y.stride(0), y.stride(1), R=r, RP=triton.next_power_of_2(r), N=n, BLOCK=BLOCK_D)
    return y


KERNELS = {
    "torch": (add_rms_norm_torch, conv_step_torch, ssm_scan_torch),
    "triton": (add_rms_norm_triton, conv_step_triton, ssm_scan_triton),
}
