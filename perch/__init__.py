"""Perch: export Falcon-family models to Core ML and ONNX with real state, and prove every artifact.

    from perch import export, check, open_artifact, load_checkpoint, OnnxOptions, CoreMLOptions

    export("tiiuae/falcon-7b-instruct", "out/falcon-onnx", OnnxOptions(quantize="int4"))
    report = check("out/falcon-onnx")          # fidelity against the transformers reference
    runtime = open_artifact("out/falcon-onnx") # prefill / step / state behind one API

The names load lazily, so `import perch` (or running an artifact) never imports the converters.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_FACE = {
    "export": ("perch.exporter.export", "export"),
    "ExportOptions": ("perch.exporter.options", "ExportOptions"),
    "OnnxOptions": ("perch.exporter.options", "OnnxOptions"),
    "CoreMLOptions": ("perch.exporter.options", "CoreMLOptions"),
    "options_for": ("perch.exporter.options", "options_for"),
    "check": ("perch.validate.runner", "check_artifact"),
    "open_artifact": ("perch.runtimes", "open_artifact"),
    "load_checkpoint": ("perch.loading", "load_checkpoint"),
    "PerchError": ("perch.errors", "PerchError"),
}
__all__ = [*_FACE, "__version__"]


def __getattr__(name: str):
    if name not in _FACE:
        raise AttributeError(f"module 'perch' has no attribute {name!r}")
    module, attr = _FACE[name]
    return getattr(importlib.import_module(module), attr)
