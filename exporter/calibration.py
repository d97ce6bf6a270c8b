"""Calibration statistics for GPTQ: the input Hessian X^T X of every linear layer, by checkpoint weight name.

The text is a user's file (`--calibration FILE`) or, by default, the train split of Perch's built-in corpus
(the Python help text, `perch.dev.tokenizer.split_corpus`): held-out text is never calibrated on, so the
quality benchmark scores text the quantizer did not see. transformers' own model runs the text in fp32 on
CPU, CALIBRATION_CHUNKS windows of CHUNK tokens, each from an empty cache.

Memory: the model in fp32 plus one K x K float64 sum per linear layer: fine for fixtures and small models;
a model too large to calibrate here falls back to the scale search with a warning (the manifest says so),
so the default int4 still exports a 7B model on a 24 GiB machine; `check_fits` refuses instead.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from perch.errors import PerchError
from perch.runtimes.base import available_bytes

CHUNK = 128
# 384 x 128 tokens: on Falcon-Mamba's fixture, 64 windows gave mean KL 0.00399, 384 gave 0.00382.
CALIBRATION_CHUNKS = 384
FIT_FRACTION = 0.6  # of the memory available now, for the fp32 model and the Hessians


@dataclass
class Calibration:
    hessians: dict[str, np.ndarray] = field(repr=False)  # "transformer.h.0.mlp.dense_4h_to_h.weight" -> (K, K)
    info: dict  # for the manifest: source, tokens


def _text(path: str | Path | None) -> tuple[str, str]:
    if path is None:
        from perch.dev.tokenizer import split_corpus

        return split_corpus()[0], "built-in corpus, train split (perch.dev.tokenizer.split_corpus)"
    p = Path(path)
    if not p.is_file():
        raise PerchError(f"--calibration {path}: no such file; pass a UTF-8 text file")
    return p.read_text(encoding="utf-8", errors="replace"), str(p)


def too_large(ckpt) -> str | None:
    """Why this model cannot be calibrated in the memory available now, or None when it can."""
    params = sum(t.numel() for t in ckpt.state_dict.values())
    widest = max((t.shape[1] for t in ckpt.state_dict.values() if t.ndim == 2), default=0)
    need = 4 * params + 8 * widest * widest * (ckpt.config.num_hidden_layers * 4 + 1)
    avail = available_bytes()
    if need > FIT_FRACTION * avail:
        return (f"calibrating needs ~{need / 2**30:.1f} GiB (fp32 model + input Hessians) and "
                f"{avail / 2**30:.1f} GiB is free")
    return None


def check_fits(ckpt) -> None:
    why = too_large(ckpt)
    if why:
        raise PerchError(f"{why}: use --quantize int4-search (no calibration), or export on a larger machine")


def _windows(ckpt, text: str, chunks: int) -> np.ndarray:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ckpt.model_dir).encode(text)
    n = min(chunks, len(ids) // CHUNK)
    if n < 1:
        raise PerchError(f"calibration text has {len(ids)} tokens; give at least {CHUNK}")
    return np.asarray(ids[: n * CHUNK]).reshape(n, CHUNK)


@torch.inference_mode()
def calibrate(ckpt, path: str | Path | None = None, chunks: int = CALIBRATION_CHUNKS) -> Calibration:
    """Run the calibration text through transformers' model and sum X^T X at every nn.Linear input."""
    from perch.loading.checkpoint import build_hf_model

    check_fits(ckpt)
    text, source = _text(path)
    windows = _windows(ckpt, text, chunks)
    model = build_hf_model(ckpt.config, ckpt.state_dict, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(mod, inputs, out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        return add

    hooks = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        for i in range(0, len(windows), 8):
            model(torch.from_numpy(windows[i : i + 8]))
    finally:
        for h in hooks:
            h.remove()
    info = {"source": source, "tokens": int(windows.size), "windows": f"{len(windows)} x {CHUNK}",
            "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
    return Calibration({k: v.numpy() for k, v in sums.items()}, info)


def hessian_for(cal: Calibration | None, name: str) -> np.ndarray | None:
    """The Hessian of the weight whose (export) name ends with a checkpoint key, or None."""
    if cal is None:
        return None
    if name in cal.hessians:
        return cal.hessians[name]
    hits = [k for k in cal.hessians if name.endswith("." + k) or name.endswith("_" + k.replace(".", "_"))]
    return cal.hessians[max(hits, key=len)] if hits else None


def calibration_for(ckpt, options) -> Calibration | None:
    """Input Hessians when the export's recipe calibrates (GPTQ), else None."""
    from perch.exporter.quant_recipes import RECIPES

    rec = RECIPES.get(options.quantize)
    if rec is None or not rec.calibration:
        return None
    why = too_large(ckpt) if getattr(options, "calibration", None) is None else None
    if why:  # the default int4 must still export a 7B on a laptop: the scale search, said out loud
        warnings.warn(f"{options.quantize}: {why}, so its linear layers use the scale search (as int4-search); "
                      "the manifest records it", stacklevel=2)
        return None
    return calibrate(ckpt, getattr(options, "calibration", None))
