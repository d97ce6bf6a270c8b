"""What to export, one frozen options class per backend over the options they share. Checked once here.

Light on purpose (no torch, onnx or coremltools): the CLI builds its choices from these classes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from perch.errors import PerchError
from perch.exporter.quant_recipes import RECIPES

PRECISIONS = ("fp32", "fp16")
BLOCK_SIZES = (16, 32, 64, 128)
MAX_CONTEXT_LIMIT = 1 << 17


@dataclass(frozen=True)
class ExportOptions:
    """Options every backend takes. Use a backend's own class (`OnnxOptions`, `CoreMLOptions`) or
    `options_for(to, **fields)`."""

    BACKEND: ClassVar[str] = ""
    LABEL: ClassVar[str] = ""
    MODULE: ClassVar[str] = ""  # the backend module: export(ckpt, out_dir, options) and its naming function
    QUANTIZE: ClassVar[tuple[str, ...]] = ("none",)
    FLAGS: ClassVar[dict[str, str]] = {}  # field -> CLI flag, for messages that name a flag

    precision: str = "fp32"  # ONNX: weights and compute; Core ML: compute (states are always fp16)
    quantize: str = "none"
    block_size: int = 32
    max_context: int | None = None  # default: min(config.max_position_embeddings, 2048)
    profile: str = "default"  # the client the artifact is named for (see exporter/clients.py)
    calibration: str | None = None  # text file for calibrated quantization (GPTQ); None: the built-in corpus

    def __post_init__(self):
        if not self.BACKEND:
            raise PerchError("ExportOptions is the shared base: use OnnxOptions, CoreMLOptions or options_for(to, ...)")
        if self.precision not in PRECISIONS:
            raise PerchError(f"--precision {self.precision!r}: choose {' or '.join(PRECISIONS)}")
        if self.quantize not in self.QUANTIZE:
            raise PerchError(f"--quantize {self.quantize!r} is not available for {self.BACKEND}; "
                             f"choose one of {', '.join(self.QUANTIZE)}")
        if self.block_size not in BLOCK_SIZES:
            raise PerchError(f"--block-size {self.block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.max_context is not None and not 1 <= self.max_context <= MAX_CONTEXT_LIMIT:
            raise PerchError(f"--max-context {self.max_context}: must be between 1 and {MAX_CONTEXT_LIMIT}")

    def context_for(self, config) -> int:
        """The artifact's context: --max-context, refused above the model's positions; default min(its, 2048)."""
        model_max = getattr(config, "max_position_embeddings", None)
        if self.max_context is None:
            return min(model_max or 2048, 2048)
        if model_max and self.max_context > model_max:
            raise PerchError(f"--max-context {self.max_context} exceeds the model's max_position_embeddings "
                             f"({model_max}); choose at most {model_max}")
        return self.max_context


@dataclass(frozen=True)
class OnnxOptions(ExportOptions):
    BACKEND: ClassVar[str] = "onnx"
    LABEL: ClassVar[str] = "ONNX"
    MODULE: ClassVar[str] = "perch.exporter.to_onnx"
    # the recipes (exporter/quant_recipes.py) the backend's METHODS table offers: read here without onnx_ir
    QUANTIZE: ClassVar[tuple[str, ...]] = ("none", *RECIPES)
    FLAGS: ClassVar[dict[str, str]] = {"variant": "--variant"}

    variant: str = "default"  # "inplace": fixed-size K,V buffers updated by GroupQueryAttention (decode)

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in ("default", "inplace"):
            raise PerchError(f"--variant {self.variant!r}: choose default or inplace")


@dataclass(frozen=True)
class CoreMLOptions(ExportOptions):
    BACKEND: ClassVar[str] = "coreml"
    LABEL: ClassVar[str] = "Core ML"
    MODULE: ClassVar[str] = "perch.exporter.to_coreml"
    QUANTIZE: ClassVar[tuple[str, ...]] = ("none", *RECIPES, "palettize4")
    FLAGS: ClassVar[dict[str, str]] = {"multifunction": "--multifunction", "batch_size": "--batch-size",
                                       "pieced": "--pieced"}

    multifunction: bool = False  # prefill + decode functions sharing weights and state
    batch_size: int = 1  # Core ML states have a fixed batch
    pieced: bool | None = None  # convert layer by layer and join (exporter/coreml_pieces.py); None: when large

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise PerchError(f"--batch-size {self.batch_size}: must be at least 1")


# The backend registry: name -> options class (which names its module). `--to` choices come from here.
OPTIONS = {cls.BACKEND: cls for cls in (OnnxOptions, CoreMLOptions)}


def options_for(to: str, **values) -> ExportOptions:
    """The options class of backend `to`, refusing (by flag) any option that belongs to another backend."""
    if to not in OPTIONS:
        raise PerchError(f"--to {to!r}: choose one of {', '.join(OPTIONS)}")
    cls = OPTIONS[to]
    own = {f.name for f in fields(cls)}
    for name, value in values.items():
        if name in own:
            continue
        other = next((c for c in OPTIONS.values() if name in {f.name for f in fields(c)}), None)
        if other is None:
            raise PerchError(f"unknown export option {name!r}")
        if value != next(f.default for f in fields(other) if f.name == name):
            raise PerchError(f"{other.FLAGS.get(name, name)} applies to {other.LABEL} exports only (--to {other.BACKEND})")
    return cls(**{k: v for k, v in values.items() if k in own})
