"""Inputs, outputs and states declared once, as data, and the artifact manifest built from them.

An architecture module returns a `ModelIO` under canonical names; each backend's naming function turns it
into `Binding`s (ONNX names and dynamic axes, Core ML inputs and states), and `manifest.json` stores both:
all a runtime needs (no model code). Shapes hold ints for fixed sizes and strings for named axes
("batch", "sequence", "total_sequence", "context").
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from perch import __version__
from perch.errors import PerchError
from perch.manifest_paths import check_manifest_paths

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 2
Shape = tuple[int | str, ...]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Shape
    dtype: str  # numpy dtype name: "int64", "float32", "float16"

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class StateSpec:
    """One state tensor per layer, e.g. a layer's key cache or SSM state, under its canonical kind.

    `shape` is per layer; the axis named "context" is the cache length (grows to `max_context`); a buffer
    front-end fixes it to `max_context`, and `cache_axis` says which axis it is either way, so a runtime can
    cut a buffer to the tokens stored. Backends name states themselves (see `Binding`); `holds` says what.
    """

    kind: str  # "key", "value", "conv", "ssm", ...
    shape: Shape
    dtype: str
    num_layers: int
    holds: str = ""
    cache_axis: int | None = None  # the axis that fills one position per token (K,V); None: fixed-size state

    def layer_names(self) -> list[str]:
        return [f"{self.kind}.{i}" for i in range(self.num_layers)]

    def concrete_shape(self, batch: int, context: int) -> tuple[int, ...]:
        sizes = {"batch": batch, "context": context}
        return tuple(sizes[a] if isinstance(a, str) else a for a in self.shape)

    @classmethod
    def from_dict(cls, d: dict) -> StateSpec:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


# The "masked" value of an additive mask: exp() underflows to 0, and fp16 (max 65504) adds it safely.
MASK_MIN = -1.0e4
# An ONNX export's optional input (an overridable initializer, default 0 = every position): a prefill that
# needs the last position's logits feeds 1 and skips the lm_head elsewhere (exporter/onnx_logits.py).
LOGITS_TO_KEEP = "logits_to_keep"
# How each front-end is told which positions a call covers and which keys it may see. Runtimes build the
# mask input from the running 0/1 key mask by this contract (perch.runtimes.base.model_inputs).
MASK_CONTRACTS = {
    "keys": "attention_mask (batch, total_sequence) int64, 1 for every stored and new token, 0 for left padding",
    "new": "attention_mask (batch, sequence) int64 over the new tokens only (the state carries the past)",
    "additive": "causal_mask (batch, 1, sequence, total_sequence) additive (0 attend, -1e4 masked); the new "
                "tokens sit at positions total-T..total-1, so its length places them",
    "none": "no mask input: every call continues from the stored state, no padding",
    "additive_plus_one": "causal_mask (batch, 1, 1 or sequence, total_sequence + 1) as swift-transformers sends "
                         "it: zeros, one column longer than the keys; causality is applied inside, the mask only "
                         "adds (padding) on top, and its last column is unused",
}


@dataclass(frozen=True)
class ModelIO:
    """What an exported model takes, returns and keeps between calls, under canonical names.

    Canonical inputs: input_ids, attention_mask, position_ids, causal_mask; output: logits; states by kind.
    `frontend` is the cache policy the module was built with; `mask` one of MASK_CONTRACTS.
    """

    arch: str
    frontend: str
    mask: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]

    def state(self, kind: str) -> StateSpec:
        for s in self.states:
            if s.kind == kind:
                return s
        raise KeyError(kind)

    @property
    def num_layers(self) -> int:
        return self.states[0].num_layers if self.states else 0

    def state_layer_names(self) -> list[str]:
        """Canonical per-layer names ("key.0", "value.0", ...), layer-major like the ONNX inputs."""
        return [f"{s.kind}.{i}" for i in range(self.num_layers) for s in self.states]

    def has_growing_cache(self) -> bool:
        return any("context" in s.shape for s in self.states)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelIO:
        return cls(
            d["arch"], d["frontend"], d["mask"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            tuple(StateSpec.from_dict(s) for s in d["states"]),
        )


ROLES = ("input", "output", "past", "present", "state")


@dataclass(frozen=True)
class Binding:
    """One realised backend tensor: its canonical name, the name the backend gave it, shape and dtype.

    Roles: "input"/"output" (canonical inputs/outputs), "past"/"present" (per-layer state fed and returned:
    ONNX), "state" (layer-stacked state kept by the runtime: Core ML). A backend's naming function writes
    these; runtimes read names only from here.
    """

    canonical: str
    name: str
    role: str
    shape: Shape
    dtype: str

    @classmethod
    def from_dict(cls, d: dict) -> Binding:
        return cls(d["canonical"], d["name"], d["role"], tuple(d["shape"]), d["dtype"])


@dataclass
class Manifest:
    """`manifest.json`: everything a runtime or `perch check` needs to use an artifact."""

    format: str  # "onnx" | "coreml"
    arch: str
    io: ModelIO
    hf_config: dict[str, Any]
    max_context: int
    dtype: str  # weights/compute precision of the artifact: "fp32" | "fp16"
    bindings: tuple[Binding, ...] = ()
    variant: str = "default"  # ONNX: "default" | "inplace"
    profile: str = "default"  # the client the names and side files were written for
    batch_size: int | None = None  # fixed batch of the states (Core ML); None: any
    functions: dict[str, int | str] = field(default_factory=lambda: {"main": "ranged"})  # Core ML: query length
    quantization: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    model_file: str = ""
    files: list[str] = field(default_factory=list)  # every file of the model proper (external data included)
    model_bytes: int | None = None  # their total size, so a truncated copy is caught before loading
    tokenizer_files: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # model path/id, preset, adapter
    extras: dict[str, Any] = field(default_factory=dict)  # informational facts (opset, timings); never read back
    perch_version: str = __version__
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["io"] = self.io.to_dict()
        return d

    def names(self, role: str) -> dict[str, str]:
        """Canonical name -> backend name for one role, in the order the backend declared them."""
        return {b.canonical: b.name for b in self.bindings if b.role == role}

    def binding(self, role: str, canonical: str) -> Binding:
        for b in self.bindings:
            if b.role == role and b.canonical == canonical:
                return b
        raise PerchError(f"the manifest binds no {role} {canonical!r}; re-export with this Perch")

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise PerchError(f"{directory}: no {MANIFEST_NAME}; is this a directory written by `perch export`?")
        try:
            d = json.loads(path.read_text())
            check_manifest_paths(directory, d)
            if d.get("schema_version", 0) > MANIFEST_SCHEMA_VERSION:
                raise PerchError(f"{path}: manifest schema {d['schema_version']} is newer than this Perch; upgrade perch")
            if d.get("schema_version", 0) < MANIFEST_SCHEMA_VERSION:
                raise PerchError(f"{path}: manifest schema {d.get('schema_version')} was written by an older Perch; "
                                 "re-export the model with this one")
            d["io"] = ModelIO.from_dict(d["io"])
            d["bindings"] = tuple(Binding.from_dict(b) for b in d.get("bindings", ()))
            return cls(**d)
        except PerchError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PerchError(f"{path}: corrupt manifest ({type(e).__name__}: {e}); re-export the model") from e
