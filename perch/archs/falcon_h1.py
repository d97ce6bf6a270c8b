"""Export-ready Falcon-H1: attention and a Mamba-2 mixer side by side in every layer, with both caches.

Each layer reads one RMS-normed input into two branches whose outputs are summed: grouped-query rotary
attention (a K,V cache) and a Mamba-2 mixer (a conv state and an SSM state per head), then a SwiGLU MLP.
Loads the transformers state dict strictly; the µP multipliers Falcon-H1 is trained with (embedding, LM
head, attention in/out, key, SSM in/out, the five per-segment `ssm_multipliers` on the mixer's input
projection, MLP gate/down) are applied where transformers applies them. Every call continues from the
stored state, so a prompt can be fed in any number of chunks.

The Mamba-2 scan (a scalar decay per head; perch/archs/mamba2.py) has three forms:
- "loop": sequential, the plain definition (eager reference);
- "chunked": the state-space-dual (SSD) form: quadratic inside chunks of ONNX_CHUNK tokens, a decay product
  across chunks; no data-dependent loop and a dynamic length (torch.export -> ONNX);
- "quadratic": the same with the whole call as one chunk: no padding, so jit.trace keeps the length
  dynamic (Core ML), at T^2 per head (feed long prompts in chunks; the state carries over).
Backends ask for a form by its Falcon-Mamba name ("scan": dynamic length for ONNX; "logdepth": a fixed
traceable graph for Core ML); `EXPORT_SCANS` says what those mean here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perch.archs.falcon import rotary_tables, rotate_half, rope_theta
from perch.archs.masks import MASK_MIN, additive_mask
from perch.archs.falcon_mamba import a_log_to_a
from perch.archs.layers import RMSNorm, cache_kwarg, output_cache
from perch.archs.mamba2 import GatedNorm, scan_loop, scan_ssd
from perch.spec import ModelIO, StateSpec, TensorSpec

NAME = "falcon_h1"
HF_MODEL_TYPES = ("falcon_h1",)
HF_ARCHITECTURES = ("FalconH1ForCausalLM",)
HF_CONFIG = "FalconH1Config"
DESCRIPTION = "Falcon-H1 hybrid: rotary GQA attention and a Mamba-2 mixer in parallel in every layer (0.5B-34B)"
VARIANTS = ("one layout: every layer hybrid; gated RMS norm in the mixer (mamba_rms_norm) or a plain SiLU gate",)
PREFIX, EMBEDDING = "model", "model.embed_tokens.weight"
FRONTENDS = ("past_present", "stateful")
STATE_HOLDS = {"key": "rotated keys at the K,V head count (batch, kv_heads, context, head_dim)",
               "value": "values at the K,V head count (batch, kv_heads, context, head_dim)",
               "conv": "the mixer's last conv_kernel inputs (batch, d_ssm + 2*groups*d_state, conv_kernel)",
               "ssm": "the Mamba-2 state per head (batch, heads, head_dim, d_state)"}
# int4 keeps the limits every architecture had before the 2026-12-02 re-derivation (Falcon's min/max
# figures: rel_l2 0.064, max KL 7.9e-3): Falcon-H1's fixture was not in that measurement, and its Mamba-2
# half carries weight error forward as Falcon-Mamba's does.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers")
TOLERANCES: dict[str, dict] = {
    "int4": dict(rel_l2=0.25, min_cosine=0.98, max_kl=0.05, mean_kl=0.01, min_top1=0.85, min_top5=0.88,
                 state_rel_l2=0.3, basis="Falcon fixture, int4 min/max (Falcon-H1 not re-measured): rel_l2 "
                                         "0.064, max KL 7.9e-3, top-1 0.939"),
}
SCANS = ("loop", "chunked", "quadratic")
EXPORT_SCANS = {"scan": "chunked", "logdepth": "quadratic"}
ONNX_CHUNK = 32  # longest SSD chunk in the ONNX graph (plus one padding chunk); a shorter call uses its own length
# Core ML fp16 compute keeps these modules' ops fp32: both square their input (fp16 overflows above 256);
# the trained fixture's residual reached 338 (perch.exporter.to_coreml.compute_precision).
FP32_MODULES = ("RMSNorm", "GatedNorm")


def _unsupported(what: str):
    from perch.archs import unsupported

    return unsupported(what)


def check_config(config) -> None:
    """Refuse by name every Falcon-H1 setting this module does not implement."""
    if config.hidden_act != "silu":  # the conv activation and the MLP gate both use hidden_act
        raise _unsupported(f"hidden_act={config.hidden_act!r} (Falcon-H1 export implements silu)")
    limit = tuple(config.time_step_limit) if config.time_step_limit is not None else (0.0, float("inf"))
    if limit != (0.0, float("inf")):
        # transformers clamps dt in its chunked path only, not in its one-token path: no single reference.
        raise _unsupported(f"time_step_limit={list(limit)} (only the default (0, inf) has one meaning)")
    if any(t != "hybrid" for t in config.layers_block_type):
        raise _unsupported(f"layers_block_type={config.layers_block_type} (every layer must be hybrid)")
    if len(config.ssm_multipliers) != 5 or len(config.mlp_multipliers) != 2:
        raise _unsupported(f"ssm_multipliers={config.ssm_multipliers} / mlp_multipliers={config.mlp_multipliers} "
                           "(expected 5 and 2 values)")
    if config.mamba_n_heads % config.mamba_n_groups:
        raise _unsupported(f"mamba_n_heads={config.mamba_n_heads} in mamba_n_groups={config.mamba_n_groups}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise _unsupported(f"{config.num_attention_heads} heads in {config.num_key_value_heads} K,V groups")


def translate_config(raw: dict) -> dict:
    return raw


def head_dim(config) -> int:
    """transformers reads an explicit `head_dim` when the config has one (Falcon-H1-0.5B does)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def d_ssm(config) -> int:
    return config.mamba_d_ssm if config.mamba_d_ssm is not None else int(config.mamba_expand * config.hidden_size)


