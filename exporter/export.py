"""`export()`: the one entry point for every backend. Loads, converts into a temporary directory next to
the destination, writes the manifest and tokenizer files, and moves the result into place only when
complete, so a failed export leaves nothing half-written behind.
"""
from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from perch.errors import PerchError
from perch.loading import Checkpoint, load_checkpoint
from perch.dev.presets import resolve_model
from perch.spec import Manifest

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
    client: str = "default"  # client profile (exporter/clients.py): names and layout a real client reads

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
    """Export `model` (a directory, a cached hub id, a preset name, or a loaded Checkpoint) into `out`."""
    out = Path(out)
    check_output(out, overwrite)
    if not isinstance(model, Checkpoint):
        # Stored dtype (dtype=None): backends cast tensor by tensor, so a bf16 7B never gets an fp32 copy.
        model = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter, dtype=None)
    ckpt = model
    from perch.exporter import clients

    profile = clients.client(options.client, options.to, ckpt.arch)  # refuse before any slow work
    backend = importlib.import_module(BACKENDS[options.to])
    with staged_output(out, overwrite) as tmp:
        manifest = backend.export(ckpt, tmp, options)
        manifest.tokenizer_files = copy_side_files(ckpt.model_dir, tmp)
        manifest.extras["client_files"] = clients.write_side_files(profile, manifest, tmp)
        manifest.source = {**ckpt.source, **manifest.source}
        manifest.save(tmp)
    return manifest


def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse an existing destination before any slow work starts."""
    if out.exists() and not (overwrite and out.is_dir()):
        raise PerchError(f"output directory {out} already exists; choose a new --out or remove it first")


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out` that becomes `out` only when the block completes; removed otherwise."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(model_dir: Path, dest: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, dest / name)
            copied.append(name)
    return [n for n in copied if n not in ("config.json", "generation_config.json")]
