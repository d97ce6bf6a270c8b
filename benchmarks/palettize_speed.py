"""Perch's 1-D k-means palette (`coreml_compress.kmeans_lut`) beside coremltools' scikit-learn k-means, per
palette group: time and mean squared weight error on the same groups, side by side in one run.

    python benchmarks/palettize_speed.py [--groups 20] [--json benchmarks/results/palettize_speed.json]

Groups are 16 output rows of a 7B-wide weight (16 x 4544, Falcon-7B's hidden size; palettize4's group), drawn
Gaussian and Student-t (heavy tails, like trained LLM weights), in fp16 as the Core ML program holds them.
coremltools' k-means needs scikit-learn; without it that column is skipped with a message.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from perch.exporter.coreml_compress import kmeans_lut

ROOT = Path(__file__).resolve().parents[1]


def _mse(group: np.ndarray, lut: np.ndarray, codes: np.ndarray) -> float:
    x = group.reshape(-1).astype(np.float64)
    return float(((lut.reshape(-1).astype(np.float64)[codes.reshape(-1)] - x) ** 2).mean())


def _timed(fn, group):
    t0 = time.perf_counter()
    lut, codes = fn(group)
    return time.perf_counter() - t0, _mse(group, lut, codes)


def coremltools_kmeans(group: np.ndarray):
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    return _get_kmeans_lookup_table_and_weight(4, group, force_kmeans1d=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=20, help="groups per distribution")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/palettize_speed.json"))
    args = ap.parse_args(argv)
    have_sklearn = importlib.util.find_spec("sklearn") is not None
    if not have_sklearn:
        print("scikit-learn is not installed: coremltools' k-means column skipped (pip install scikit-learn)")
    rng, rows = np.random.default_rng(0), []
    for dist in ("gaussian", "student-t3"):
        ours, theirs = [], []
        for _ in range(args.groups):
            raw = rng.standard_normal((16, 4544)) if dist == "gaussian" else rng.standard_t(3, (16, 4544))
            group = (raw * 0.02).astype(np.float16)
            ours.append(_timed(kmeans_lut, group))
            if have_sklearn:
                theirs.append(_timed(coremltools_kmeans, group))
        row = {"distribution": dist, "groups": args.groups, "perch_ms": 1000 * float(np.median([t for t, _ in ours])),
               "perch_mse": float(np.mean([e for _, e in ours]))}
        if theirs:
            row.update(coremltools_ms=1000 * float(np.median([t for t, _ in theirs])),
                       coremltools_mse=float(np.mean([e for _, e in theirs])))
            row.update(speedup=row["coremltools_ms"] / row["perch_ms"], mse_ratio=row["perch_mse"] / row["coremltools_mse"])
        rows.append(row)
    print(f"{'distribution':<12} {'perch ms':>9} {'coremltools ms':>15} {'speed-up':>9} {'mse perch/coremltools':>22}")
    for r in rows:
        print(f"{r['distribution']:<12} {r['perch_ms']:>9.1f} {r.get('coremltools_ms', float('nan')):>15.1f} "
              f"{r.get('speedup', float('nan')):>9.1f} {r.get('mse_ratio', float('nan')):>22.3f}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
