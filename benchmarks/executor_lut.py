"""Memory and time of one call of Perch's Core ML executor on a palettized 7B-sized embedding.

A palettize4 7B package ran in more memory than its own size (issue 12); the LUT kernel was the cause. This
converts a module that is only Falcon-7B's embedding (65024 x 4544, gathered and summed) with coremltools,
palettizes it the way `--quantize palettize4` stores it (4-bit, per grouped channel, groups of 16; uniform
tables here, so the build takes seconds instead of k-means minutes), and runs one call with lazy weights in a
fresh process, reporting the peak RSS above what loading took.

    python benchmarks/executor_lut.py                    # prints a table, writes results/executor_lut.json
    python benchmarks/executor_lut.py --rows 8192       # a smaller table
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, rows: int, cols: int) -> None:
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    import numpy as np
    import torch
    from torch import nn

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(rows, cols)

        def forward(self, ids):
            return self.emb(ids).sum(-1)

    traced = torch.jit.trace(Table().eval(), (torch.zeros(1, 1, dtype=torch.int32),))
    model = ct.convert(traced, inputs=[ct.TensorType(name="ids", shape=(1, 1), dtype=np.int32)],
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    config = cto.OpPalettizerConfig(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16,
                                    weight_threshold=0)
    cto.palettize_weights(model, cto.OptimizationConfig(global_config=config)).save(str(path))


def run_once(path: Path) -> dict:
    """In this process: load lazily, then one call; the call's peak RSS above the RSS after loading (the
    kernel's high-water mark is reset after the load, so a load peak cannot hide the call's)."""
    import numpy as np

    from perch.runtimes.mil.executor import MilExecutor

    ex = MilExecutor(path, lazy_weights=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS:")
    t = time.perf_counter()
    out = ex.predict({"ids": np.array([[7]], np.int32)})
    return {"call_s": round(time.perf_counter() - t, 2),
            "peak_over_load_mib": round((_status_kib("VmHWM:") - base) / 1024),
            "output": float(next(iter(out.values())).ravel()[0])}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=65024)
    ap.add_argument("--cols", type=int, default=4544)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "executor_lut.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_once(Path(args.child))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "table.mlpackage"
        build(package, args.rows, args.cols)
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        out = subprocess.run([sys.executable, __file__, "--child", str(package)], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    dense_mib = args.rows * args.cols * 2 / 2**20
    row = {"rows": args.rows, "cols": args.cols, "package_mib": round(size / 2**20), "dense_fp16_mib": round(dense_mib),
           **result, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
           "python": platform.python_version()}
    print(f"{'table':>14} {'package MiB':>12} {'dense fp16 MiB':>15} {'call s':>7} {'peak over load MiB':>19}")
    print(f"{args.rows:>7}x{args.cols:<6} {row['package_mib']:>12} {row['dense_fp16_mib']:>15} {row['call_s']:>7} "
          f"{row['peak_over_load_mib']:>19}")
    Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
