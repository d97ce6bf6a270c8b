"""Client profiles: what each real client of our artifacts reads, as naming over the canonical I/O.

A profile never forks the exporter. It is data that the backends' naming functions (`to_onnx.bindings`,
`to_coreml.bindings`) and I/O specs consult: state names, the mask contract its client feeds, a fused K,V
cache, where the graph goes, and which side files to write. `perch export --for NAME` picks one; the
manifest records it (`Manifest.profile`, the bindings, the mask contract), and our runtimes read only the
manifest, so `perch check` and `perch generate` drive every profile. How each client was read and
measured: docs/clients.md.

- optimum `ORTModelForCausalLM` and ONNX Runtime GenAI read the default ONNX layout (every Falcon ONNX
  export also writes genai's `genai_config.json`).
- transformers.js reads `onnx/model.onnx`; for a `multi_query` config it feeds one fused
  `past_key_values.{i}.key_value` per layer (K and V concatenated on the last axis), and Falcon-H1's Mamba
  states as `past_conv.{i}` / `past_ssm.{i}`. optimum, genai and swift-transformers carry no Mamba state
  beside a K,V cache and refuse Falcon-H1 by name.
- swift-transformers (Core ML) runs a model statefully only if its states are `keyCache`/`valueCache`
  (so Falcon-Mamba's conv/SSM states take those names), and feeds Falcon's `causalMask` as zeros one
  column longer than the keys (the "additive_plus_one" mask contract).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from perch.errors import PerchError
from perch.exporter.genai_config import GENAI_NO_SSM, write_genai_config
from perch.spec import ModelIO, StateSpec, TensorSpec

DEFAULT = "default"


@dataclass(frozen=True)
class Client:
    """One client's profile. `refuses`: arch -> why that client cannot run it (manifest, CLI, README)."""

    name: str
    backend: str  # "onnx" | "coreml" | "any"
    summary: str
    refuses: dict[str, str] = field(default_factory=dict)
    coreml_states: dict[str, str] = field(default_factory=dict)  # state kind -> Core ML state name
    swift_mask: bool = False  # Falcon's causalMask read the way swift-transformers sends it
    onnx_subfolder: str = ""  # where the graph goes ("onnx" for transformers.js)
    fuse_kv: bool = False  # a multi_query Falcon takes one past_key_values.{i}.key_value per layer
    # state kind -> (past, present) ONNX name templates over layer {i}, where the client's differ from optimum's
    onnx_states: dict[str, tuple[str, str]] = field(default_factory=dict)
    data_file: str = "model.onnx.data"  # external-data file name in the client's convention


TJS_NO_MAMBA = ("transformers.js has no falcon_mamba model type (AutoModelForCausalLM refuses it: 'Unsupported "
                "model type: falcon_mamba'), and no conv/SSM cache for it")
OPTIMUM_NO_MAMBA = "optimum's ORTModelForCausalLM has no Falcon-Mamba support (no conv/SSM state handling)"
OPTIMUM_NO_H1 = ("optimum's ORTModelForCausalLM carries only past_key_values between steps, not Falcon-H1's conv and "
                 "SSM states; run it with --for transformers.js, Perch's runtime or onnxruntime directly")
# transformers.js 4.x names a hybrid model's Mamba states past_conv.{i} / past_ssm.{i} (present_* out) and
# sizes the empty first ones from the graph's input shapes (getCacheNames, addPastKeyValues).
TJS_HYBRID_STATES = {"conv": ("past_conv.{i}", "present_conv.{i}"), "ssm": ("past_ssm.{i}", "present_ssm.{i}")}
SWIFT_NO_H1 = ("swift-transformers' LanguageModel carries two states (keyCache, valueCache); Falcon-H1 needs four "
               "(key, value, conv, SSM): run the default package with Perch's runtime or Core ML directly")

CLIENTS: dict[str, Client] = {c.name: c for c in (
    Client(DEFAULT, "any", "the backend's own layout (ONNX: what optimum and ONNX Runtime GenAI read)"),
    Client("optimum", "onnx", "optimum ORTModelForCausalLM: the default ONNX layout",
           refuses={"falcon_mamba": OPTIMUM_NO_MAMBA, "falcon_h1": OPTIMUM_NO_H1}),
    Client("genai", "onnx", "ONNX Runtime GenAI: the default ONNX layout and genai_config.json",
           refuses={"falcon_mamba": GENAI_NO_SSM, "falcon_h1": GENAI_NO_SSM}),
    Client("transformers.js", "onnx", "transformers.js: onnx/model.onnx, one fused K,V per layer for multi-query Falcon",
           refuses={"falcon_mamba": TJS_NO_MAMBA}, onnx_subfolder="onnx", fuse_kv=True, data_file="model.onnx_data",
           onnx_states=TJS_HYBRID_STATES),
    Client("swift-transformers", "coreml", "swift-transformers LanguageModel: keyCache/valueCache states and its causalMask feed",
           coreml_states={"key": "keyCache", "value": "valueCache", "conv": "keyCache", "ssm": "valueCache"},
           swift_mask=True, refuses={"falcon_h1": SWIFT_NO_H1}),
)}
# The clients of each backend, to say in every manifest which of them can run the artifact.
READERS = {"onnx": ("optimum", "genai", "transformers.js"), "coreml": ("swift-transformers",)}


