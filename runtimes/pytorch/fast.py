"""The fast CUDA reference: Falcon with SDPA, a static K,V cache and CUDA graphs; Falcon-Mamba calling the
mamba-ssm / causal-conv1d kernels directly, with CUDA graphs; a bitsandbytes 4/8-bit transformers reference.

Why not transformers: on an H100 its Falcon-7B decodes at 26 ms/token and Falcon-Mamba-7B at 127 ms/token
(docs/traps.md), against a ~4.6 ms bandwidth floor: launch overhead and, for Mamba, kernels it does not reliably
call (docs/traps.md). Both runtimes reuse Perch's export-ready modules for the weights (transformers names,
strict load) and the Runtime step API; decode runs one captured graph per batch size over static buffers.
`kernels="torch"` and `cuda_graphs=False` run the same data flow on CPU (the kernels' reference
semantics), which is how tests check the plumbing without a GPU. Optional packages are imported lazily.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from perch.errors import PerchError
from perch.runtimes.base import Runtime


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise PerchError("the fast reference needs a CUDA GPU and a CUDA build of torch; use --device cpu "
                         "(the transformers reference) on a machine without one")


def mamba_kernels():
    """(selective_state_update, selective_scan_fn, causal_conv1d_update, causal_conv1d_fn) or PerchError."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError as e:
        raise PerchError(f"the fast Falcon-Mamba reference needs mamba-ssm and causal-conv1d ({e}); "
                         "install them with `pip install perch[mamba]` on the GPU machine") from None
    return selective_state_update, selective_scan_fn, causal_conv1d_update, causal_conv1d_fn


# ---- the kernels' reference semantics in torch (mamba_ssm / causal_conv1d `*_ref`), for CPU runs
def _ssm_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    state.copy_(state * torch.exp(dt[..., None] * A) + (dt[..., None] * B.float()[:, None]) * x.float()[..., None])
    out = (state * C.float()[:, None]).sum(-1) + (x.float() * D.float() if D is not None else 0.0)
    return (out * F.silu(z.float()) if z is not None else out).to(x.dtype)


def _scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device, dtype=torch.float32)
    ys = [_ssm_update_torch(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                            None if z is None else z[..., t], delta_bias, delta_softplus) for t in range(u.shape[-1])]
    y = torch.stack(ys, dim=-1)
    return (y, state) if return_last_state else y


def _conv_update_torch(x, conv_state, weight, bias=None, activation=None):
    full = torch.cat([conv_state, x[..., None]], dim=-1)
    conv_state.copy_(full[..., 1:])
    y = (full[..., 1:] * weight).sum(-1) + (bias if bias is not None else 0.0)
    return F.silu(y) if activation == "silu" else y


def _conv_fn_torch(x, weight, bias=None, activation=None):
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y) if activation == "silu" else y


TORCH_KERNELS = (_ssm_update_torch, _scan_torch, _conv_update_torch, _conv_fn_torch)


class _GraphedRuntime(Runtime):
    """Static decode buffers per batch size, and the decode body captured once into a CUDA graph."""

    def _setup(self, ckpt_config, device: str, dtype: torch.dtype, max_context: int, cuda_graphs: bool) -> None:
        self.config, self.device, self.dtype = ckpt_config, torch.device(device), dtype
        self.vocab_size, self.max_context = ckpt_config.vocab_size, max_context
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._batch, self._graph = None, None

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up on a side stream (cuBLAS handles, Triton compiles), then record one decode step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._decode_body()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._decode_body()
        self._clear_state()

    def _decode(self) -> np.ndarray:
        if self.use_graphs:
            self._graph.replay()
            out = self._out
        else:
            out = self._decode_body()
        return out.float().cpu().numpy()

    def _reset(self, batch_size: int) -> None:
        if self._batch != batch_size:
            self._batch = batch_size
            self._allocate(batch_size)
            if self.use_graphs:
                self._capture()
        self._clear_state()

    def close(self) -> None:
        self._graph = self._out = self.core = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


