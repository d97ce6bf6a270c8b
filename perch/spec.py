"""Inputs, outputs and states declared once, as data, and the artifact manifest built from them.

An architecture module returns a `ModelIO`; every backend reads it: ONNX names and dynamic axes, Core ML
`TensorType`/`StateType`, example inputs, and `manifest.json`, which is all a runtime needs (no model code).
Shapes hold ints for fixed sizes and strings for named axes ("batch", "sequence", "context", ...).
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
MANIFEST_SCHEMA_VERSION = 1
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
    """One state tensor per layer, e.g. a layer's key cache or SSM state.

    `shape` is per layer; the axis named "context" is the cache length (grows to `max_context`).
    Backend names: `onnx_input`/`onnx_output` are templates with `{i}` for the layer; `coreml_name` is
    the layer-stacked Core ML state (layers first).
    """

    kind: str
    shape: Shape
    dtype: str
    num_layers: int
    onnx_input: str
    onnx_output: str
    coreml_name: str

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


@dataclass(frozen=True)
class ModelIO:
    """What an exported model takes, returns and keeps between calls."""

    arch: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]

    def state(self, kind: str) -> StateSpec:
        for s in self.states:
            if s.kind == kind:
                return s
        raise KeyError(kind)

    def state_layer_names(self) -> list[str]:
        """Canonical per-layer names ("key.0", "value.0", ...), layer-major like the ONNX inputs."""
        n = self.states[0].num_layers if self.states else 0
        return [f"{s.kind}.{i}" for i in range(n) for s in self.states]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelIO:
        return cls(
            d["arch"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            tuple(StateSpec.from_dict(s) for s in d["states"]),
        )


@dataclass
class Manifest:
    """`manifest.json`: everything a runtime or `perch check` needs to use an artifact."""

    format: str  # "onnx" | "coreml"
    arch: str
    io: ModelIO
    hf_config: dict[str, Any]
    max_context: int
    dtype: str  # weights/compute precision of the artifact: "fp32" | "fp16"
    quantization: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    model_file: str = ""
    tokenizer_files: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # model path/id, preset, adapter
    extras: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (variant, opset, ...)
    perch_version: str = __version__
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["io"] = self.io.to_dict()
        return d

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
            d["io"] = ModelIO.from_dict(d["io"])
            if d.get("schema_version", 0) > MANIFEST_SCHEMA_VERSION:
                raise PerchError(f"{path}: manifest schema {d['schema_version']} is newer than this Perch; upgrade perch")
            return cls(**d)
        except PerchError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PerchError(f"{path}: corrupt manifest ({type(e).__name__}: {e}); re-export the model") from e
