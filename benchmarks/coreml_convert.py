"""Core ML conversion cost per precision: wall time, peak RSS and package size.

Each conversion runs in its own child process (a fresh interpreter), which reports its own peak RSS
(`ru_maxrss`), the RSS after loading the checkpoint (the weights as stored) and the phases' wall times.
The parent prints a table and writes JSON under benchmarks/results/.

    python benchmarks/coreml_convert.py --preset falcon-mid                 # all precisions
    python benchmarks/coreml_convert.py --preset falcon-7b --precisions fp16,int4
    python benchmarks/coreml_convert.py --preset falcon-7b --layers 2 --precisions fp16   # 7B widths, 2 layers
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {  # name -> (compute precision, weight compression)
    "fp16": ("fp16", "none"),
    "fp32": ("fp32", "none"),
    "int8": ("fp16", "int8"),
    "int4": ("fp16", "int4"),
    "palettize4": ("fp16", "palettize4"),
}


def _status_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakAnon:
    """Samples RssAnon (resident memory not backed by a file) every 20 ms: the memory a conversion really
    needs. ru_maxrss also counts the memory-mapped checkpoint pages, which the kernel can drop at will."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_mb("RssAnon"))
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def truncated_preset(preset: str, layers: int, work: Path) -> Path:
    """A full-size preset's shapes with only `layers` layers, saved like a preset (random weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from perch.dev.presets import get, make_config
    from perch.dev.tokenizer import build_tokenizer, save_tokenizer

    p, config = get(preset), make_config(preset)
    config.num_hidden_layers = layers
    out = work / f"{preset}-{layers}layers"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, p.dtype))
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(build_tokenizer(p.tokenizer_vocab), out)
    return out


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def child(preset: str, precision: str, max_context: int | None, work: Path, model_dir: str | None) -> dict:
    """One conversion in this process; returns its measurements."""
    import torch

    from perch.exporter.export import export, options_for
    from perch.loading import load_checkpoint
    from perch.dev.presets import preset_dir

    t0 = time.perf_counter()
    # dtype None keeps the stored dtype (bf16 for full-size presets, memory-mapped): no fp32 copy.
    ckpt = load_checkpoint(model_dir or preset_dir(preset), dtype=None)
    load_s, rss_loaded = time.perf_counter() - t0, _status_mb()
    anon = PeakAnon()
    unique = {id(v): v for v in ckpt.state_dict.values()}.values()
    params = sum(v.numel() for v in unique)
    weight_bytes = params * (2 if PRECISIONS[precision][0] == "fp16" else 4)  # as converted
    dtype, quantize = PRECISIONS[precision]
    options = options_for("coreml", precision=dtype, quantize=quantize, max_context=max_context)
    out = work / f"{preset}-{precision}"
    t1 = time.perf_counter()
    with torch.no_grad():
        manifest = export(ckpt, out, options)
    convert_s = time.perf_counter() - t1
    peak_anon = anon.stop()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "preset": preset, "precision": precision, "compute": dtype, "quantize": quantize,
        "params": params, "stored_dtype": str(next(iter(ckpt.state_dict.values())).dtype).removeprefix("torch."),
        "max_context": manifest.max_context, "load_s": round(load_s, 2), "convert_s": round(convert_s, 2),
        "layers": ckpt.config.num_hidden_layers, "weights_mb": round(weight_bytes / 2**20),
        "rss_after_load_mb": round(rss_loaded), "peak_rss_mb": round(peak_kb / 1024), "peak_anon_mb": round(peak_anon),
        "package_mb": round(_dir_mb(out / manifest.model_file), 2),
        "compressed_params": manifest.quantization.get("compressed", {}).get("params"),
    }


def run_child(preset: str, precision: str, max_context: int | None, work: Path, timeout: int,
              model_dir: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--precisions", precision, "--work", str(work)]
    if max_context:
        cmd += ["--max-context", str(max_context)]
    if model_dir:
        cmd += ["--model-dir", str(model_dir)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"preset": preset, "precision": precision, "error": (proc.stderr or proc.stdout)[-2000:]}
    result = json.loads(lines[-1])
    result["process_s"] = round(wall, 2)
    # The children's peak as the kernel accounts it (max over the children waited for so far).
    result["children_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return result


def table(rows: list[dict]) -> str:
    head = (f"{'preset':<16} {'layers':>6} {'precision':<11} {'convert s':>9} {'weights MB':>10} {'peak RSS MB':>11} "
            f"{'peak anon MB':>12} {'package MB':>10}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['preset']:<16} {'':>6} {r['precision']:<11} ERROR {r['error'].strip().splitlines()[-1][:80]}")
            continue
        out.append(f"{r['preset']:<16} {r['layers']:>6} {r['precision']:<11} {r['convert_s']:>9.1f} {r['weights_mb']:>10} "
                   f"{r['peak_rss_mb']:>11} {r['peak_anon_mb']:>12} {r['package_mb']:>10.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="falcon-mid")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument("--max-context", type=int, default=None, help="default: the exporter's (<= 2048)")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep the preset's widths but only this many layers (memory scaling on a small machine)")
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per conversion")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/coreml_convert-PRESET.json)")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    if args.child:
        print(json.dumps(child(args.preset, precisions[0], args.max_context, Path(args.work), args.model_dir)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="perch-coreml-bench-"))
    rows = []
    try:
        model_dir = truncated_preset(args.preset, args.layers, work) if args.layers else None
        for p in precisions:
            rows.append(run_child(args.preset, p, args.max_context, work, args.timeout, model_dir))
            shutil.rmtree(work / f"{args.preset}-{p}", ignore_errors=True)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = f"{args.preset}-{args.layers}layers" if args.layers else args.preset
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"coreml_convert-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "threads": os.environ.get("OMP_NUM_THREADS"), "date": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