class FastFalcon(_GraphedRuntime):
    """Falcon on CUDA: SDPA over a static (layers, B, nkv, max_context, hd) cache, graphed decode.

    K,V stay at the true head count (7B: one head, not 71 tiled copies); each K,V group's query heads are
    folded into the query rows, so SDPA sees plain multi-head attention with nkv heads and no K,V repeat.
    """

    name, ARCH = "perch-cuda-falcon", "falcon"

    def __init__(self, config, state_dict: dict, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 max_context: int = 2048, cuda_graphs: bool = True):
        from perch.archs import falcon

        self._setup(config, device, dtype, max_context, cuda_graphs)
        core = falcon.build(config, _cast(state_dict, dtype), max_context)
        self.core = core.to(self.device).requires_grad_(False)  # rotary tables stay fp32
        self.io = falcon.io_spec(config, max_context, state_dtype="float32")
        self.nkv, self.nh = falcon.num_kv_heads(config), config.num_attention_heads
        self.hd, self.mask_min = config.hidden_size // self.nh, falcon.MASK_MIN
        self.reset(1)

    def _allocate(self, b: int) -> None:
        shape = (self.config.num_hidden_layers, b, self.nkv, self.max_context, self.hd)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.s_ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        self.s_pos = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        self.s_idx = torch.zeros(1, dtype=torch.long, device=self.device)
        self.s_mask = torch.full((b, 1, 1, self.max_context), self.mask_min, dtype=self.dtype, device=self.device)

    def _clear_state(self) -> None:
        pass  # unwritten cache slots are masked out; nothing to clear

    def _body(self, ids, pos, idx, mask, kv_len: int) -> torch.Tensor:
        """ids, pos (B, T); idx (T,) cache slots to write; mask (B, 1, T, kv_len) -> logits (B, T, V) fp32."""
        g = self.nh // self.nkv

        def attend(i, attn, q, k, v, mask):  # the static-cache policy: write the slots, SDPA over the buffer
            self.k[i].index_copy_(2, idx, k)
            self.v[i].index_copy_(2, idx, v)
            b, _, t, hd = q.shape
            q = q.reshape(b, self.nkv, g * t, hd)  # rows: group-major, then position; no K,V repeat
            m = mask.unsqueeze(2).expand(b, 1, g, t, mask.shape[-1]).reshape(b, 1, g * t, -1)
            out = F.scaled_dot_product_attention(q, self.k[i, :, :, :kv_len], self.v[i, :, :, :kv_len], attn_mask=m)
            return out.view(b, self.nh, t, hd).transpose(1, 2).reshape(b, t, self.nh * hd)

        return self.core.run(ids, pos, mask, attend)

    def _decode_body(self) -> torch.Tensor:
        return self._body(self.s_ids, self.s_pos, self.s_idx, self.s_mask, self.max_context)

    @torch.inference_mode()
    def _forward(self, input_ids, mask, positions) -> np.ndarray:
        from perch.archs.falcon import additive_mask

        t, end = input_ids.shape[1], mask.shape[1]
        if t == 1:  # static shapes: attend over the whole buffer, unwritten slots masked
            full = np.full((mask.shape[0], self.max_context), self.mask_min, dtype=np.float32)
            full[:, :end] = np.where(mask > 0, 0.0, self.mask_min)  # the query is the last key: causal as is
            self.s_ids.copy_(torch.from_numpy(input_ids))
            self.s_pos.copy_(torch.from_numpy(positions))
            self.s_idx.fill_(end - 1)
            self.s_mask.copy_(torch.from_numpy(full)[:, None, None].to(self.dtype))
            return self._decode()
        dev = self.device
        idx = torch.arange(end - t, end, device=dev)
        m = additive_mask(torch.from_numpy(mask).to(dev), t).to(self.dtype)
        ids, pos = torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev)
        return self._body(ids, pos, idx, m, end).cpu().numpy()

    def state(self) -> dict[str, np.ndarray]:
        n = self.position
        out = {}
        for i in range(self.config.num_hidden_layers):
            out[f"key.{i}"] = self.k[i, :, :, :n].float().cpu().numpy()
            out[f"value.{i}"] = self.v[i, :, :, :n].float().cpu().numpy()
        return out


