"""The fidelity table: every architecture x backend x precision, trained fixture vs random weights.

For each artifact, against transformers fp32 on the same weights: KL(ref || artifact) and top-1 agreement
over held-out text (teacher-forced), the perplexity change on that text, and the greedy match length from
a prompt. Random weights give flat logits, so their numbers say little about a quantizer; the trained
fixtures (perch.dev.fixtures) show what a real model would see.

Usage: OMP_NUM_THREADS=1 python benchmarks/fidelity.py [--tokens 128] [--arch falcon_h1] [--json PATH]
(trains the fixtures on first use, ~3 CPU-minutes each; --arch, repeatable, measures a subset).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from perch.exporter.export import export, options_for  # noqa: E402
from perch.dev.fixtures import FIXTURE_CONFIGS, fixture_dir  # noqa: E402
from perch.loading import load_checkpoint  # noqa: E402
from perch.dev.tokenizer import split_corpus  # noqa: E402
from perch.runtimes import open_artifact  # noqa: E402
from perch.runtimes.pytorch.reference import ReferenceRuntime  # noqa: E402
from perch.validate.metrics import greedy_match_length, log_softmax, row_kl, row_top1  # noqa: E402

CASES = [("onnx", "fp32", "none"), ("onnx", "fp16", "none"), ("onnx", "fp32", "int8"), ("onnx", "fp32", "int4"),
         ("coreml", "fp16", "none"), ("coreml", "fp16", "int8"), ("coreml", "fp16", "int4"),
         ("coreml", "fp16", "palettize4")]
PROMPT = "The import statement is used to"
ARCHS = tuple(FIXTURE_CONFIGS)  # every architecture with a trained fixture


def random_twin(trained: Path, out: Path) -> Path:
    """Same config and tokenizer as the trained fixture, freshly initialised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained)).save_pretrained(out)
    for f in trained.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out


def teacher_forced(rt, ids: np.ndarray) -> np.ndarray:
    rt.reset(1)
    return rt.prefill(ids)[0]


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    lp = log_softmax(logits[:-1].astype(np.float64))
    return float(np.exp(-lp[np.arange(len(lp)), ids[0, 1:]].mean()))


def greedy(rt, prompt: np.ndarray, n: int) -> list[int]:
    rt.reset(1)
    logits, out = rt.prefill(prompt)[:, -1], []
    for _ in range(n):
        out.append(int(logits.argmax(-1)[0]))
        logits = rt.step(np.array([out[-1]]))
    return out


def measure(model_dir: Path, heldout: np.ndarray, prompt: np.ndarray, work: Path, n_greedy: int,
            cases: list[tuple[str, str, str]] = CASES) -> list[dict]:
    ckpt = load_checkpoint(model_dir)
    ref = ReferenceRuntime(ckpt)
    ref_logits, ref_greedy = teacher_forced(ref, heldout), greedy(ref, prompt, n_greedy)
    ref_ppl, rows = perplexity(ref_logits, heldout), []
    for backend, dtype, quant in cases:
        out = work / f"{backend}-{dtype}-{quant}"
        t0 = time.perf_counter()
        export(ckpt, out, options_for(backend, precision=dtype, quantize=quant, max_context=256))
        rt = open_artifact(out)
        art = teacher_forced(rt, heldout)
        rows.append({"backend": backend, "precision": dtype, "quantize": quant,
                     "kl_mean": float(row_kl(ref_logits, art).mean()), "top1": float(row_top1(ref_logits, art).mean()),
                     "ppl_ref": ref_ppl, "ppl_change_pct": 100 * (perplexity(art, heldout) / ref_ppl - 1),
                     "greedy_match": greedy_match_length(ref_greedy, greedy(rt, prompt, n_greedy)),
                     "greedy_of": n_greedy, "seconds": round(time.perf_counter() - t0, 1)})
        rt.close()
        shutil.rmtree(out)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="held-out tokens scored per artifact")
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--json", default="benchmarks/results/fidelity.json")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="only these architectures (default: all)")
    ap.add_argument("--weights", action="append", choices=("trained", "random"), help="default: both")
    ap.add_argument("--cases", help="comma list of backend-precision-quantize, e.g. onnx-fp32-int8 (default: all)")
    a = ap.parse_args()
    cases = [c for c in CASES if not a.cases or "-".join(c) in a.cases.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.arch or ARCHS:
            trained = fixture_dir(arch)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(trained)
            heldout = np.array([tok.encode(split_corpus()[1])[: a.tokens]])
            prompt = np.array([tok.encode(PROMPT)])
            for weights in a.weights or ("trained", "random"):
                d = trained if weights == "trained" else random_twin(trained, Path(tmp) / f"{arch}-random")
                for row in measure(d, heldout, prompt, Path(tmp) / f"{arch}-{weights}", a.greedy, cases):
                    results.append({"arch": arch, "weights": weights, **row})
                    print_row(results[-1])
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tokens": a.tokens, "greedy": a.greedy}
    Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print_table(results)
    return 0


def print_row(r: dict) -> None:
    print(f"{r['arch']:<13} {r['weights']:<8} {r['backend']:<7} {r['precision']:<5} {r['quantize']:<11} "
          f"KL {r['kl_mean']:.2e}  top1 {r['top1']:.3f}  ppl {r['ppl_change_pct']:+.2f}%  "
          f"greedy {r['greedy_match']}/{r['greedy_of']}", flush=True)


def print_table(results: list[dict]) -> None:
    """Markdown: trained and random side by side for each (arch, backend, precision)."""
    print("\n| arch | backend | precision | KL trained | KL random | top-1 trained | top-1 random "
          "| ppl change trained | ppl change random | greedy match trained | greedy match random |")
    print("|" + "---|" * 11)
    keyed = {(r["arch"], r["backend"], r["precision"], r["quantize"], r["weights"]): r for r in results}
    for arch, backend, prec, quant in dict.fromkeys((r["arch"], r["backend"], r["precision"], r["quantize"]) for r in results):
        pair = [keyed.get((arch, backend, prec, quant, w)) for w in ("trained", "random")]
        name = prec if quant == "none" else f"{quant} ({prec})"
        cells = [[f"{x['kl_mean']:.2e}", f"{x['top1']:.3f}", f"{x['ppl_change_pct']:+.2f}%",
                  f"{x['greedy_match']}/{x['greedy_of']}"] if x else ["–"] * 4 for x in pair]  # a subset run
        print(f"| {arch} | {backend} | {name} | " + " | ".join(c for k in range(4) for c in (cells[0][k], cells[1][k])) + " |")


if __name__ == "__main__":
    sys.exit(main())