def conv_dim(config) -> int:
    return d_ssm(config) + 2 * config.mamba_n_groups * config.mamba_d_state


def mup_vector(config) -> torch.Tensor:
    """Per-channel scale of the mixer's in_proj output (z, x, B, C, dt segments): transformers keeps it as a
    non-persistent buffer computed from `ssm_multipliers` (µP), so it is rebuilt from the config, not loaded."""
    d, gn, h = d_ssm(config), config.mamba_n_groups * config.mamba_d_state, config.mamba_n_heads
    sizes = (d, d, gn, gn, h)
    return torch.cat([torch.full((n,), float(m), device="cpu") for n, m in zip(sizes, config.ssm_multipliers)])


# ------------------------------------------------------------------------------------------- modules
class Mixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.d, self.cd, self.h = d_ssm(config), conv_dim(config), config.mamba_n_heads
        self.g, self.n, self.k = config.mamba_n_groups, config.mamba_d_state, config.mamba_d_conv
        self.p, self.in_mult = config.mamba_d_head, config.ssm_in_multiplier
        self.conv1d = nn.Conv1d(self.cd, self.cd, self.k, groups=self.cd, bias=config.mamba_conv_bias,
                                padding=self.k - 1)
        self.in_proj = nn.Linear(config.hidden_size, self.d + self.cd + self.h, bias=config.mamba_proj_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.h))
        self.A_log = nn.Parameter(torch.empty(self.h))
        self.D = nn.Parameter(torch.empty(self.h))
        if config.mamba_rms_norm:
            self.norm = GatedNorm(self.d, config.rms_norm_eps, self.g, config.mamba_norm_before_gate)
        self.rms = config.mamba_rms_norm
        self.out_proj = nn.Linear(self.d, config.hidden_size, bias=config.projectors_bias)

    def conv(self, x: torch.Tensor, conv_state: torch.Tensor):
        """x (B, Dc, T) continues after conv_state (B, Dc, K): the last K inputs. Returns (silu(y), new state)."""
        full = torch.cat([conv_state[:, :, 1:].to(x.dtype), x], dim=2)  # (B, Dc, K-1+T)
        # Cast to the weight's dtype: coremltools types a scalar multiplier (the µP ones) fp32, so in an fp16
        # trace the conv input arrives fp32 and its weight would be promoted away from the fp16 bias.
        y = F.conv1d(full.to(self.conv1d.weight.dtype), self.conv1d.weight, self.conv1d.bias, groups=self.cd)
        return F.silu(y), full[:, :, -self.k :]

    def forward(self, x, mask, conv_state, ssm_state, mup, scan: str, chunk: int | None):
        """x (B, T, H); mask (B, T) 1/0 or None -> (out (B, T, H), conv_state, ssm_state)."""
        bsz, t, _ = x.shape
        if mask is not None:  # padded positions feed zeros, as transformers does
            x = x * mask.unsqueeze(-1).to(x.dtype)
        zxbcdt = self.in_proj(x * self.in_mult) * mup.to(x.dtype)
        z, xbc, dt = torch.split(zxbcdt, [self.d, self.cd, self.h], dim=-1)
        xbc, conv_state = self.conv(xbc.transpose(1, 2), conv_state)
        xbc = xbc.transpose(1, 2)  # (B, T, Dc)
        if mask is not None:
            xbc = xbc * mask.unsqueeze(-1).to(xbc.dtype)
        xs, b, c = torch.split(xbc.float(), [self.d, self.g * self.n, self.g * self.n], dim=-1)
        xs = xs.unflatten(-1, (self.h, self.p))  # (B, T, H, P)
        b, c = (v.unflatten(-1, (self.g, self.n)).repeat_interleave(self.h // self.g, dim=2) for v in (b, c))
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H)
        a, h0 = a_log_to_a(self.A_log), ssm_state.float()
        if scan == "loop":
            y, h = scan_loop(xs, dt, a, b, c, h0)
        else:
            y, h = scan_ssd(xs, dt, a, b, c, h0, chunk)
        y = (y + xs * self.D.float()[:, None]).flatten(2)  # (B, T, d)
        y = self.norm(y, z) if self.rms else y * F.silu(z.float())
        return self.out_proj(y.to(x.dtype)), conv_state, h


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
        bias, hid = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hid, self.nh * self.hd, bias=bias)
        self.k_proj = nn.Linear(hid, self.nkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(hid, self.nkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hd, hid, bias=bias)
        self.key_mult = config.key_multiplier

    def project(self, x, cos, sin):
        """x (B, T, H) -> rotated q (B, nh, T, hd), rotated k (B, nkv, T, hd) and v."""
        q = self.q_proj(x).unflatten(-1, (self.nh, self.hd)).transpose(1, 2)
        k = (self.k_proj(x) * self.key_mult).unflatten(-1, (self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.nkv, self.hd)).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def attend(self, q, k, v, mask):
        """q (B, nh, T, hd); k, v (B, nkv, S, hd); mask (B, 1, T, S) additive -> (B, T, nh*hd)."""
        b, _, t, hd = q.shape
        g = self.nh // self.nkv
        q = q.reshape(b, self.nkv, g * t, hd) * (hd**-0.5)  # fold each group's heads into rows: no K,V repeat
        scores = (q @ k.transpose(-1, -2)).view(b, self.nkv, g, t, -1) + mask.unsqueeze(1)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return (probs.view(b, self.nkv, g * t, -1) @ v).view(b, self.nh, t, hd).transpose(1, 2).reshape(b, t, -1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        i, hid, bias = config.intermediate_size, config.hidden_size, config.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(hid, i, bias=bias), nn.Linear(hid, i, bias=bias)
        self.down_proj = nn.Linear(i, hid, bias=bias)
        self.gate_mult, self.down_mult = config.mlp_multipliers

    def forward(self, x):
        return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x) * self.gate_mult)) * self.down_mult


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.feed_forward, self.mamba, self.self_attn = MLP(config), Mixer(config), Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class FalconH1Core(nn.Module):
    """Weights under transformers' names; `run` takes the attention cache policy as `attend` (as Falcon's
    core does) and the mixer states as per-layer lists."""

    def __init__(self, config, max_context: int, scan: str = "loop"):
        super().__init__()
        scan = EXPORT_SCANS.get(scan, scan)
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS} (or {tuple(EXPORT_SCANS)}), got {scan!r}")
        self.config, self.max_context, self.scan = config, max_context, scan
        self.chunk = None if scan == "quadratic" else ONNX_CHUNK
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_buffers("meta" if self.lm_head.weight.is_meta else "cpu")

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """Non-persistent rotary tables and µP vector; rebuilt after loading weights onto a meta-built module."""
        cos, sin = rotary_tables(head_dim(self.config), self.max_context, rope_theta(self.config))
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.register_buffer("mup", mup_vector(self.config).to(device), persistent=False)

    def run(self, input_ids, position_ids, mask, ssm_mask, conv_states, ssm_states, attend,
            hidden_out: list | None = None):
        """input_ids, position_ids (B, T); mask (B, 1, T, S) additive; ssm_mask (B, T) or None; `attend` the
        K,V cache policy `attend(i, attn, q, k, v, mask) -> (B, T, nh*hd)` -> (logits, conv list, ssm list).
        `hidden_out` collects each layer's output (`perch check --bisect`)."""
        c = self.config
        x = self.model.embed_tokens(input_ids) * c.embedding_multiplier
        cos = self.rope_cos[position_ids].unsqueeze(1).to(x.dtype)  # (B, 1, T, hd)
        sin = self.rope_sin[position_ids].unsqueeze(1).to(x.dtype)
        mask = mask.to(x.dtype)
        new_conv, new_ssm = [], []
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            m, cs, ss = layer.mamba(h, ssm_mask, conv_states[i], ssm_states[i], self.mup, self.scan, self.chunk)
            attn = layer.self_attn
            q, k, v = attn.project(h * c.attention_in_multiplier, cos, sin)
            a = attn.o_proj(attend(i, attn, q, k, v, mask))
            x = x + m * c.ssm_out_multiplier + a * c.attention_out_multiplier
            x = x + layer.feed_forward(layer.pre_ff_layernorm(x))
            new_conv.append(cs)
            new_ssm.append(ss)
            if hidden_out is not None:
                hidden_out.append(x)
        logits = self.lm_head(self.model.final_layernorm(x)).float() * c.lm_head_multiplier
        return logits, new_conv, new_ssm