class FastFalconMamba(_GraphedRuntime):
    """Falcon-Mamba on CUDA: `causal_conv1d_update` + `selective_state_update` per layer in one graphed decode
    step; prefill with `causal_conv1d_fn` + `selective_scan_fn` (which starts from a zero SSM state, so a
    chunk that follows stored state runs token by token). The residual stream is fp32, as in transformers
    (`residual_in_fp32`); the SSM state is fp32, the conv state in the model dtype (the kernel's rule).
    """

    name, ARCH = "perch-cuda-falcon-mamba", "falcon_mamba"

    def __init__(self, config, state_dict: dict, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 max_context: int = 1 << 20, cuda_graphs: bool = True, kernels: str = "cuda"):
        from perch.archs import falcon_mamba

        self._setup(config, device, dtype, max_context, cuda_graphs)
        fns = mamba_kernels() if kernels == "cuda" else TORCH_KERNELS
        self.ssm_update, self.scan, self.conv_update, self.conv_fn = fns
        core = falcon_mamba.build(config, _cast(state_dict, dtype), max_context)
        self.core = core.to(self.device).requires_grad_(False)
        self.io = falcon_mamba.io_spec(config, max_context, state_dtype="float32")
        mixers = [blk.mixer for blk in self.core.backbone.layers]
        # Per-layer constants the kernels take in fp32, computed once (transformers recomputes them per call).
        self.A = [falcon_mamba.a_log_to_a(m.A_log) for m in mixers]
        self.D = [m.D.float() for m in mixers]
        self.dt_bias = [m.dt_proj.bias.float() for m in mixers]
        self.conv_w = [m.conv1d.weight[:, 0] for m in mixers]  # (D, 1, K) -> (D, K)
        self.eps, self.k = config.mixer_rms_eps, config.conv_kernel
        m = mixers[0]
        # dt, B and C are RMS-normed separately: one matmul with a 0/1 segment matrix sums all three at once
        # (fewer small kernels per layer; that launch count, not arithmetic, is what a graphed decode pays).
        self.split = [m.rank, m.n, m.n]
        seg = torch.repeat_interleave(torch.eye(3), torch.tensor(self.split), dim=0)  # (r+2N, 3)
        self.seg, self.seg_mean = seg.to(self.device), (seg / torch.tensor(self.split)).to(self.device)
        self.reset(1)

    def _allocate(self, b: int) -> None:
        c = self.config
        n, d = c.num_hidden_layers, c.intermediate_size
        self.conv = torch.zeros(n, b, d, c.conv_kernel, dtype=self.dtype, device=self.device)
        self.ssm = torch.zeros(n, b, d, c.state_size, dtype=torch.float32, device=self.device)
        self.s_ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)

    def _clear_state(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()

    def _ssm_inputs(self, mixer, u: torch.Tensor):
        """u (..., D) -> dt before bias and softplus (..., D), B and C (..., N), each RMS-normed first
        (Falcon-Mamba's weightless norms, in fp32 like `perch.archs.falcon_mamba.weightless_rms`)."""
        x = mixer.x_proj(u)
        xf = x.float()
        inv = torch.rsqrt(xf.square() @ self.seg_mean + self.eps)  # (..., 3): one per segment
        dt, b, c = torch.split((xf * (inv @ self.seg.T)).to(x.dtype), self.split, dim=-1)
        dt = F.linear(dt, mixer.dt_proj.weight)  # its bias goes to the kernel (dt_bias)
        return dt, b, c

    def _decode_body(self) -> torch.Tensor:
        core = self.core
        res = core.backbone.embeddings(self.s_ids[:, 0]).float()  # (B, H)
        for i, blk in enumerate(core.backbone.layers):
            m = blk.mixer
            u, z = m.in_proj(blk.norm(res.to(self.dtype))).chunk(2, dim=-1)  # (B, D) each
            u = self.conv_update(u.contiguous(), self.conv[i], self.conv_w[i], m.conv1d.bias, "silu")
            dt, b, c = self._ssm_inputs(m, u)
            y = self.ssm_update(self.ssm[i], u, dt, self.A[i], b, c, self.D[i], z=z.contiguous(),
                                dt_bias=self.dt_bias[i], dt_softplus=True)
            res = res + m.out_proj(y).float()
        return core.lm_head(core.backbone.norm_f(res.to(self.dtype))).float()[:, None]

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A first chunk (zero state): the fused scan over all T tokens. ids, mask (B, T) -> logits (B, T, V)."""
        core, keep = self.core, mask[..., None].to(self.dtype)
        res = core.backbone.embeddings(ids).float()
        for i, blk in enumerate(core.backbone.layers):
            m = blk.mixer
            u, z = m.in_proj(blk.norm(res.to(self.dtype)) * keep).transpose(1, 2).chunk(2, dim=1)  # (B, D, T)
            self.conv[i].copy_(torch.cat([self.conv[i], u], dim=-1)[..., -self.k:])  # the last K inputs
            u = self.conv_fn(u.contiguous(), self.conv_w[i], m.conv1d.bias, activation="silu") * keep.transpose(1, 2)
            dt, b, c = self._ssm_inputs(m, u.transpose(1, 2))
            y, last = self.scan(u, dt.transpose(1, 2).contiguous(), self.A[i], b.transpose(1, 2).contiguous(),
                                c.transpose(1, 2).contiguous(), self.D[i], z.contiguous(), self.dt_bias[i],
                                delta_softplus=True, return_last_state=True)
            self.ssm[i].copy_(last)
            res = res + m.out_proj(y.transpose(1, 2)).float()
        return core.lm_head(core.backbone.norm_f(res.to(self.dtype))).float()

    @torch.inference_mode()
    def _forward(self, input_ids, mask, positions) -> np.ndarray:
        t = input_ids.shape[1]
        if t > 1 and self.position == t:  # nothing stored before this chunk
            ids, m = torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask[:, -t:]).to(self.device)
            return self._prefill(ids, m).cpu().numpy()
        if not mask[:, -t:].all():
            raise PerchError("a padded chunk after stored state is not supported by the fast Falcon-Mamba reference; "
                             "pad only the first prefill")
        out = []
        for j in range(t):  # a chunk after stored state: the scan kernel has no initial state, step instead
            self.s_ids.copy_(torch.from_numpy(input_ids[:, j : j + 1]))
            out.append(self._decode())
        return np.concatenate(out, axis=1)

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for i in range(self.config.num_hidden_layers):
            out[f"conv.{i}"] = self.conv[i].float().cpu().numpy()
            out[f"ssm.{i}"] = self.ssm[i].cpu().numpy()
        return out


def open_gpu_reference(ckpt, *, dtype: torch.dtype = torch.bfloat16, max_context: int = 2048,
                       cuda_graphs: bool = True) -> Runtime:
    """The fast CUDA reference for a loaded checkpoint; PerchError without CUDA (or, for Falcon-Mamba,
    without mamba-ssm and causal-conv1d)."""
    _require_cuda()
    fast = {cls.ARCH: cls for cls in (FastFalcon, FastFalconMamba)}
    if ckpt.arch not in fast:
        raise PerchError(f"no fast CUDA reference for {ckpt.arch}; use --device cpu (the transformers reference)")
    return fast[ckpt.arch](ckpt.config, ckpt.state_dict, dtype=dtype, max_context=max_context, cuda_graphs=cuda_graphs)


def bnb_reference(ckpt, *, bits: int, max_context: int, compute_dtype: torch.dtype = torch.bfloat16) -> Runtime:
    """transformers on CUDA with every linear layer but lm_head in bitsandbytes nf4 (bits=4) or LLM.int8 (8):
    the reference for quantized artifacts, quantized the way a user of bitsandbytes would run the model."""
    _require_cuda()
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PerchError("--reference-dtype bnb4/bnb8 needs bitsandbytes; `pip install perch[gpu]`") from None
    from perch.runtimes.pytorch.reference import ReferenceRuntime

    ref = ReferenceRuntime(ckpt, device="cuda", dtype=compute_dtype, max_context=max_context)
    for parent in list(ref.model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not ref.model.lm_head:
                setattr(parent, name, _bnb_linear(bnb, child, bits, compute_dtype))
    torch.cuda.empty_cache()
    ref.name = f"reference-bnb{bits}"
    return ref


def _bnb_linear(bnb, lin: torch.nn.Linear, bits: int, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The bitsandbytes twin of `lin`; its weight is quantized when moved to CUDA (bitsandbytes' contract)."""
    w = lin.weight.data.cpu()
    if bits == 4:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    elif bits == 8:
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if lin.bias is not None:
        new.bias = torch.nn.Parameter(lin.bias.data.cpu(), requires_grad=False)
    return new.cuda()
