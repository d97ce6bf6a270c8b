"""Where an ONNX export's memory and decode time go: RSS at each stage per session workload, and ORT's
profile of one decode step (ops per step, time per op type).

Each workload runs in its own child process (a fresh interpreter; VmHWM is that process's own peak):
after `import onnxruntime`, after the session is created, after a 128-token prefill, after 32 decode steps.

    python benchmarks/onnx_rss.py DIR                       # every workload in runtimes/onnx_session.py
    python benchmarks/onnx_rss.py DIR --profile             # + op counts and time per op type, one decode step
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(round(int(ln.split()[1]) / 1024) for ln in f if ln.startswith(field))


def stages(path: str, workload: str, threads: int, prompt: int, steps: int) -> dict:
    import numpy as np

    out = {"start": _mb("VmRSS:")}
    import onnxruntime  # noqa: F401

    from perch.runtimes.onnxrt import OnnxRuntime

    out["import"] = _mb("VmRSS:")
    rt = OnnxRuntime(path, threads=threads, workload=workload)
    out["session"], out["session_peak"] = _mb("VmRSS:"), _mb("VmHWM:")
    ids = np.random.default_rng(0).integers(1, rt.vocab_size, (1, prompt))
    t0 = time.perf_counter()
    tok = rt.prefill(ids)[:, -1].argmax(-1)
    out["prefill_s"] = round(time.perf_counter() - t0, 3)
    out["prefill"], out["prefill_peak"] = _mb("VmRSS:"), _mb("VmHWM:")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = rt.step(tok).argmax(-1)
        times.append(time.perf_counter() - t0)
    out["decode_ms"] = round(1e3 * float(np.median(times)), 2)
    out["decode"], out["peak"] = _mb("VmRSS:"), _mb("VmHWM:")
    return out


def profile(path: str, threads: int, prompt: int) -> dict:
    """ORT's profiler over one prefill and one decode step: node events counted and timed by op type."""
    import numpy as np

    import onnxruntime as ort
    from perch.runtimes import onnxrt

    real = onnxrt.open_session

    def profiled(p, providers, threads=None, workload=onnxrt.DEFAULT_WORKLOAD):
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "perch")
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads or 1, 1
        onnxrt.apply_workload(opts, workload)
        return ort.InferenceSession(str(p), sess_options=opts, providers=providers)

    onnxrt.open_session = profiled
    try:
        rt = onnxrt.OnnxRuntime(path, threads=threads)
    finally:
        onnxrt.open_session = real
    ids = np.random.default_rng(0).integers(1, rt.vocab_size, (1, prompt))
    tok = rt.prefill(ids)[:, -1].argmax(-1)
    for _ in range(3):
        tok = rt.step(tok).argmax(-1)
    events = json.loads(Path(rt.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last_start = runs[-1]["ts"]  # the last decode step
    ops: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    nodes = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
            op = e.get("args", {}).get("op_name", "?")
            ops[op][0] += 1
            ops[op][1] += e["dur"] / 1e3
            shapes = [list(d.values())[0] for d in e.get("args", {}).get("output_type_shape", [])]
            nodes.append((e["dur"] / 1e3, op, e["name"].removesuffix("_kernel_time"), shapes))
    ordered = sorted(ops.items(), key=lambda kv: -kv[1][1])
    return {"decode_step_ms": round(runs[-1]["dur"] / 1e3, 2), "nodes": sum(v[0] for v in ops.values()),
            "kernel_ms": round(sum(v[1] for v in ops.values()), 2),
            "by_op": {k: {"count": v[0], "ms": round(v[1], 3)} for k, v in ordered},
            "slowest": [{"ms": round(d, 3), "op": o, "node": n, "out": s} for d, o, n, s in sorted(nodes)[::-1][:12]]}


def child(args) -> dict:
    if args.child == "profile":
        return profile(args.path, args.threads, args.prompt)
    return stages(args.path, args.child, args.threads, args.prompt, args.steps)


def main(argv: list[str] | None = None) -> int:
    from perch.runtimes.onnx_session import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    size = sum(p.stat().st_size for p in Path(args.path).glob("model.onnx*")) / 2**20
    print(f"{args.path}: model files {size:.1f} MiB")
    jobs = args.workloads.split(",") + (["profile"] if args.profile else [])
    results = {}
    for job in jobs:
        cmd = [sys.executable, __file__, args.path, "--child", job, "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--steps", str(args.steps)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        results[job] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-800:]}
        print(job, json.dumps(results[job]) if job != "profile" else "", flush=True)
    if "profile" in results and "by_op" in results["profile"]:
        p = results["profile"]
        print(f"decode step {p['decode_step_ms']} ms, {p['nodes']} kernels, {p['kernel_ms']} ms in kernels")
        for op, v in list(p["by_op"].items())[:15]:
            print(f"  {op:<28} {v['count']:>5} {v['ms']:>9.3f} ms")
        print("slowest nodes:")
        for n in p["slowest"]:
            print(f"  {n['ms']:>8.3f} ms  {n['op']:<14} {n['node'][:60]:<60} {n['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
