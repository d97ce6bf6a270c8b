"""`export()`: the one entry point for every backend. Checks and locks the destination, loads, converts into
a temporary directory next to it, writes the manifest and tokenizer files, and moves the result into place
only when complete (perch.staging), so a failed or killed export leaves nothing half-written behind.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from perch.errors import PerchError
from perch.exporter.options import OPTIONS, CoreMLOptions, ExportOptions, OnnxOptions, options_for  # noqa: F401
from perch.loading import Checkpoint, load_checkpoint
from perch.dev.presets import resolve_model
from perch.spec import Manifest
from perch.staging import staged_dir

# backend name -> module; each exposes `export(ckpt, out_dir, options) -> Manifest` and `bindings(io, profile)`.
BACKENDS = {name: cls.MODULE for name, cls in OPTIONS.items()}
# What a runtime needs next to the model: the tokenizer and the HF config (generation settings included).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "config.json", "generation_config.json")


def export(model: str | Path | Checkpoint, out: str | Path, options: ExportOptions, *, adapter: str | Path | None = None,
           allow_pickle: bool = False, overwrite: bool = False) -> Manifest:
    """Export `model` (a directory, a cached hub id, a preset name, or a loaded Checkpoint) into `out`.

    `options` is a backend's options (`OnnxOptions`, `CoreMLOptions`, or `options_for(to, ...)`): it names
    the backend. `out` is checked (exists? writable? a Perch artifact if --overwrite?) and locked before
    the checkpoint loads, and is written through `perch.staging.staged_dir`: complete, or not at all.
    """
    if not isinstance(options, ExportOptions) or options.BACKEND not in BACKENDS:
        raise PerchError("export() needs OnnxOptions or CoreMLOptions (perch.exporter.options.options_for(to, ...))")
    from perch.exporter import clients

    with staged_dir(Path(out), overwrite=overwrite) as tmp:
        ckpt = model
        if not isinstance(model, Checkpoint):
            # Stored dtype (dtype=None): backends cast tensor by tensor, so a bf16 7B never gets an fp32 copy.
            ckpt = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter, dtype=None)
        clients.client(options.profile, options.BACKEND, ckpt.arch)  # refuse a client that cannot run it
        options.context_for(ckpt.config)  # refuses --max-context beyond the model's positions, before the work
        check_tokenizer(ckpt.model_dir, ckpt.config.vocab_size)
        backend = importlib.import_module(BACKENDS[options.BACKEND])
        manifest = backend.export(ckpt, tmp, options)
        manifest.tokenizer_files = copy_side_files(ckpt.model_dir, tmp)
        manifest.extras["client_files"] = clients.write_side_files(manifest, tmp)
        manifest.source = {**ckpt.source, **manifest.source}
        manifest.save(tmp)
    return manifest


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
