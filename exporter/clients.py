"""Client profiles: what each real client of our artifacts needs, as naming over the canonical I/O.

A profile never forks the exporter. It renames the canonical states for its backend, picks the cache
policy its client feeds (a mask convention, a fused K,V), places the files where the client looks, and
writes the client's side files. `perch export --for NAME` picks one; the manifest records it, and our own
runtimes read the manifest, so `perch check` and `perch generate` drive every profile.

Clients (how each was read or measured: docs/clients.md):
- optimum `ORTModelForCausalLM`: the default ONNX layout.
- ONNX Runtime GenAI: the default ONNX layout plus `genai_config.json` (written by every Falcon ONNX export).
- transformers.js: `onnx/model.onnx`; a multi-query Falcon config makes it feed one fused
  `past_key_values.{i}.key_value` per layer, so the graph takes K and V concatenated on the last axis.
- swift-transformers (Core ML): states `keyCache`/`valueCache` (Falcon-Mamba's conv/SSM states too, so it
  takes the stateful path), and Falcon's `causalMask` read its way: zeros, one column longer than the keys.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from perch.errors import PerchError
from perch.spec import ModelIO

DEFAULT = "default"


@dataclass(frozen=True)
class Client:
    """One client's profile. `refuses`: arch -> why that client cannot run it (said in manifest and CLI)."""

    name: str
    backend: str  # "onnx" | "coreml"
    summary: str
    refuses: dict[str, str] = field(default_factory=dict)
    coreml_states: dict[str, dict[str, str]] = field(default_factory=dict)  # arch -> kind -> state name
    mask_extra_columns: int = 0  # Core ML Falcon: causalMask columns beyond the keys (swift: 1)
    onnx_subfolder: str = ""  # where the graph goes ("onnx" for transformers.js)
    fuse_kv: bool = False  # multi-query Falcon: one past_key_values.{i}.key_value per layer
    data_file: str = "model.onnx.data"  # external-data file name in the client's convention


GENAI_NO_SSM = ("ONNX Runtime GenAI's decoder feeds only a growing K,V cache (past_key_values.N.key/value); "
                "it has no inputs for a recurrent model's conv and SSM states, so it cannot carry Falcon-Mamba's "
                "state between steps. Run this export with Perch's runtime or onnxruntime directly")
TJS_NO_MAMBA = ("transformers.js has no falcon_mamba model type (AutoModelForCausalLM refuses it: 'Unsupported "
                "model type: falcon_mamba'), and no conv/SSM cache for it")
OPTIMUM_NO_MAMBA = "optimum's ORTModelForCausalLM has no Falcon-Mamba support (no conv/SSM state handling)"

CLIENTS: dict[str, Client] = {c.name: c for c in (
    Client(DEFAULT, "any", "the backend's default layout (ONNX: optimum and ONNX Runtime GenAI read it as is)"),
    Client("optimum", "onnx", "optimum ORTModelForCausalLM: the default ONNX layout",
           refuses={"falcon_mamba": OPTIMUM_NO_MAMBA}),
    Client("genai", "onnx", "ONNX Runtime GenAI: the default ONNX layout with genai_config.json",
           refuses={"falcon_mamba": GENAI_NO_SSM}),
    Client("transformers.js", "onnx", "transformers.js: onnx/model.onnx, fused K,V for multi-query Falcon",
           refuses={"falcon_mamba": TJS_NO_MAMBA}, onnx_subfolder="onnx", fuse_kv=True,
           data_file="model.onnx_data"),
    Client("swift-transformers", "coreml", "swift-transformers LanguageModel: its state names and causalMask feed",
           coreml_states={"falcon": {"key": "keyCache", "value": "valueCache"},
                          "falcon_mamba": {"conv": "keyCache", "ssm": "valueCache"}},
           mask_extra_columns=1),
)}
# Which clients read each backend's default layout, to say in every manifest which of them can run it.
READERS = {"onnx": ("optimum", "genai", "transformers.js"), "coreml": ("swift-transformers",)}


def client(name: str | None, backend: str, arch: str) -> Client:
    """The profile `name` for an export to `backend` of `arch`; PerchError naming the fix otherwise."""
    name = name or DEFAULT
    if name not in CLIENTS:
        raise PerchError(f"--for {name!r}: choose one of {', '.join(c for c in CLIENTS if c != DEFAULT)}")
    c = CLIENTS[name]
    if c.backend not in ("any", backend):
        raise PerchError(f"--for {name} is a {c.backend} profile; export with --to {c.backend}")
    if arch in c.refuses:
        raise PerchError(f"--for {name}: {c.refuses[arch]}")
    return c