class FalconH1PastPresent(nn.Module):
    """(input_ids, attention_mask (B, past+T), position_ids, past key0, value0, conv0, ssm0, key1, ...)
    -> (logits, present key0, value0, conv0, ssm0, ...)."""

    def __init__(self, core: FalconH1Core):
        super().__init__()
        self.core = core

    def forward(self, input_ids, attention_mask, position_ids, *past):
        t = input_ids.shape[1]
        mask = additive_mask(attention_mask, t)
        kv: list[torch.Tensor] = []

        def attend(i, attn, q, k, v, mask):
            k_all, v_all = torch.cat([past[4 * i], k], dim=2), torch.cat([past[4 * i + 1], v], dim=2)
            kv.append((k_all, v_all))
            return attn.attend(q, k_all, v_all, mask)

        logits, conv, ssm = self.core.run(input_ids, position_ids, mask, attention_mask[:, -t:],
                                          past[2::4], past[3::4], attend)
        sdt = past[3].dtype
        present = [x for i in range(len(conv)) for x in (*kv[i], conv[i].to(sdt), ssm[i].to(sdt))]
        return (logits, *present)


class FalconH1Stateful(nn.Module):
    """Layer-stacked buffers updated in place (Core ML states): K,V (L, B, nkv, max_context, hd) written at
    the positions implied by the mask's length, and the mixer's conv and SSM states.

    forward(input_ids (B, T), causal_mask (B, 1, T, end)) -> logits, as Falcon's stateful front-end.
    """

    def __init__(self, core: FalconH1Core, batch_size: int, state_dtype: torch.dtype, names: dict[str, str]):
        super().__init__()
        self.core, self.names, c = core, names, core.config
        n = c.num_hidden_layers
        for spec in io_spec(c, core.max_context, "stateful").states:  # buffer names are the backend's state names
            shape = (n, *spec.concrete_shape(batch_size, core.max_context))
            self.register_buffer(names[spec.kind], torch.zeros(shape, dtype=state_dtype))

    def buf(self, kind: str) -> torch.Tensor:
        return getattr(self, self.names[kind])

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t, end = input_ids.shape[1], causal_mask.shape[-1]
        start = end - t
        positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], t)
        kc, vc, cc, sc = (self.buf(k) for k in ("key", "value", "conv", "ssm"))

        def attend(i, attn, q, k, v, mask):
            # Write through the root buffer: a write through a view of it is silently dropped by Core ML.
            kc[i : i + 1, :, :, start:end] = k.unsqueeze(0).to(kc.dtype)
            vc[i : i + 1, :, :, start:end] = v.unsqueeze(0).to(vc.dtype)
            return attn.attend(q, kc[i, :, :, :end].to(k.dtype), vc[i, :, :, :end].to(v.dtype), mask)

        # The mixer's padding mask, from the mask's last row (a real token under left padding): 1 where it may
        # attend among the new tokens. A padded token then feeds the SSM nothing, as in transformers.
        ssm_mask = (causal_mask[:, 0, -1, start:end] > MASK_MIN / 2).to(causal_mask.dtype)
        n = self.core.config.num_hidden_layers
        logits, conv, ssm = self.core.run(input_ids, positions, causal_mask, ssm_mask, [cc[i] for i in range(n)],
                                          [sc[i] for i in range(n)], attend)
        for i in range(n):
            cc[i : i + 1] = conv[i].unsqueeze(0).to(cc.dtype)
            sc[i : i + 1] = ssm[i].unsqueeze(0).to(sc.dtype)
        return logits


