"""`export()`: the one entry point for every backend. Checks and locks the destination, loads, converts into
a temporary directory next to it, writes the manifest and tokenizer files, and moves the result into place
only when complete (perch.staging), so a failed or killed export leaves nothing half-written behind.
"""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from perch.errors import PerchError
from perch.loading import Checkpoint, load_checkpoint
from perch.dev.presets import resolve_model
from perch.spec import Manifest
from perch.staging import staged_dir

BACKENDS = {"onnx": "perch.exporter.to_onnx", "coreml": "perch.exporter.to_coreml"}
QUANTIZE = {"onnx": ("none", "int8", "int4"), "coreml": ("none", "int8", "int4", "palettize4")}
# What a runtime needs next to the model: the tokenizer and the HF config (generation settings included).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "config.json", "generation_config.json")


@dataclass(frozen=True)
class ExportOptions:
    """What to export. Checked once here, so backends can trust it."""

    to: str
    dtype: str = "fp32"  # ONNX weights/compute; Core ML compute precision
    quantize: str = "none"
    block_size: int = 32
    max_context: int | None = None  # default: min(config.max_position_embeddings, 2048)
    variant: str = "default"  # ONNX "inplace": fixed-size cache buffer for fast decode (--optimize)
    multifunction: bool = False  # Core ML: prefill + decode functions sharing weights and state
    batch_size: int = 1  # Core ML states have a fixed batch

    def __post_init__(self):
        if self.to not in BACKENDS:
            raise PerchError(f"--to {self.to!r}: choose one of {', '.join(BACKENDS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise PerchError(f"--dtype {self.dtype!r}: choose fp32 or fp16")
        if self.quantize not in QUANTIZE[self.to]:
            raise PerchError(f"--quantize {self.quantize!r} is not available for {self.to}; choose one of {', '.join(QUANTIZE[self.to])}")
        if self.block_size not in (16, 32, 64, 128):
            raise PerchError(f"--block-size {self.block_size}: choose 16, 32, 64 or 128")
        if self.max_context is not None and not 1 <= self.max_context <= 1 << 17:
            raise PerchError(f"--max-context {self.max_context}: must be between 1 and 131072")
        if self.variant not in ("default", "inplace"):
            raise PerchError(f"variant {self.variant!r}: choose default or inplace")
        if self.multifunction and self.to != "coreml":
            raise PerchError("--multifunction applies to Core ML exports only")

    def context_for(self, config) -> int:
        return self.max_context or min(getattr(config, "max_position_embeddings", 2048) or 2048, 2048)


def export(model: str | Path | Checkpoint, out: str | Path, options: ExportOptions, *, adapter: str | Path | None = None,
           allow_pickle: bool = False, overwrite: bool = False) -> Manifest:
    """Export `model` (a directory, a cached hub id, a preset name, or a loaded Checkpoint) into `out`.

    `out` is checked (exists? writable? a Perch artifact if --overwrite?) and locked before the checkpoint
    loads, and is written through `perch.staging.staged_dir`: complete, or not at all.
    """
    out = Path(out)
    with staged_dir(out, overwrite=overwrite) as tmp:
        ckpt = model
        if not isinstance(model, Checkpoint):
            # Stored dtype (dtype=None): backends cast tensor by tensor, so a bf16 7B never gets an fp32 copy.
            ckpt = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter, dtype=None)
        check_context(ckpt.config, options)
        check_tokenizer(ckpt.model_dir, ckpt.config.vocab_size)
        backend = importlib.import_module(BACKENDS[options.to])
        manifest = backend.export(ckpt, tmp, options)
        manifest.tokenizer_files = copy_side_files(ckpt.model_dir, tmp)
        manifest.source = {**ckpt.source, **manifest.source}
        manifest.save(tmp)
    return manifest


def check_context(config, options: ExportOptions) -> None:
    """--max-context beyond the positions the model was trained for gives garbage past that point: refuse."""
    limit = getattr(config, "max_position_embeddings", None)
    if options.max_context is not None and limit and options.max_context > limit:
        raise PerchError(f"--max-context {options.max_context} exceeds the model's max_position_embeddings "
                         f"({limit}); choose --max-context {limit} or less")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A tokenizer that is shipped must load and fit the model's vocabulary; none at all is allowed (the CLI
    warns: the artifact then runs with token ids only). Checked before the slow work starts."""
    if not any((Path(model_dir) / n).is_file() for n in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        n = len(tok)
    except Exception as e:  # tokenizers and transformers raise many types for one cause: a bad file
        raise PerchError(f"the tokenizer files in {model_dir} do not load ({type(e).__name__}: {str(e)[:200]}); "
                         "restore them from the model's source, or delete them to export without a tokenizer") from e
    if n > vocab_size:
        raise PerchError(f"the tokenizer in {model_dir} has {n} tokens but the model's vocab_size is {vocab_size}: "
                         "it belongs to another model; use the tokenizer saved with these weights")


def describe_quantization(q: dict) -> str:
    """One line for the CLI: how many weight matrices were quantized, and why the others were not."""
    method = q.get("method", "none")
    if method in (None, "none"):
        return "none"
    if "quantized" in q:  # ONNX: names done, name -> reason kept
        kept = {k: v for k, v in (q.get("not_quantized") or {}).items() if k != "1-D tensors"}
        done, reasons = len(q["quantized"]), {}
        for why in kept.values():
            reasons[why] = reasons.get(why, 0) + 1
    else:  # Core ML: counts by reason
        done = int((q.get("compressed") or {}).get("tensors", 0))
        reasons = {why: int(e.get("tensors", 0)) for why, e in (q.get("left_alone") or {}).items()
                   if "norm" not in why}
    kept = sum(reasons.values())
    line = f"{method}: {done} of {done + kept} weight matrices quantized"
    if kept:
        line += f"; {kept} kept in float: " + "; ".join(f"{n} because {why}" for why, n in reasons.items())
    return line


def copy_side_files(model_dir: Path, dest: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, dest / name)
            copied.append(name)
    return [n for n in copied if n not in ("config.json", "generation_config.json")]
