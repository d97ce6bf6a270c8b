"""Architecture name -> module, imported lazily. Each module exposes the same names:

`build(config, state_dict, max_context, **options) -> core`, `io_spec(config, max_context, state_dtype)`,
`PastPresent(core)` (explicit state in/out: ONNX) and `Stateful(core, batch_size, state_dtype)` (state
buffers updated in place: Core ML).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from perch.archs import detect_arch

ARCH_MODULES = {"falcon": "exporter.falcon", "falcon_mamba": "exporter.falcon_mamba"}


def arch_module(arch: str) -> ModuleType:
    return importlib.import_module(ARCH_MODULES[arch])


def module_for_config(config) -> ModuleType:
    return arch_module(detect_arch(config))