def io_spec(config, max_context: int, frontend: str = "past_present", state_dtype: str = "float32") -> ModelIO:
    """Canonical I/O: key, value, conv and SSM state per layer. Past/present takes the 0/1 key mask over
    everything stored (its last T columns mask the mixer); stateful takes Falcon's additive causal mask."""
    n, hd, nkv = config.num_hidden_layers, head_dim(config), config.num_key_value_heads
    kv = ("batch", nkv, "context" if frontend == "past_present" else max_context, hd)
    shapes = {"key": kv, "value": kv, "conv": ("batch", conv_dim(config), config.mamba_d_conv),
              "ssm": ("batch", config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state)}
    states = tuple(StateSpec(kind, shape, state_dtype, n, STATE_HOLDS[kind], cache_axis=2 if kind in ("key", "value")
                             else None) for kind, shape in shapes.items())
    logits = (TensorSpec("logits", ("batch", "sequence", config.vocab_size), "float32"),)
    if frontend == "stateful":
        inputs = (TensorSpec("input_ids", ("batch", "sequence"), "int32"),
                  TensorSpec("causal_mask", ("batch", 1, "sequence", "total_sequence"), "float16"))
        return ModelIO(NAME, frontend, "additive", inputs, logits, states)
    inputs = (TensorSpec("input_ids", ("batch", "sequence"), "int64"),
              TensorSpec("attention_mask", ("batch", "total_sequence"), "int64"),
              TensorSpec("position_ids", ("batch", "sequence"), "int64"))
    return ModelIO(NAME, frontend, "keys", inputs, logits, states)