def names() -> list[str]:
    return [c for c in CLIENTS if c != DEFAULT]


def client(name: str | None, backend: str, arch: str | None = None) -> Client:
    """The profile `name` for an export to `backend` (of `arch`); PerchError naming the fix otherwise."""
    c = CLIENTS.get(name or DEFAULT)
    if c is None:
        raise PerchError(f"--for {name!r}: choose one of {', '.join(names())}")
    if c.backend not in ("any", backend):
        raise PerchError(f"--for {c.name} is a {c.backend} profile; export with --to {c.backend}")
    if arch in c.refuses:
        raise PerchError(f"--for {c.name}: {c.refuses[arch]}")
    return c


def _layout(c: Client) -> tuple:
    return (bool(c.coreml_states), c.swift_mask, c.onnx_subfolder, c.fuse_kv, tuple(c.onnx_states.items()))


def support(profile: str, backend: str, arch: str) -> dict[str, str]:
    """Client -> "runs", "export with --for NAME" or "cannot run: why", for the clients of `backend`."""
    out, mine = {}, _layout(CLIENTS[profile])
    for name in READERS.get(backend, ()):
        why = CLIENTS[name].refuses.get(arch)
        out[name] = (f"cannot run: {why}" if why else
                     "runs" if _layout(CLIENTS[name]) == mine else f"export with --for {name}")
    return out


# ---------------------------------------------------------------- Core ML
def coreml_state_name(profile: str, kind: str) -> str | None:
    """The profile's Core ML name for a state kind, or None for the backend's default."""
    return CLIENTS[profile].coreml_states.get(kind)


def coreml_io(profile: str, io: ModelIO) -> ModelIO:
    """swift-transformers' mask contract on an attending stateful spec: one row, one extra column."""
    if not CLIENTS[profile].swift_mask or io.mask != "additive":
        return io
    inputs = tuple(TensorSpec(t.name, ("batch", 1, "mask_rows", "total_sequence_plus_one"), t.dtype)
                   if t.name == "causal_mask" else t for t in io.inputs)
    return dataclasses.replace(io, mask="additive_plus_one", inputs=inputs)


# ---------------------------------------------------------------- ONNX
def onnx_state_name(profile: str, kind: str, layer: int, role: str) -> str | None:
    """The profile's ONNX name for a state, or None for optimum's."""
    names = CLIENTS[profile].onnx_states.get(kind)
    return names[role == "present"].format(i=layer) if names else None


def onnx_io(profile: str, io: ModelIO, config) -> ModelIO:
    """transformers.js feeds `past_key_values.{i}.key_value` whenever config.json says multi_query."""
    if not (CLIENTS[profile].fuse_kv and getattr(config, "multi_query", False) and io.frontend == "past_present"):
        return io
    key = io.state("key")
    shape = (*key.shape[:-1], 2 * int(key.shape[-1]))
    fused = StateSpec("key_value", shape, key.dtype, key.num_layers,
                      "keys then values on the last axis, at the true K,V head count (batch, kv_heads, context, 2 * head_dim)")
    return dataclasses.replace(io, frontend="past_present_fused", states=(fused,))


def write_side_files(manifest, out_dir: Path) -> list[str]:
    """The client files next to the model: genai_config.json (whenever genai reads this layout), and
    transformers.js' settings in config.json."""
    written = []
    verdicts = support(manifest.profile, manifest.format, manifest.arch)
    kv_only = {st.kind for st in manifest.io.states} <= {"key", "value"}  # genai feeds a growing K,V cache only
    if manifest.format == "onnx" and verdicts.get("genai") == "runs" and kv_only:
        written.append(write_genai_config(manifest, out_dir))
    if manifest.profile == "transformers.js":
        written.append(_transformers_js_config(manifest, out_dir))
    return written


def _transformers_js_config(manifest, out_dir: Path) -> str:
    """transformers.js reads `transformers.js_config` in config.json: whether external data comes with the graph."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else dict(manifest.hf_config)
    tjs = config.setdefault("transformers.js_config", {})
    tjs["use_external_data_format"] = any(f.endswith(CLIENTS["transformers.js"].data_file) for f in manifest.files)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return "config.json"
