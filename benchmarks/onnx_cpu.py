"""ONNX Runtime on CPU against the PyTorch reference, side by side: decode ms/token, prefill tok/s,
export time and peak RSS, for fp32, int4 and int8 exports (and the in-place int4 variant for Falcon).

Every export and every timed runtime runs in its own child process (a fresh interpreter), which reports
its own peak RSS (`ru_maxrss`). Decode is timed over greedy steps after a prefill, median per token;
prefill over a fresh prompt, median of repeats. The parent prints a table and writes JSON under
benchmarks/results/.

    python benchmarks/onnx_cpu.py                                   # falcon-mid, 2 threads
    python benchmarks/onnx_cpu.py --preset falcon-mamba-mid --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> OnnxOptions fields; "reference" is transformers in PyTorch fp32 (no export).
EXPORTS = {
    "onnx-fp32": dict(precision="fp32"),
    "onnx-int4": dict(quantize="int4", block_size=32),
    "onnx-int8": dict(quantize="int8", block_size=32),
    "onnx-int4-inplace": dict(quantize="int4", block_size=32, variant="inplace"),
}
RUNS = ("reference", *EXPORTS)


def _peak_mb() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across
    fork+exec, so a child would report at least the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def child_export(preset: str, name: str, max_context: int, work: Path) -> dict:
    from perch.exporter.export import export, options_for
    from perch.loading import load_checkpoint
    from perch.dev.presets import preset_dir

    t0 = time.perf_counter()
    ckpt = load_checkpoint(preset_dir(preset), dtype=None)  # stored dtype, memory-mapped: no extra copy
    manifest = export(ckpt, work / name, options_for("onnx", max_context=max_context, **EXPORTS[name]))
    return {"export_s": round(time.perf_counter() - t0, 2), "export_peak_rss_mb": _peak_mb(),
            "model_mb": round(manifest.model_bytes / 2**20, 1), "variant": manifest.variant}


def child_run(preset: str, name: str, work: Path, threads: int, prompt: int, steps: int, repeats: int) -> dict:
    import numpy as np

    if name == "reference":
        import torch

        from perch.dev.presets import preset_dir
        from perch.runtimes.pytorch.reference import ReferenceRuntime

        torch.set_num_threads(threads)
        rt = ReferenceRuntime(preset_dir(preset))
    else:  # no torch in this process: its RSS is what a deployment needs
        from perch.runtimes.onnxrt import OnnxRuntime

        rt = OnnxRuntime(work / name, threads=threads)
    rng = np.random.default_rng(0)
    prefill = []
    for r in range(repeats + 1):  # the first is warm-up
        rt.reset(1)
        ids = rng.integers(1, rt.vocab_size, (1, prompt))
        t0 = time.perf_counter()
        logits = rt.prefill(ids, last_only=True)  # what a generating client asks for
        prefill.append(time.perf_counter() - t0)
    tok, per_token = logits[:, -1].argmax(-1), []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = rt.step(tok).argmax(-1)
        per_token.append(time.perf_counter() - t0)
    return {"prefill_tok_s": round(prompt / float(np.median(prefill[1:])), 1),
            "decode_ms": round(1e3 * float(np.median(per_token[2:])), 2), "run_peak_rss_mb": _peak_mb()}


def run_child(args, mode: str, name: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--only", name, "--work", str(work), "--preset", args.preset,
           "--threads", str(args.threads), "--prompt", str(args.prompt), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--max-context", str(args.max_context)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def table(rows: dict[str, dict]) -> str:
    ref = rows.get("reference", {}).get("decode_ms")
    head = (f"{'path':<18} {'decode ms/tok':>13} {'vs torch':>8} {'prefill tok/s':>13} {'run RSS MB':>10} "
            f"{'export s':>8} {'export RSS MB':>13} {'model MB':>8}")
    out = [head, "-" * len(head)]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"{name:<18} ERROR {r['error'].strip().splitlines()[-1][:90]}")
            continue
        speedup = f"{ref / r['decode_ms']:.2f}x" if ref and r.get("decode_ms") else "-"
        out.append(f"{name:<18} {r.get('decode_ms', '-'):>13} {speedup:>8} {r.get('prefill_tok_s', '-'):>13} "
                   f"{r.get('run_peak_rss_mb', '-'):>10} {r.get('export_s', '-'):>8} "
                   f"{r.get('export_peak_rss_mb', '-'):>13} {r.get('model_mb', '-'):>8}")
    return "\n".join(out)


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="falcon-mid")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--prompt", type=int, default=128, help="prefill length")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=3, help="prefill repeats (after one warm-up)")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per child")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/onnx_cpu-PRESET.json)")
    ap.add_argument("--child", choices=("export", "run"), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.only = [n for n in args.only.split(",") if n]
    if bad := [n for n in args.only if n not in RUNS]:
        ap.error(f"unknown path(s) {bad}; choose from {', '.join(RUNS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child == "export":
        print(json.dumps(child_export(args.preset, args.only[0], args.max_context, Path(args.work))))
        return 0
    if args.child == "run":
        print(json.dumps(child_run(args.preset, args.only[0], Path(args.work), args.threads, args.prompt,
                                   args.steps, args.repeats)))
        return 0
    from perch.dev.presets import get, preset_dir

    if get(args.preset).arch != "falcon" and "onnx-int4-inplace" in args.only:
        args.only.remove("onnx-int4-inplace")  # Falcon-Mamba's state is fixed-size: no separate variant
    preset_dir(args.preset)  # materialise once, outside the timed children
    work = Path(tempfile.mkdtemp(prefix="perch-onnx-bench-"))
    rows: dict[str, dict] = {}
    try:
        for name in args.only:
            rows[name] = run_child(args, "export", name, work) if name != "reference" else {}
            if "error" not in rows[name]:
                rows[name].update(run_child(args, "run", name, work))
            print(table(rows).splitlines()[-1], flush=True)
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(args, rows)


def report(args, rows: dict[str, dict]) -> int:
    import onnxruntime
    import torch

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"onnx_cpu-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "prompt": args.prompt, "steps": args.steps, "max_context": args.max_context,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out.write_text(json.dumps({"meta": meta, "preset": args.preset, "results": rows}, indent=2) + "\n")
    print(f"\n{args.preset}, batch 1, prompt {args.prompt}, {args.steps} decode steps, {args.threads} threads\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