def build(config, state_dict: dict[str, torch.Tensor], max_context: int, scan: str = "loop") -> FalconH1Core:
    """Build on the meta device and take the checkpoint's tensors as-is (assign=True): never two copies."""
    with torch.device("meta"):
        core = FalconH1Core(config, max_context, scan)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state_dict:
        state_dict = {**state_dict, "lm_head.weight": state_dict[EMBEDDING]}
    core.load_state_dict(state_dict, strict=True, assign=True)
    core.init_buffers(next(iter(state_dict.values())).device)
    return core.eval()


def past_present(core: FalconH1Core) -> nn.Module:
    return FalconH1PastPresent(core)


def stateful(core: FalconH1Core, batch_size: int, state_dtype: torch.dtype, names: dict[str, str],
             mask: str = "additive") -> nn.Module:
    if mask != "additive":  # a client profile's mask contract this module does not build (swift-transformers')
        from perch.errors import PerchError

        raise PerchError(f"{NAME} takes the additive causal mask only, not the {mask!r} contract; export it "
                         "without --for (Apple's stateful recipe)")
    return FalconH1Stateful(core, batch_size, state_dtype, names)


# ---- transformers' own model as the reference (perch.runtimes.pytorch.reference)
def reference_forward(model, cache, ids, mask, positions):
    """transformers' Falcon-H1 as the reference: its multi-token forward continues from a non-empty cache
    (checked: chunks and single steps both equal a full forward to ~6e-7, unlike Falcon-Mamba's)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kwarg(model): cache})
    return out.logits, output_cache(out)


def reference_state(cache, config) -> dict[str, torch.Tensor]:
    """transformers' hybrid cache as Perch's per-layer state (K,V stored at the K,V head count)."""
    out = {}
    for i in range(config.num_hidden_layers):
        layer = cache.layers[i]
        for kind, t in (("key", layer.keys), ("value", layer.values), ("conv", cache.get_conv_state(i)),
                        ("ssm", cache.get_recurrent_state(i))):
            out[f"{kind}.{i}"] = t
    return out

