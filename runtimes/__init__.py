"""Runtimes: run a model or an exported artifact behind one step API. Never imports `exporter`."""
from __future__ import annotations

from pathlib import Path

from perch.errors import PerchError
from perch.spec import Manifest


def open_artifact(path: str | Path, *, device: str = "cpu", manifest: Manifest | None = None, **options):
    """A Runtime for a directory written by `perch export`, chosen by its manifest's format.

    The manifest is read once (or taken as given) and handed to the runtime.
    """
    manifest = manifest or Manifest.load(path)
    if manifest.format == "onnx":
        from perch.runtimes.onnxrt import OnnxRuntime

        return OnnxRuntime(path, device=device, manifest=manifest, **options)
    if manifest.format == "coreml":
        from perch.runtimes.coreml import CoreMLRuntime

        return CoreMLRuntime(path, manifest=manifest, **options)
    raise PerchError(f"{path}: manifest format {manifest.format!r} is not one Perch runs (onnx, coreml)")
