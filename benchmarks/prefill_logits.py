"""Prefill with every position's logits vs the last one only (`logits_to_keep`), side by side in one process.

    python benchmarks/prefill_logits.py --preset falcon-mid --quantize int4-rtn --prompt 128 --threads 1

Alternates the two calls on one session (so machine load hits both alike), prints the medians and the
per-pair ratios, and writes benchmarks/results/prefill_logits-PRESET.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    from perch.exporter.export import export, options_for
    from perch.runtimes.onnxrt import OnnxRuntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="falcon-mid")
    p.add_argument("--quantize", default="int4-rtn")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="perch-logits-") as tmp:
        out = Path(tmp) / "artifact"
        export(a.preset, out, options_for("onnx", quantize=a.quantize, max_context=max(512, 2 * a.prompt)))
        rt = OnnxRuntime(out, threads=a.threads)
        ids = np.random.default_rng(0).integers(1, rt.vocab_size, (1, a.prompt))
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds + 1):  # the first round warms up
            for last in (False, True):
                rt.reset(1)
                t0 = time.perf_counter()
                rt.prefill(ids, last_only=last)
                times[last].append(time.perf_counter() - t0)
    every, last = (float(np.median(times[k][1:])) for k in (False, True))
    pairs = [round(x / y, 2) for x, y in zip(times[False][1:], times[True][1:])]
    print(f"| {a.preset} {a.quantize} prefill {a.prompt} | every position {every * 1e3:.0f} ms | last only "
          f"{last * 1e3:.0f} ms | {every / last:.2f}x (pairs {min(pairs)}-{max(pairs)}) |")
    RESULTS.mkdir(exist_ok=True)
    doc = {**vars(a), "every_ms": every * 1e3, "last_ms": last * 1e3, "ratio": every / last, "pairs": pairs,
           "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    (RESULTS / f"prefill_logits-{a.preset}.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
