"""The fast CUDA reference: Falcon with SDPA, a static K,V cache and CUDA graphs; Falcon-Mamba with Triton
kernels of our own (runtimes/pytorch/mamba_kernels.py) and CUDA graphs; a bitsandbytes 4/8-bit reference.

Why not transformers: on an H100 its Falcon-7B decodes at 26 ms/token and Falcon-Mamba-7B at 127 ms/token,
against a ~4.6 ms bandwidth floor (docs/traps.md): launch overhead and unfused ops, not arithmetic. Both
runtimes reuse Perch's export-ready modules for the weights (transformers names, strict load) and the
Runtime step API; Falcon's forward is `FalconCore.run` with a static-cache `attend` policy; decode runs one
captured graph per batch size over static buffers. No compiled extension is needed (mamba-ssm takes 6-9
minutes to build on the GPU machine). `kernels="torch"` and `cuda_graphs=False` run the same data flow on
CPU, which is how tests check it against transformers without a GPU.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

from perch.errors import PerchError
from perch.runtimes.base import Runtime


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise PerchError("the fast reference needs a CUDA GPU and a CUDA build of torch; use --device cpu "
                         "(the transformers reference) on a machine without one")


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
            # one query position (decode): every folded row shares the mask row, so let SDPA broadcast it
            m = mask if t == 1 else mask.unsqueeze(2).expand(b, 1, g, t, mask.shape[-1]).reshape(b, 1, g * t, -1)
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
    """Falcon-Mamba on CUDA: per layer `add_rms_norm`, in_proj, `conv_step`, x_proj, dt_proj, `ssm_scan`,
    out_proj (runtimes/pytorch/mamba_kernels.py), the whole decode step in one CUDA graph. Prefill runs the
    same layer body over the chunk, with the stock depthwise conv and `ssm_scan` over all its tokens; every
    call continues from the stored state. The residual stream is fp32, as in transformers
    (`residual_in_fp32`); the SSM state is fp32, the conv state in the model dtype.
    `kernels="torch"` swaps the Triton kernels for their torch twins ("auto": Triton on CUDA, torch elsewhere).
    """

    name, ARCH = "perch-cuda-falcon-mamba", "falcon_mamba"

    def __init__(self, config, state_dict: dict, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 max_context: int = 1 << 20, cuda_graphs: bool = True, kernels: str = "auto"):
        from perch.archs import falcon_mamba
        from perch.runtimes.pytorch.mamba_kernels import KERNELS

        if kernels == "auto":
            kernels = "triton" if torch.device(device).type == "cuda" else "torch"
        if kernels not in KERNELS:
            raise PerchError(f"kernels={kernels!r}: choose auto or one of {', '.join(KERNELS)}")
        if kernels == "triton" and importlib.util.find_spec("triton") is None:
            raise PerchError("the fast Falcon-Mamba reference needs triton (it ships with CUDA builds of torch); "
                             "`pip install triton`, or use --device cpu")
        self._setup(config, device, dtype, max_context, cuda_graphs)
        self.add_rms_norm, self.conv_step, self.ssm_scan = KERNELS[kernels]
        core = falcon_mamba.build(config, _cast(state_dict, dtype), max_context)
        self.core = core.to(self.device).requires_grad_(False)
        self.io = falcon_mamba.io_spec(config, max_context, state_dtype="float32")
        mixers = [blk.mixer for blk in self.core.backbone.layers]
        # Per-layer constants in the layout and dtype the kernels take, computed once.
        self.A = [falcon_mamba.a_log_to_a(m.A_log).contiguous() for m in mixers]
        self.D = [m.D.float() for m in mixers]
        self.dt_bias = [m.dt_proj.bias.float() for m in mixers]
        self.conv_w = [m.conv1d.weight[:, 0].contiguous() for m in mixers]  # (D, 1, K) -> (D, K)
        self.eps = config.mixer_rms_eps
        # The torch twin's scan holds (B, D, T, N) tensors: bound T; the Triton scan keeps no such tensor.
        self.chunk = 64 if kernels == "torch" else max_context
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

    def _run(self, ids: torch.Tensor, keep: torch.Tensor | None, step: bool) -> torch.Tensor:
        """ids (B, T); keep (B, T, 1) 1/0 (left padding) or None; step: T == 1 through `conv_step`
        -> logits (B, T, V) fp32, continuing from and updating the stored conv and SSM state."""
        core, d = self.core, self.config.intermediate_size
        res = core.backbone.embeddings(ids).float()  # (B, T, H): the fp32 residual stream
        b, t, width = res.shape
        res, out = res.view(b * t, width), None
        for i, blk in enumerate(core.backbone.layers):
            m = blk.mixer
            x = self.add_rms_norm(res, out, blk.norm.weight, blk.norm.eps).view(b, t, width)
            xz = m.in_proj(x if keep is None else x * keep)  # (B, T, 2D): conv input, then gate
            if step:
                u = self.conv_step(xz[:, 0, :d], self.conv[i], self.conv_w[i], m.conv1d.bias)[:, None]
            else:
                u, conv = m.conv(xz[..., :d].transpose(1, 2), self.conv[i])  # the export module's conv
                self.conv[i].copy_(conv)
                u = u.transpose(1, 2) if keep is None else u.transpose(1, 2) * keep
                u = u.contiguous()
            xdbc = m.x_proj(u)  # (B, T, R+2N)
            dtl = F.linear(xdbc[..., : m.rank], m.dt_proj.weight)  # its norm and bias are applied in ssm_scan
            y = self.ssm_scan(self.ssm[i], u, dtl, xdbc, xz[..., d:], self.A[i], self.D[i], self.dt_bias[i], self.eps)
            out = m.out_proj(y).view(b * t, width)
        norm_f = core.backbone.norm_f
        return core.lm_head(self.add_rms_norm(res, out, norm_f.weight, norm_f.eps)).float().view(b, t, -1)

    def _decode_body(self) -> torch.Tensor:
        return self._run(self.s_ids, None, step=True)

    @torch.inference_mode()
    def _forward(self, input_ids, mask, positions) -> np.ndarray:
        t = input_ids.shape[1]
        if t == 1 and mask[:, -1].all():
            self.s_ids.copy_(torch.from_numpy(input_ids))
            return self._decode()
        ids = torch.from_numpy(input_ids).to(self.device)
        m = torch.from_numpy(mask[:, -t:]).to(self.device)
        keep = None if bool(m.all()) else m[..., None].to(self.dtype)
        parts = [self._run(ids[:, s : s + self.chunk], None if keep is None else keep[:, s : s + self.chunk], False)
                 for s in range(0, t, self.chunk)]
        return torch.cat(parts, dim=1).cpu().numpy()

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for i in range(self.config.num_hidden_layers):
            out[f"conv.{i}"] = self.conv[i].float().cpu().numpy()
            out[f"ssm.{i}"] = self.ssm[i].cpu().numpy()
        return out


def open_gpu_reference(ckpt, *, dtype: torch.dtype = torch.bfloat16, max_context: int = 2048,
                       cuda_graphs: bool = True) -> Runtime:
    """The fast CUDA reference for a loaded checkpoint (Triton kernels for Falcon-Mamba); PerchError without CUDA."""
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
