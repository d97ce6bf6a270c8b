"""Token agreement of every real client with transformers: the table behind README's "Clients" section.

Each row exports one artifact as a user would (`perch export ... --for CLIENT`), runs it in the real client
(ONNX Runtime GenAI, transformers.js on onnxruntime-node, swift-transformers' feed replayed over Perch's Core
ML executor; see tests/clients/harness.py) and compares, over each prompt, the client's greedy tokens with
transformers' fp32 greedy tokens (and with Perch's own runtime on the same artifact: for quantized weights
that is the truth the client must reproduce) and the client's logits with transformers'.

Usage: OMP_NUM_THREADS=1 python benchmarks/clients.py [--tokens 24] [--json benchmarks/results/clients.json]
(clients installed by tests/clients/install.sh; the trained fixtures train on first use).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from perch.dev.fixtures import fixture_dir  # noqa: E402
from perch.dev.presets import preset_dir  # noqa: E402
from perch.exporter.export import export, options_for  # noqa: E402
from perch.exporter.to_onnx import quantize_artifact  # noqa: E402
from tests.clients import harness  # noqa: E402

MODELS = {"falcon (7B-style, trained)": lambda: fixture_dir("falcon"),
          "falcon40b-tiny (40B-style)": lambda: preset_dir("falcon40b-tiny"),
          "falcon-mamba (trained)": lambda: fixture_dir("falcon_mamba")}
# (client, model, backend, export options, quantize afterwards)
CASES = [
    ("genai", "falcon (7B-style, trained)", "onnx", {}, None),
    ("genai", "falcon (7B-style, trained)", "onnx", {"variant": "inplace"}, None),
    ("genai", "falcon (7B-style, trained)", "onnx", {"precision": "fp16"}, None),
    ("genai", "falcon (7B-style, trained)", "onnx", {}, "int8"),
    ("genai", "falcon (7B-style, trained)", "onnx", {}, "int4"),
    ("genai", "falcon40b-tiny (40B-style)", "onnx", {}, None),
    ("genai", "falcon40b-tiny (40B-style)", "onnx", {"variant": "inplace"}, None),
    ("transformers.js", "falcon (7B-style, trained)", "onnx", {"profile": "transformers.js"}, None),
    ("transformers.js", "falcon40b-tiny (40B-style)", "onnx", {"profile": "transformers.js"}, None),
    ("swift-transformers", "falcon (7B-style, trained)", "coreml", {"profile": "swift-transformers"}, None),
    ("swift-transformers", "falcon40b-tiny (40B-style)", "coreml", {"profile": "swift-transformers"}, None),
    ("swift-transformers", "falcon-mamba (trained)", "coreml", {"profile": "swift-transformers"}, None),
    ("swift-transformers", "falcon (7B-style, trained)", "coreml", {"precision": "fp16", "profile": "swift-transformers"}, None),
]
PROMPTS = ([472, 499, 442], [413, 391, 88, 9, 199], [289, 84, 263, 100])  # ids below every vocab (512 for the 40B-style preset)


def run_client(client: str, artifact: Path, ids: list[int], n: int):
    if client == "genai":
        return harness.genai(artifact, ids, n)
    if client == "transformers.js":
        return harness.transformers_js(artifact, ids, n)
    tokens, scores, _ = harness.swift(artifact / "model.mlpackage", ids, n)
    return tokens, scores


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(case, root: Path, n: int) -> dict:
    client, model, backend, opts, quantize = case
    src = MODELS[model]()
    name = f"{client}-{model.split()[0]}-{'-'.join(f'{v}' for v in opts.values())}-{quantize or 'none'}"
    art = root / name
    t0 = time.perf_counter()
    export(src, art if not quantize else root / (name + "-float"), options_for(backend, max_context=128, **opts))
    if quantize:
        quantize_artifact(root / (name + "-float"), art, quantize)
    row = {"client": client, "model": model, "options": opts, "quantize": quantize or "none",
           "export_s": round(time.perf_counter() - t0, 1), "prompts": []}
    for ids in PROMPTS:
        ref_tokens, ref_logits = harness.reference(src, ids, n)
        tokens, scores = run_client(client, art, ids, n)
        agree = agreement(tokens, ref_tokens)
        # Logits compare like for like only while both runs saw the same tokens: up to the first disagreement.
        k = min(len(scores), len(ref_logits), agree + 1)
        rel = np.linalg.norm(scores[:k] - ref_logits[:k], axis=-1) / np.linalg.norm(ref_logits[:k], axis=-1)
        row["prompts"].append({"ids": ids, "agree_transformers": agree,
                               "agree_perch": agreement(tokens, harness.perch_tokens(art, ids, n)),
                               "n": n, "max_rel_l2": float(rel.max()), "max_abs": float(np.abs(scores[:k] - ref_logits[:k]).max())})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "clients.json"))
    ap.add_argument("--cases", default="", help="comma-separated case numbers to run (default: all)")
    args = ap.parse_args()
    chosen = [int(c) for c in args.cases.split(",") if c] or range(len(CASES))
    rows = []
    print(f"{'client':18} {'model':28} {'options':36} {'vs transformers':>16} {'vs perch':>9} {'rel L2*':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in (CASES[i] for i in chosen):
            r = measure(case, Path(tmp), args.tokens)
            rows.append(r)
            agree = sum(p["agree_transformers"] for p in r["prompts"])
            ours = sum(p["agree_perch"] for p in r["prompts"])
            total = sum(p["n"] for p in r["prompts"])
            opts = ", ".join(f"{k}={v}" for k, v in {**r["options"], "quantize": r["quantize"]}.items())
            print(f"{r['client']:18} {r['model']:28} {opts:36} {agree:>7}/{total:<8} {ours:>4}/{total:<4} "
                  f"{max(p['max_rel_l2'] for p in r['prompts']):9.2e}", flush=True)
            Path(args.json).write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
