"""The block size of a tied embedding/lm_head table, for ONNX Runtime's CPU decode, side by side in one process.

    python benchmarks/tied_head.py --preset falcon-mid --quantize int4 --threads 1

Two measurements, each alternating its cases so machine load hits all alike:
1. MatMulNBits alone, one token through a (vocab, hidden) int4 head: blocks of 16, 32 and 64, with zero points,
   accuracy level 4 (Perch's settings), for each `--widths` hidden size (1024: falcon-mid, 4544: Falcon-7B).
2. The whole decode step of a tied preset exported twice with `--quantize`: the table in the head's blocks
   (Perch's tied choice) and in the embedding's (the choice before it), with file sizes.
Prints a table and writes benchmarks/results/tied_head-PRESET.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = (16, 32, 64)


def head_model(vocab: int, hidden: int, block: int) -> bytes:
    """One MatMulNBits node with random 4-bit codes, float scales and packed zero points."""
    from onnx import TensorProto, helper, numpy_helper

    blocks, rng = hidden // block, np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (vocab, blocks, block // 2), dtype=np.uint8), "B"),
             numpy_helper.from_array(rng.random(vocab * blocks).astype(np.float32) * 0.01, "S"),
             numpy_helper.from_array(rng.integers(0, 256, vocab * -(-blocks // 2), dtype=np.uint8), "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=hidden, N=vocab,
                            bits=4, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def time_heads(vocab: int, hidden: int, threads: int, calls: int) -> dict[int, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sessions = {b: ort.InferenceSession(head_model(vocab, hidden, b), opts, providers=["CPUExecutionProvider"])
                for b in BLOCKS}
    x = np.random.default_rng(1).standard_normal((1, 1, hidden)).astype(np.float32)
    times: dict[int, list[float]] = {b: [] for b in BLOCKS}
    for i in range(calls + 3):
        for b, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            if i >= 3:  # warm-up calls
                times[b].append(time.perf_counter() - t0)
    return {b: float(np.median(t)) * 1e3 for b, t in times.items()}


def _embedding_choice(self, block):  # the tied choice before: the embedding's (blocks of 16)
    return self.choice("embedding", "embedding", block)


def export_pair(preset: str, quantize: str, root: Path) -> dict[str, Path]:
    from perch.exporter.export import export, options_for
    from perch.exporter.quant_recipes import Recipe

    out = {"head's block": root / "head", "embedding's block": root / "embedding"}
    export(preset, out["head's block"], options_for("onnx", quantize=quantize, max_context=512))
    with mock.patch.object(Recipe, "tied_choice", _embedding_choice):
        export(preset, out["embedding's block"], options_for("onnx", quantize=quantize, max_context=512))
    return out


def time_decode(paths: dict[str, Path], threads: int, prompt: int, steps: int, rounds: int) -> dict[str, dict]:
    from perch.runtimes.onnxrt import OnnxRuntime

    runtimes = {k: OnnxRuntime(p, threads=threads) for k, p in paths.items()}
    ids = np.random.default_rng(0).integers(1, next(iter(runtimes.values())).vocab_size, (1, prompt))
    per_round: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds + 1):  # round 0 warms up
        for k, rt in runtimes.items():
            rt.reset(1)
            logits = rt.prefill(ids, last_only=True)
            step = []
            for _ in range(steps):
                tok = np.array([int(np.argmax(logits[0, -1] if logits.ndim == 3 else logits[-1]))])
                t0 = time.perf_counter()
                logits = rt.step(tok)
                step.append(time.perf_counter() - t0)
            if r:
                per_round[k].append(float(np.median(step)) * 1e3)
    return {k: {"decode_ms": float(np.median(v)), "rounds_ms": [round(x, 3) for x in v],
                "file_mb": sum(f.stat().st_size for f in paths[k].iterdir() if f.is_file()) / 2**20}
            for k, v in per_round.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="falcon-mid")
    p.add_argument("--quantize", default="int4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--widths", default="1024,4544")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--heads-only", action="store_true", help="only the MatMulNBits timing (no exports: seconds, not minutes)")
    a = p.parse_args(argv)
    heads = {int(w): time_heads(65024, int(w), a.threads, a.calls) for w in a.widths.split(",")}
    for w, t in heads.items():
        print(f"| MatMulNBits 65024 x {w} | " + " | ".join(f"block {b}: {ms:.2f} ms" for b, ms in t.items())
              + f" | 16/32 = {t[16] / t[32]:.2f}x |")
    decode, pairs = {}, []
    if not a.heads_only:
        with tempfile.TemporaryDirectory(prefix="perch-tied-") as tmp:
            decode = time_decode(export_pair(a.preset, a.quantize, Path(tmp)), a.threads, a.prompt, a.steps, a.rounds)
        for k, d in decode.items():
            print(f"| {a.preset} {a.quantize}, tied table in the {k} | decode {d['decode_ms']:.2f} ms/token "
                  f"(rounds {min(d['rounds_ms'])}-{max(d['rounds_ms'])}) | file {d['file_mb']:.1f} MiB |")
        old, new = decode["embedding's block"], decode["head's block"]
        pairs = [round(x / y, 3) for x, y in zip(old["rounds_ms"], new["rounds_ms"])]
        print(f"before / after, per round: {pairs}")
    RESULTS.mkdir(exist_ok=True)
    import onnxruntime

    doc = {**vars(a), "heads_ms": heads, "decode": decode, "round_ratios": pairs,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "onnxruntime": onnxruntime.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / ("tied_head-heads.json" if a.heads_only else f"tied_head-{a.preset}.json")).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
