"""What `perch check ARTIFACT` opens before comparing: the artifact's runtime, the reference, the prompts.

Every input problem raises PerchError (exit 2) naming the fix: no manifest, no reference recorded, an
unreadable prompts file, a prompt too long for the artifact, a reference of another architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from perch.errors import PerchError
from perch.spec import Manifest
from perch.validate.tolerances import Tolerances, precision_of, tolerance_for

# English prompts on the tiny tokenizer's corpus (Python's help text), so trained fixtures see familiar text.
DEFAULT_PROMPTS = (
    "The for statement is used to iterate over the elements of a sequence",
    "A function definition defines a user-defined function object.",
    "Once upon a time, in a small village by the sea, there lived",
)
REFERENCE_DTYPES = ("float32", "float16", "bfloat16", "bnb8", "bnb4")


@dataclass
class CheckSession:
    """The opened pieces of one check; `close()` releases both runtimes."""

    manifest: Manifest
    artifact: object  # perch.runtimes.base.Runtime
    reference: object
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    tolerances: Tolerances
    checkpoint: object | None  # perch.loading.Checkpoint behind the reference (for --bisect)
    artifact_info: dict = field(default_factory=dict)
    reference_info: dict = field(default_factory=dict)

    def close(self) -> None:
        for rt in (self.artifact, self.reference):
            rt.close()


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file: a JSON list of strings (.json) or one prompt per non-empty line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PerchError(f"--prompts {p}: cannot read it ({e}); pass a UTF-8 text file, one prompt per line") from None
    if p.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as e:
            raise PerchError(f"--prompts {p}: not valid JSON ({e}); write a list of strings") from None
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise PerchError(f"--prompts {p}: expected a JSON list of strings")
    else:
        prompts = [line.rstrip("\r\n") for line in text.splitlines()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise PerchError(f"--prompts {p} holds no prompts; write one prompt per line")
    return prompts


def tokenize(texts: list[str], dirs: list[Path], vocab_size: int, max_len: int) -> list[list[int]]:
    """Token ids with the first directory's tokenizer that loads (the artifact's, then the reference's)."""
    from transformers import AutoTokenizer

    tok, errors = None, []
    for d in dirs:
        try:
            tok = AutoTokenizer.from_pretrained(str(d))
            break
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{d}: {type(e).__name__}")
    if tok is None:
        raise PerchError(f"no tokenizer found ({'; '.join(errors)}); re-export the artifact so it carries its "
                         "tokenizer files, or pass --reference with a model directory that has them")
    out = []
    for i, text in enumerate(texts):
        ids = [int(x) for x in tok(text, add_special_tokens=False)["input_ids"]]
        if not ids:
            raise PerchError(f"prompt {i} ({text[:40]!r}) tokenizes to nothing; give it some text")
        if max(ids) >= vocab_size:
            raise PerchError(f"prompt {i}: token id {max(ids)} is outside the model's vocabulary ({vocab_size}); "
                             "the tokenizer does not belong to this model")
        if len(ids) > max_len:
            raise PerchError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens the artifact holds at most "
                             f"{max_len} prompt tokens: shorten it or lower --max-new-tokens")
        out.append(ids)
    return out


def reference_source(manifest: Manifest, reference: str | None) -> tuple[str, str | None]:
    """(model to load, adapter) for the reference: `reference`, else the manifest's recorded source."""
    src = manifest.source or {}
    if reference is not None:
        return reference, None
    path, model = src.get("path"), src.get("model") or src.get("preset")
    if path and Path(path).is_dir():
        return path, src.get("adapter")
    if model:
        return model, src.get("adapter")
    raise PerchError("the artifact's manifest records no source model; pass --reference MODEL "
                     "(a checkpoint directory, a cached hub id or a preset name)")


def open_reference(model: str, adapter: str | None, *, device: str, reference_dtype: str, max_context: int,
                   allow_pickle: bool = False):
    """(reference runtime, its checkpoint, description). On CUDA, the fast path (runtimes/pytorch/fast.py)."""
    import torch

    from perch.loading import load_checkpoint
    from perch.dev.presets import resolve_model

    if reference_dtype not in REFERENCE_DTYPES:
        raise PerchError(f"--reference-dtype {reference_dtype!r}: choose one of {', '.join(REFERENCE_DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise PerchError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise PerchError("--device cuda but torch sees no CUDA device; run on a GPU machine or use --device cpu")
    load_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(reference_dtype, torch.float32)
    ckpt = load_checkpoint(resolve_model(model), allow_pickle=allow_pickle, adapter=adapter, dtype=load_dtype)
    info = {"model": str(model), "path": str(ckpt.model_dir), "device": device, "dtype": reference_dtype}
    if reference_dtype in ("bnb8", "bnb4"):
        from perch.runtimes.pytorch.fast import bnb_reference

        rt = bnb_reference(ckpt, bits=8 if reference_dtype == "bnb8" else 4, max_context=max_context)
    elif device == "cuda":
        from perch.runtimes.pytorch.fast import open_gpu_reference

        rt = open_gpu_reference(ckpt, dtype=load_dtype, max_context=max_context)
    else:
        from perch.runtimes.pytorch.reference import ReferenceRuntime

        rt = ReferenceRuntime(ckpt, device=device, dtype=load_dtype, max_context=max_context)
    info["runtime"] = rt.name
    return rt, ckpt, info


def open_check(path: str | Path, *, reference: str | None, prompts: str | Path | None, max_new_tokens: int,
               device: str, reference_dtype: str, tolerances: Tolerances | None) -> CheckSession:
    """Open everything `check()` needs for the artifact at `path`, failing early with PerchError."""
    from perch.runtimes import open_artifact

    if max_new_tokens < 1:
        raise PerchError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    manifest = Manifest.load(path)
    texts = load_prompts(prompts)
    tol = tolerances or tolerance_for(manifest, reference_dtype)
    model, adapter = reference_source(manifest, reference)
    pickle_ok = (manifest.source or {}).get("format") == "pickle"  # the exporter already trusted it; weights_only load
    ref, ckpt, ref_info = open_reference(model, adapter, device=device, reference_dtype=reference_dtype,
                                         max_context=manifest.max_context, allow_pickle=pickle_ok)
    try:
        vocab = ckpt.config.vocab_size
        if ckpt.arch != manifest.arch or vocab != manifest.hf_config.get("vocab_size", vocab):
            raise PerchError(f"reference {model} is a {ckpt.arch} model with vocabulary {vocab}, but the artifact is "
                             f"{manifest.arch} with {manifest.hf_config.get('vocab_size')}: pass the --reference it "
                             "was exported from")
        ids = tokenize(texts, [Path(path), ckpt.model_dir], vocab, manifest.max_context - max_new_tokens)
        art = open_artifact(path, device=device, manifest=manifest)
    except BaseException:
        ref.close()
        raise
    quant = (manifest.quantization or {}).get("method", "none")
    art_info = {"path": str(path), "format": manifest.format, "arch": manifest.arch, "dtype": manifest.dtype,
                "precision": precision_of(manifest), "quantization": quant,
                "max_context": manifest.max_context, "runtime": getattr(art, "name", manifest.format)}
    return CheckSession(manifest, art, ref, ids, texts, tol, ckpt, art_info, ref_info)