def coreml_io(c: Client, io: ModelIO) -> ModelIO:
    """Canonical states renamed to the client's Core ML state names (the naming function for Core ML)."""
    names = c.coreml_states.get(io.arch, {})
    states = tuple(dataclasses.replace(s, coreml_name=names.get(s.kind, s.coreml_name)) for s in io.states)
    return dataclasses.replace(io, states=states)


def stateful_options(c: Client, arch: str) -> dict:
    """Keyword options for the architecture's Stateful module under this profile."""
    if arch == "falcon":
        return {"extra_mask_columns": c.mask_extra_columns} if c.mask_extra_columns else {}
    names = c.coreml_states.get(arch)
    return {"state_names": (names["conv"], names["ssm"])} if names else {}


def fuses_kv(c: Client, config) -> bool:
    """transformers.js feeds `past_key_values.{i}.key_value` whenever config.json says multi_query."""
    return c.fuse_kv and bool(getattr(config, "multi_query", False))


def _layout(c: Client) -> tuple:
    return (c.coreml_states, c.mask_extra_columns, c.onnx_subfolder, c.fuse_kv)


def support(profile: Client, backend: str, arch: str) -> dict[str, str]:
    """Client -> "runs", "export with --for NAME" or "cannot run: why", for the clients of `backend`."""
    out = {}
    for name in READERS.get(backend, ()):
        why = CLIENTS[name].refuses.get(arch)
        if why:
            out[name] = f"cannot run: {why}"
        else:
            out[name] = "runs" if _layout(CLIENTS[name]) == _layout(profile) else f"export with --for {name}"
    return out


def place_onnx_files(c: Client, tmp: Path, files: list[str]) -> list[str]:
    """Move the graph (and its data) into the client's subfolder; returns the new relative paths."""
    if not c.onnx_subfolder:
        return files
    (tmp / c.onnx_subfolder).mkdir(exist_ok=True)
    moved = []
    for f in files:
        shutil.move(str(tmp / f), str(tmp / c.onnx_subfolder / f))
        moved.append(f"{c.onnx_subfolder}/{f}")
    return moved


def write_side_files(c: Client, manifest, out_dir: Path) -> list[str]:
    """The client's own files next to the model (genai_config.json, config.json's transformers.js_config)."""
    written = []
    if manifest.format == "onnx" and support(c, "onnx", manifest.arch).get("genai") == "runs":
        from perch.exporter.genai_config import write_genai_config

        written.append(write_genai_config(manifest, out_dir))
    if c.name == "transformers.js":
        written.append(_transformers_js_config(manifest, out_dir))
    return written


def _transformers_js_config(manifest, out_dir: Path) -> str:
    """transformers.js reads `transformers.js_config` in config.json: external data to fetch with the graph."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else dict(manifest.hf_config)
    tjs = config.setdefault("transformers.js_config", {})
    tjs["use_external_data_format"] = bool(manifest.extras.get("external_data"))
    path.write_text(json.dumps(config, indent=2) + "\n")
    return "config.json"



# ---------------------------------------------------------------- ONNX naming shared by every client
# optimum's dynamic axis names: transformers.js sizes the empty first cache from them (an unknown name
# becomes 0, so a batch axis not called batch_size breaks its first call), and optimum and genai read them.
OPTIMUM_AXES = {"batch": "batch_size", "sequence": "sequence_length", "context": "past_sequence_length",
                "total_sequence": "past_sequence_length + sequence_length",
                "context + sequence": "past_sequence_length + sequence_length"}


def optimum_axis_names(model) -> None:
    """Rename the graph's symbolic dimensions (every value, not only inputs) to optimum's names."""
    import onnx_ir as ir

    def renamed(shape):
        dims = [OPTIMUM_AXES.get(d.value, d.value) if isinstance(d, ir.SymbolicDim) and d.value else d for d in shape]
        return ir.Shape(dims)

    values = [*model.graph.inputs, *model.graph.outputs, *(o for node in model.graph.all_nodes() for o in node.outputs)]
    for v in values:
        if v.shape is not None and any(isinstance(d, ir.SymbolicDim) for d in v.shape):
            v.shape = renamed(v.shape)
