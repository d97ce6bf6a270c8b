"""The architectures Perch exports: one module per architecture, one registry, one typed protocol.

An architecture module (perch/archs/<model_type>.py) holds everything about its architecture and nothing
about backends: its HF names, the config check that refuses what it does not implement, weight quirks, the
export-ready torch module with its cache policy as a hook, and its I/O spec per front-end (canonical names,
named axes, the mask contract) from which every backend derives its own names. Adding an architecture means
adding its module and one line to `ARCH_MODULES`.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from perch.errors import UnsupportedModel

# name -> module. The name is Perch's architecture name, recorded in every manifest.
ARCH_MODULES = {"falcon": "perch.archs.falcon", "falcon_mamba": "perch.archs.falcon_mamba", "falcon_h1": "perch.archs.falcon_h1"}
FRONTENDS = ("past_present", "stateful", "inplace")
_NOT_SUPPORTED_NOTE = "ALiBi Falcon checkpoints (falcon-rw-1b/7b), RoPE scaling, GPTQ/AWQ-quantized checkpoints"


@runtime_checkable
class Architecture(Protocol):
    """What every architecture module provides (checked for each registered module by the tests)."""

    NAME: str
    HF_MODEL_TYPES: tuple[str, ...]  # config.json model_type values it accepts (legacy names included)
    HF_ARCHITECTURES: tuple[str, ...]  # causal-LM class names; the first is what presets save
    HF_CONFIG: str  # the transformers config class name
    DESCRIPTION: str
    VARIANTS: tuple[str, ...]
    PREFIX: str  # the base model's attribute in the causal-LM class ("transformer", "backbone")
    EMBEDDING: str  # state-dict key of the token embedding (tied heads, quantizers)
    FRONTENDS: tuple[str, ...]  # which of FRONTENDS its module offers
    STATE_HOLDS: dict[str, str]  # state kind -> what it holds, written into manifests for clients
    TOLERANCES: dict[str, dict]  # precision -> limits looser than the defaults (with the measurement why)
    # config.json keys that size the weights: the loader refuses a config without them (transformers would
    # fill in its defaults). Required, not defaulted: a module that forgets it must fail the protocol test.
    REQUIRED_FIELDS: tuple[str, ...]
    # Optional, read with a default: FP32_MODULES (module class names whose ops Core ML fp16 compute keeps fp32, e.g. norms that square).

    def check_config(self, config) -> None: ...
    def translate_config(self, raw: dict) -> dict: ...
    def build(self, config, state_dict: dict, max_context: int, scan: str = "loop") -> Any: ...
    def io_spec(self, config, max_context: int, frontend: str = "past_present", state_dtype: str = "float32"): ...
    def past_present(self, core) -> Any: ...
    def stateful(self, core, batch_size: int, state_dtype, names: dict[str, str], mask: str = ...) -> Any: ...
    def reference_forward(self, model, cache, ids, mask, positions) -> tuple[Any, Any]: ...
    def reference_state(self, cache, config) -> dict: ...


def arch_module(arch: str) -> ModuleType:
    """The module of a registered architecture (imported on first use: torch loads only when needed)."""
    if arch not in ARCH_MODULES:
        raise UnsupportedModel(f"not supported: architecture {arch!r}. Perch exports: {', '.join(ARCH_MODULES)}")
    return importlib.import_module(ARCH_MODULES[arch])


def all_archs() -> dict[str, ModuleType]:
    return {name: arch_module(name) for name in ARCH_MODULES}


def _supported_names() -> str:
    return ", ".join(f"{a} ({', '.join(m.HF_MODEL_TYPES)})" for a, m in all_archs().items())


def unsupported(what: str) -> UnsupportedModel:
    """The one refusal message: what is not supported, and what Perch does export."""
    return UnsupportedModel(
        f"not supported: {what}. Perch exports: {_supported_names()}; `perch export --list` lists them."
    )


def arch_for_model_type(model_type: str | None) -> ModuleType | None:
    return next((m for m in all_archs().values() if model_type in m.HF_MODEL_TYPES), None)


def translate_config(raw: dict) -> dict:
    """A raw config.json dict with legacy names mapped by its architecture (e.g. Falcon's RefinedWeb)."""
    mod = arch_for_model_type(raw.get("model_type"))
    return mod.translate_config(raw) if mod is not None else raw


def detect_arch(config) -> str:
    """The Perch architecture name for a transformers config, or UnsupportedModel ("not supported: ...").

    Matched on `model_type`, then (when a config has none) on `architectures`; then the architecture's
    own check refuses every field or value it does not implement.
    """
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    mod = arch_for_model_type(model_type)
    if mod is None and not model_type:  # a config without model_type: trust its architectures
        mod = next((m for m in all_archs().values() if set(architectures) & set(m.HF_ARCHITECTURES)), None)
    if mod is None:
        raise unsupported(f"model_type {model_type!r} (architectures {architectures or 'unset'})")
    if architectures and not set(architectures) & set(mod.HF_ARCHITECTURES):
        raise unsupported(f"{', '.join(architectures)}: Perch exports causal language models "
                          f"({', '.join(mod.HF_ARCHITECTURES)})")
    check_quantization(config)
    check_rope(config)
    mod.check_config(config)
    return mod.NAME


def check_quantization(config) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers keeps an enum on config objects
    if method not in (None, "bitsandbytes"):
        raise unsupported(f"{method}-quantized checkpoint (only bitsandbytes 4/8-bit is dequantized); "
                          "export from the unquantized model instead")


def check_rope(config) -> None:
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_scaling`.
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if not isinstance(params, dict):
            continue
        kind = params.get("rope_type", params.get("type"))
        if kind not in (None, "default"):
            raise unsupported(f"RoPE scaling {kind!r} ({attr}={params}); only default rotary embeddings export")


def describe_supported() -> str:
    """The text `perch export --list` prints: each architecture, its HF names and its variants."""
    lines = ["Architectures Perch exports (matched on config.json's model_type, then architectures):", ""]
    for name, m in all_archs().items():
        lines += [
            f"{name}: {m.DESCRIPTION}",
            f"  model_type:    {', '.join(m.HF_MODEL_TYPES)}",
            f"  architectures: {', '.join(m.HF_ARCHITECTURES)}",
            *(f"  variant:       {v}" for v in m.VARIANTS),
            "",
        ]
    lines.append(f"Not supported: {_NOT_SUPPORTED_NOTE}.")
    return "\n".join(lines)
