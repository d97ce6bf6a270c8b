"""Speed of the per-block int4 scale search (exporter/quant_search.py), against an earlier commit's, one run.

The default int4 of a model too large to calibrate (7B here) is this search over every weight, so its rate
sets most of the export's time. Both versions run on the same slice (Gaussian with 1% outliers, as in
tests/test_quant.py, random per-channel importance), alternated, at 1 and 2 threads; the weighted squared
error of each is printed too, so a faster search that chose worse codes shows.

    python benchmarks/search_speed.py --against 217350e          # the session-26 search vs the working tree
    python benchmarks/search_speed.py --rows 1024 --block 16 --repeats 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_version(rev: str | None):
    """The working tree's quant_search, or the one committed at `rev` (loaded from `git show`)."""
    if rev is None:
        from perch.exporter import quant_search
        return quant_search
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:exporter/quant_search.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"quant_search_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weighted_error(x, imp, q, s, z) -> float:
    deq = (q.astype(np.float32) - z[..., None]) * s[..., None]
    return float((imp * (deq - x) ** 2).sum())


def main() -> None:
    import torch  # quant_search sizes its thread pool from torch's thread count

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="217350e", help="commit whose search to compare with")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4544, help="input width (Falcon-7B's hidden size)")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/search_speed.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.k)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 8
    x = w.reshape(args.rows, -1, args.block)
    imp = rng.random(x.shape[1:]).astype(np.float32) + 0.1
    versions = {args.against: load_version(args.against), "working tree": load_version(None)}
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(args.repeats):
            for name, module in versions.items():
                t0 = time.perf_counter()
                q, s, z = module.search(x, 4, imp)
                dt = time.perf_counter() - t0
                rows.append({"version": name, "threads": threads, "seconds": round(dt, 3),
                             "m_weights_per_min": round(x.size / dt * 60 / 1e6), "error": weighted_error(x, imp, q, s, z)})
                print(f"{name:>14}  threads {threads}  {rows[-1]['m_weights_per_min']:>5} M weights/min  "
                      f"error {rows[-1]['error']:.6e}", flush=True)
    args.json.write_text(json.dumps({"rows": args.rows, "k": args.k, "block": args.block, "results": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
