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
from pathlib import Path

from perch.errors import PerchError
from perch.exporter.options import OPTIONS, CoreMLOptions, ExportOptions, OnnxOptions, options_for  # noqa: F401
from perch.loading import Checkpoint, load_checkpoint
from perch.dev.presets import resolve_model
from perch.spec import Manifest

# backend name -> module; each exposes `export(ckpt, out_dir, options) -> Manifest` and `bindings(io, profile)`.
BACKENDS = {name: cls.MODULE for name, cls in OPTIONS.items()}
# What a runtime needs next to the model: the tokenizer and the HF config (generation settings included).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "config.json", "generation_config.json")


def export(model: str | Path | Checkpoint, out: str | Path, options: ExportOptions, *, adapter: str | Path | None = None,
           allow_pickle: bool = False, overwrite: bool = False) -> Manifest:
    """Export `model` (a directory, a cached hub id, a preset name, or a loaded Checkpoint) into `out`.

    `options` is a backend's options (`OnnxOptions`, `CoreMLOptions`, or `options_for(to, ...)`): it names
    the backend.
    """
    if not isinstance(options, ExportOptions) or options.BACKEND not in BACKENDS:
        raise PerchError("export() needs OnnxOptions or CoreMLOptions (perch.exporter.options.options_for(to, ...))")
    out = Path(out)
    check_output(out, overwrite)
    if not isinstance(model, Checkpoint):
        # Stored dtype (dtype=None): backends cast tensor by tensor, so a bf16 7B never gets an fp32 copy.
        model = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter, dtype=None)
    ckpt = model
    from perch.exporter import clients

    clients.client(options.profile, options.BACKEND, ckpt.arch)  # refuse a client that cannot run it, before any work
    backend = importlib.import_module(BACKENDS[options.BACKEND])
    with staged_output(out, overwrite) as tmp:
        manifest = backend.export(ckpt, tmp, options)
        manifest.tokenizer_files = copy_side_files(ckpt.model_dir, tmp)
        manifest.extras["client_files"] = clients.write_side_files(manifest, tmp)
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
