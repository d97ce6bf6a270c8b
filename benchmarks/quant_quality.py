"""4-bit quality: every quantization variant x both trained fixtures x both backends, beside llama.cpp.

The protocol (issue 18, as llama.cpp's `llama-perplexity --kl-divergence` scores it): the fixture's held-out
split (perch.dev.tokenizer.split_corpus), the first CHUNKS windows of CTX tokens, each run from an empty
state; the second half of each window is scored: KL(reference || artifact) and same top-1 at the logits that
predict tokens CTX/2..CTX-1 (CHUNKS * CTX/2 = 2048 positions), perplexity of those tokens. Reference:
transformers fp32. Artifacts run through perch.runtimes.open_artifact (Core ML: Perch's MIL executor).
Bits per weight: the manifest's (stored bits over the parameters of every 2-D weight; bits_per_linear_weight
leaves out the SSM's A_log, as llama.cpp's GGUF count does). Decode speed: ms per token for DECODE_STEPS
single-token steps after a CTX-token prompt (ONNX only: Perch's MIL executor is not a Core ML speed).

llama.cpp (backend "llama.cpp", benchmarks/llama_quality.py): Q4_0 (+ --pure), Q4_K_M and Q8_0 scored on the
same windows against the same reference, and by its own llama-perplexity --kl-divergence; a llama.cpp that
cannot be built here is one row saying why.

Usage: OMP_NUM_THREADS=1 python benchmarks/quant_quality.py [--arch falcon_mamba] [--backend onnx]
       [--coreml-chunks 8] [--json benchmarks/results/quant_quality.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
import llama_quality  # noqa: E402
from perch.dev.fixtures import fixture_dir  # noqa: E402
from perch.dev.tokenizer import split_corpus  # noqa: E402
from perch.exporter.calibration import calibrate  # noqa: E402
from perch.exporter.export import export  # noqa: E402
from perch.exporter.options import OPTIONS, options_for  # noqa: E402
from perch.exporter.quant_recipes import RECIPES  # noqa: E402
from perch.exporter.to_onnx import quantize_artifact  # noqa: E402
from perch.loading import load_checkpoint  # noqa: E402
from perch.runtimes import open_artifact  # noqa: E402
from perch.runtimes.pytorch.reference import ReferenceRuntime  # noqa: E402
from perch.validate.metrics import log_softmax  # noqa: E402

CHUNKS, CTX = 32, 128
DECODE_STEPS = 32
VARIANTS = ("int4", "int4-mixed", "int4-search", "int4-rtn", "int8")


def windows(model_dir: Path, chunks: int) -> np.ndarray:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).encode(split_corpus()[1])
    return np.asarray(ids[: chunks * CTX]).reshape(chunks, CTX)


def scored_logits(rt, ids: np.ndarray) -> np.ndarray:
    """(chunks, CTX/2, vocab): logits predicting the second half of each window, each from an empty state."""
    out = []
    for row in ids:
        rt.reset(1)
        out.append(rt.prefill(row[None])[0, CTX // 2 - 1 : CTX - 1].astype(np.float64))
    return np.stack(out)


def compare(ref: np.ndarray, art: np.ndarray, ids: np.ndarray) -> dict:
    lr, la = log_softmax(ref), log_softmax(art)
    kl = (np.exp(lr) * (lr - la)).sum(-1)
    tgt = ids[: len(ref), CTX // 2 :, None]
    ppl = lambda lp: float(np.exp(-np.take_along_axis(lp, tgt, -1).mean()))  # noqa: E731
    return {"kl_mean": float(kl.mean()), "top1": float((ref.argmax(-1) == art.argmax(-1)).mean()),
            "ppl_change_pct": 100 * (ppl(la) / ppl(lr) - 1), "scored": int(kl.size)}


def decode_ms(rt, prompt: np.ndarray, steps: int = DECODE_STEPS) -> float:
    rt.reset(1)
    logits = rt.prefill(prompt[None])[:, -1]
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = rt.step(np.array([int(logits.argmax(-1)[0])]))
    return 1000 * (time.perf_counter() - t0) / steps


def step_ms(rt, prompt: np.ndarray, tokens: np.ndarray) -> list[float]:
    """ms of each single-token step after `prompt`, teacher-forced with `tokens` (the same work for every
    variant, whatever it would have predicted)."""
    rt.reset(1)
    rt.prefill(prompt[None])
    out = []
    for t in tokens:
        t0 = time.perf_counter()
        rt.step(np.array([int(t)]))
        out.append(1000 * (time.perf_counter() - t0))
    return out


def make(ckpt, backend: str, variant: str, out: Path, cal, onnx_float: Path | None):
    """One artifact. ONNX variants quantize the float export (one trace per fixture); every variant, Core ML's
    included, uses the one calibration computed here (export() would otherwise recompute it per variant)."""
    if backend == "onnx" and variant != "none" and onnx_float is not None:
        return quantize_artifact(onnx_float, out, variant, 32, calibration=cal)
    precision = "fp32" if backend == "onnx" else "fp16"
    with mock.patch("perch.exporter.calibration.calibration_for",
                    lambda ckpt, options: cal if RECIPES.get(options.quantize, RECIPES["int8"]).calibration else None):
        return export(ckpt, out, options_for(backend, precision=precision, quantize=variant, max_context=256))


def measure(arch: str, backends: list[str], variants: list[str], work: Path, coreml_chunks: int) -> list[dict]:
    model_dir = fixture_dir(arch)
    ids = windows(model_dir, CHUNKS)
    ckpt = load_checkpoint(model_dir)
    ref = scored_logits(ReferenceRuntime(ckpt), ids)
    t0 = time.perf_counter()
    cal = calibrate(ckpt)
    print(f"calibration ({cal.info['windows']} tokens): {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for backend in backends:
        if backend == "llama.cpp":
            found = llama_quality.rows(arch, model_dir, ids, ref, compare, work, split_corpus()[1])
            rows += found
            for r in found:
                print_row(r)
            continue
        n = CHUNKS if backend == "onnx" else coreml_chunks
        onnx_float = None
        # ONNX variants quantize its float export, so it always runs; Core ML's float row only when asked
        base = ("none",) if backend == "onnx" and "none" not in variants else ()
        for variant in (*base, *[v for v in variants if v in OPTIONS[backend].QUANTIZE]):
            out = work / f"{arch}-{backend}-{variant}"
            t0 = time.perf_counter()
            m = make(ckpt, backend, variant, out, cal, onnx_float)
            seconds = time.perf_counter() - t0
            rt = open_artifact(out)
            row = {"arch": arch, "backend": backend, "precision": "fp32" if backend == "onnx" else "fp16",
                   "quantize": variant, "chunks": n,
                   **compare(ref[:n], scored_logits(rt, ids[:n]), ids),
                   "bits_per_weight": m.quantization.get("bits_per_weight"),
                   "bits_per_linear_weight": m.quantization.get("bits_per_linear_weight"),
                   "decode_ms": decode_ms(rt, ids[0]) if backend == "onnx" else None,
                   "export_seconds": round(seconds, 1), "tensors": m.quantization.get("tensors")}
            rt.close()
            if backend == "onnx" and variant == "none":
                onnx_float = out
            else:
                shutil.rmtree(out)
            rows.append(row)
            print_row(row)
    return rows


def speed(arch: str, variants: list[str], work: Path, rounds: int) -> list[dict]:
    """Decode ms/token of each ONNX variant, timed in alternating, rotated rounds in this process, teacher-forced.

    Calibration uses 8 windows here: the artifact's layout (ops, bits and blocks per tensor), which is all
    that decode speed depends on, is the same as with the full calibration set.
    """
    model_dir = fixture_dir(arch)
    ckpt, ids = load_checkpoint(model_dir), windows(model_dir, 1)
    cal = calibrate(ckpt, chunks=8)
    base = make(ckpt, "onnx", "none", work / f"{arch}-speed-none", cal, None)
    del base
    paths = {"none": work / f"{arch}-speed-none"}
    for v in variants:
        paths[v] = work / f"{arch}-speed-{v}"
        make(ckpt, "onnx", v, paths[v], cal, paths["none"])
    rts = {v: open_artifact(p) for v, p in paths.items()}
    times: dict[str, list[float]] = {v: [] for v in rts}
    order, follow = list(rts), windows(model_dir, 2)[1, :DECODE_STEPS]
    for i in range(rounds):
        # rotated each round: the variant timed right after fp32 measured ~0.7 ms/token slower (its larger
        # weights evict the caches), which a fixed order pins on one variant
        for v in order[i % len(order):] + order[: i % len(order)]:
            times[v] += step_ms(rts[v], ids[0], follow)
    # per-step quantiles: on a loaded shared machine a preempted step is 10x the others, so the low quantiles
    # are the decode work, and a round's mean is mostly the load
    rows = [{"arch": arch, "backend": "onnx", "quantize": v, "decode_ms_p10": float(np.percentile(t, 10)),
             "decode_ms_median": float(np.median(t)), "steps": len(t), "rounds": rounds} for v, t in times.items()]
    for r in rows:
        print(f"| {arch} | onnx | {r['quantize']} | p10 {r['decode_ms_p10']:.2f} | median {r['decode_ms_median']:.2f} "
              f"ms/token ({r['steps']} steps) |", flush=True)
    return rows


def print_row(r: dict) -> None:
    if "skipped" in r:
        print(f"| {r['arch']} | {r['backend']} | skipped: {r['skipped']} |", flush=True)
        return
    num = lambda k, f: format(r[k], f) if r.get(k) is not None else "-"  # noqa: E731
    print(f"| {r['arch']} | {r['backend']} | {r['quantize']} | {r['kl_mean']:.5f} | {100 * r['top1']:.1f}% | "
          f"{r['ppl_change_pct']:+.2f}% | {num('bits_per_weight', '.3f')} | {num('bits_per_linear_weight', '.3f')} | "
          f"{num('decode_ms', '.2f')} | {r['chunks']} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=["falcon", "falcon_mamba"])
    ap.add_argument("--backend", action="append", choices=["onnx", "coreml", "llama.cpp"])
    ap.add_argument("--variant", action="append", help=f"default: {', '.join(VARIANTS)} (and palettize4 on Core ML)")
    ap.add_argument("--coreml-chunks", type=int, default=8, help="windows scored on Core ML (its executor is slow)")
    ap.add_argument("--json", default="benchmarks/results/quant_quality.json")
    ap.add_argument("--speed-rounds", type=int, help="only time ONNX decode, alternating variants this many rounds")
    a = ap.parse_args()
    torch.set_num_threads(1)
    variants = a.variant or [*VARIANTS, "palettize4"]
    if a.speed_rounds:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [r for arch in a.arch or ["falcon", "falcon_mamba"]
                    for r in speed(arch, [v for v in variants if v in OPTIONS["onnx"].QUANTIZE], Path(tmp), a.speed_rounds)]
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"meta": {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)},
                                            "results": rows}, indent=2) + "\n")
        return 0
    print("| arch | backend | quantize | mean KL | same top-1 | ppl change | bits/weight | bits/linear weight | "
          "decode ms/token | windows |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.arch or ["falcon", "falcon_mamba"]:
            rows += measure(arch, a.backend or ["onnx", "coreml", "llama.cpp"], variants, Path(tmp), a.coreml_chunks)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "chunks": CHUNKS, "ctx": CTX,
            "decode_steps": DECODE_STEPS, "command": " ".join(sys.argv)}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
