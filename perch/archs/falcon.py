"""Export-ready Falcon: 7B-style multi-query, 40B/Falcon2-style grouped, and multi-head variants as config.

Loads the transformers state dict strictly (same parameter names). Differences from transformers, each
for export: K,V kept at the true KV-head count (never tiled: 71x smaller for 7B); grouped attention by
reshaping queries, not repeating K,V; rotary angles precomputed in fp32 (transformers computes them in the
model dtype: 0.37 logit error at position ~2000 in fp16); an additive mask with a finite floor for fp16.

Two front-ends share one core and differ only in the cache policy:
- `FalconPastPresent`: explicit past/present tensors with a dynamic past length (ONNX, optimum naming).
- `FalconStateful`: fixed-size K,V buffers written in place at the position implied by the mask's length
  (Core ML states; swift-transformers' `inputIds` + `causalMask` contract).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perch.archs.layers import cache_kwarg, output_cache
from perch.archs.masks import MASK_MIN, additive_mask  # noqa: F401 (MASK_MIN re-exported)
from perch.spec import ModelIO, StateSpec, TensorSpec

NAME = "falcon"
HF_MODEL_TYPES = ("falcon", "RefinedWebModel", "RefinedWeb")
HF_ARCHITECTURES = ("FalconForCausalLM", "RWForCausalLM")
HF_CONFIG = "FalconConfig"
DESCRIPTION = "Falcon decoder with rotary attention (Falcon-7B/40B/180B, Falcon2-11B)"
VARIANTS = (
    "multi_query: one K,V head shared by all query heads (Falcon-7B)",
    "grouped: new_decoder_architecture, num_kv_heads K,V groups (Falcon-40B/180B, Falcon2-11B)",
    "multi_head: multi_query=false, one K,V head per query head",
    "attention and MLP in parallel (parallel_attn) or in sequence",
)
PREFIX, EMBEDDING = "transformer", "transformer.word_embeddings.weight"
FRONTENDS = ("past_present", "stateful", "inplace")
STATE_HOLDS = {"key": "rotated keys at the true K,V head count (batch, kv_heads, context, head_dim)",
               "value": "values at the true K,V head count (batch, kv_heads, context, head_dim)"}
TOLERANCES: dict[str, dict] = {}
# the config side lives in perch/archs/falcon_config.py; its names are this architecture's interface
from perch.archs.falcon_config import (  # noqa: E402, F401
    REQUIRED_FIELDS, FalconLayout, check_config, falcon_layout, falcon_variant, num_kv_heads, rope_theta,
    split_fused_qkv, translate_config)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(head_dim: int, max_context: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (max_context, head_dim), the layout transformers' Falcon uses."""
    # Explicit CPU: the module may be built under a meta-device context, tables must hold real values.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    freqs = torch.arange(max_context, dtype=torch.float64, device="cpu")[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


class FalconMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.nh, self.nkv = config.num_attention_heads, num_kv_heads(config)
        self.hd = config.hidden_size // self.nh
        qkv_out = (self.nh + 2 * self.nkv) * self.hd
        self.query_key_value = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, H) -> rotated q (B, nh, T, hd) and the new k (B, nkv, T, hd), v."""
        q, k, v = split_fused_qkv(self.query_key_value(x), self.config)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """q (B, nh, T, hd); k, v (B, nkv, S, hd); mask (B, 1, T, S) additive -> (B, T, H) before `dense`."""
        b, _, t, hd = q.shape
        g = self.nh // self.nkv
        # Fold each group's query heads into the row axis: one matmul per K,V head, no K,V repeat.
        q = q.reshape(b, self.nkv, g * t, hd) * (hd**-0.5)
        scores = (q @ k.transpose(-1, -2)).view(b, self.nkv, g, t, -1) + mask.unsqueeze(1)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = probs.view(b, self.nkv, g * t, -1) @ v  # (B, nkv, g*T, hd)
        return out.view(b, self.nh, t, hd).transpose(1, 2).reshape(b, t, self.nh * hd)


class FalconLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        layout = falcon_layout(config)  # the one place transformers' layout rules are resolved
        self.two_norms, self.parallel = "ln_mlp" in layout.layer_norms, layout.parallel_attn
        self.self_attention = FalconAttention(config)
        self.mlp = FalconMLP(config)
        for name in layout.layer_norms:
            setattr(self, name, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_attn(x) if self.two_norms else self.input_layernorm(x)

    def finish(self, x: torch.Tensor, attn_in: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual + MLP after attention: parallel (7B/40B) or sequential (parallel_attn=False)."""
        if self.parallel:
            mlp_in = self.ln_mlp(x) if self.two_norms else attn_in
            return x + attn_out + self.mlp(mlp_in)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconBody(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconLayer(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class FalconCore(nn.Module):
    """The weights (transformers names) and the forward, with the cache policy passed in as `attend`.

    A policy is `attend(i, attn, q, k, v, mask) -> (B, T, H)`: it stores layer i's new k, v (B, nkv, T, hd)
    wherever its cache lives and attends q over everything stored; the core applies `attn.dense`.
    """

    def __init__(self, config, max_context: int):
        super().__init__()
        self.config, self.max_context = config, max_context
        self.transformer = FalconBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_buffers("meta" if self.lm_head.weight.is_meta else "cpu")

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """Non-persistent rotary tables; rebuilt after loading weights onto a meta-built module."""
        hd = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_tables(hd, self.max_context, rope_theta(self.config))
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def run(self, input_ids, position_ids, mask, attend, hidden_out: list | None = None) -> torch.Tensor:
        """input_ids, position_ids (B, T); mask (B, 1, T, S) additive; `attend` the cache policy -> logits."""
        x, cos, sin = embed(self, input_ids, position_ids)
        mask = mask.to(x.dtype)
        for i, layer in enumerate(self.transformer.h):
            x = layer_step(layer, i, x, cos, sin, mask, attend)
            if hidden_out is not None:
                hidden_out.append(x)
        return head(self, x)


# The core's forward in three steps, as functions of any module with the core's attribute names: the pieced
# Core ML conversion (exporter/coreml_pieces.py) traces each step on its own with the same weight names.
def embed(core, input_ids, position_ids):
    """-> x (B, T, H) and the rotary cos, sin (B, 1, T, hd) in x's dtype."""
    x = core.transformer.word_embeddings(input_ids)
    cos = core.rope_cos[position_ids].unsqueeze(1).to(x.dtype)
    sin = core.rope_sin[position_ids].unsqueeze(1).to(x.dtype)
    return x, cos, sin


def layer_step(layer: FalconLayer, i: int, x, cos, sin, mask, attend) -> torch.Tensor:
    attn_in = layer.attn_input(x)
    attn = layer.self_attention
    q, k, v = attn.project(attn_in, cos, sin)
    return layer.finish(x, attn_in, attn.dense(attend(i, attn, q, k, v, mask)))


def head(core, x) -> torch.Tensor:
    return core.lm_head(core.transformer.ln_f(x)).float()


class FalconPastPresent(nn.Module):
    """(input_ids, attention_mask, position_ids, past k0, v0, k1, ...) -> (logits, present k0, v0, ...)."""

    def __init__(self, core: FalconCore):
        super().__init__()
        self.core = core

    def forward(self, input_ids, attention_mask, position_ids, *past):
        mask = additive_mask(attention_mask, input_ids.shape[1])
        present: list[torch.Tensor] = []

        def attend(i, attn, q, k, v, mask):
            k_all = torch.cat([past[2 * i], k], dim=2)
            v_all = torch.cat([past[2 * i + 1], v], dim=2)
            present.extend((k_all, v_all))
            return attn.attend(q, k_all, v_all, mask)

        logits = self.core.run(input_ids, position_ids, mask, attend)
        return (logits, *present)


class FalconStateful(nn.Module):
    """Fixed-size K,V buffers (layers, B, nkv, max_context, hd) updated in place: Core ML state.

    `names` maps the state kinds ("key", "value") to the buffer names the backend wants.

    forward(input_ids (B, T), causal_mask (B, 1, T, end)) -> logits. The T new tokens sit at positions
    end-T .. end-1, so one graph serves prefill, decode and further chunks.

    `mask` is the mask contract (perch.spec.MASK_CONTRACTS): "additive" as above; "additive_plus_one" is
    swift-transformers' feed, (B, 1, 1, end + 1) zeros, so the causal part is built here.
    """

    def __init__(self, core: FalconCore, batch_size: int, state_dtype: torch.dtype, names: dict[str, str],
                 mask: str = "additive"):
        super().__init__()
        self.core, self.names = core, names
        self.extra_mask_columns = {"additive": 0, "additive_plus_one": 1}[mask]
        c = core.config
        shape = (c.num_hidden_layers, batch_size, num_kv_heads(c), core.max_context, c.hidden_size // c.num_attention_heads)
        for kind in ("key", "value"):  # the buffer names are the backend's state names (traced as such)
            self.register_buffer(names[kind], torch.zeros(shape, dtype=state_dtype))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        positions, causal_mask = stateful_positions(input_ids, causal_mask, self.extra_mask_columns)
        end = causal_mask.shape[-1]
        attend = cache_attend(getattr(self, self.names["key"]), getattr(self, self.names["value"]),
                              end - input_ids.shape[1], end)
        return self.core.run(input_ids, positions, causal_mask, attend)


def stateful_positions(input_ids, causal_mask, extra_columns: int):
    """Positions (B, T) of the new tokens and the additive mask (B, 1, T, end) over the cache's first `end`."""
    t, end = input_ids.shape[1], causal_mask.shape[-1] - extra_columns
    start = end - t
    positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], t)
    if extra_columns:
        causal = torch.arange(end)[None, :] <= positions[:1, :, None]  # (1, T, end)
        # (allowed - 1) * -MASK_MIN: 0 or MASK_MIN; a where() of two scalars converts to a scalar in Core ML.
        causal_mask = causal_mask[..., :end] + ((causal.float() - 1.0) * -MASK_MIN).unsqueeze(1)
    return positions, causal_mask


def cache_attend(kc: torch.Tensor, vc: torch.Tensor, start, end):
    """The stateful cache policy: store layer i's new k, v at start..end-1, attend over the first `end`."""

    def attend(i, attn, q, k, v, mask):
        # Write through the root buffer: a write through a view of it is silently dropped by Core ML.
        kc[i : i + 1, :, :, start:end] = k.unsqueeze(0).to(kc.dtype)
        vc[i : i + 1, :, :, start:end] = v.unsqueeze(0).to(vc.dtype)
        return attn.attend(q, kc[i, :, :, :end].to(k.dtype), vc[i, :, :, :end].to(v.dtype), mask)

    return attend


def io_spec(config, max_context: int, frontend: str = "past_present", state_dtype: str = "float32") -> ModelIO:
    """Canonical I/O per front-end: past/present (dynamic past), inplace (fixed buffers, same feeds), stateful."""
    hd, n = config.hidden_size // config.num_attention_heads, config.num_hidden_layers
    context = "context" if frontend == "past_present" else max_context
    kv_shape = ("batch", num_kv_heads(config), context, hd)
    states = tuple(StateSpec(kind, kv_shape, state_dtype, n, STATE_HOLDS[kind], cache_axis=2) for kind in ("key", "value"))
    logits = (TensorSpec("logits", ("batch", "sequence", config.vocab_size), "float32"),)
    if frontend == "stateful":
        inputs = (TensorSpec("input_ids", ("batch", "sequence"), "int32"),
                  TensorSpec("causal_mask", ("batch", 1, "sequence", "total_sequence"), "float16"))
        return ModelIO(NAME, frontend, "additive", inputs, logits, states)
    inputs = (
        TensorSpec("input_ids", ("batch", "sequence"), "int64"),
        TensorSpec("attention_mask", ("batch", "total_sequence"), "int64"),
        TensorSpec("position_ids", ("batch", "sequence"), "int64"),
    )
    return ModelIO(NAME, frontend, "keys", inputs, logits, states)


def build(config, state_dict: dict[str, torch.Tensor], max_context: int, **_options) -> FalconCore:
    """Build on the meta device and take the checkpoint's tensors as-is (assign=True): never two copies.

    Options of other architectures (a Mamba `scan`) are accepted and ignored, so callers stay generic.
    """
    with torch.device("meta"):
        core = FalconCore(config, max_context)
    core.load_state_dict(state_dict, strict=True, assign=True)
    core.init_buffers(next(iter(state_dict.values())).device)
    return core.eval()


def past_present(core: FalconCore) -> nn.Module:
    return FalconPastPresent(core)


def stateful(core: FalconCore, batch_size: int, state_dtype: torch.dtype, names: dict[str, str],
             mask: str = "additive") -> nn.Module:
    return FalconStateful(core, batch_size, state_dtype, names, mask)


# ---- transformers' own model as the reference (perch.runtimes.pytorch.reference)
def reference_forward(model, cache, ids, mask, positions):
    """One call of transformers' Falcon with its dynamic cache: any chunk continues correctly."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kwarg(model): cache})
    return out.logits, output_cache(out)


def reference_state(cache, config) -> dict[str, torch.Tensor]:
    """Canonical per-layer K,V from transformers' cache, one head per K,V group (its sdpa path tiles them)."""
    out = {}
    for i in range(config.num_hidden_layers):
        layer = cache.layers[i] if hasattr(cache, "layers") else None
        k, v = (layer.keys, layer.values) if layer is not None else (cache.key_cache[i], cache.value_cache[i])
        out[f"key.{i}"], out[f"value.{i}"] = _untile(k, config), _untile(v, config)
    return out


def _untile(t: torch.Tensor, config) -> torch.Tensor:
    nkv = num_kv_heads(config)
    if t.shape[1] != nkv:
        b, nh, s, hd = t.shape
        t = t.view(b, nkv, nh // nkv, s, hd)[:, :, 0]
    return t
