"""Perch's ONNX against the CPU peers, on one checkpoint, timed by one harness.

Rows: Perch ONNX (fp32, int8, int4, in-place int4 for Falcon), llama.cpp (f32, Q8_0, Q4_0, Q4_0 --pure),
OpenVINO via optimum-intel (fp32, int8, int4) and optimum's ONNX export (fp32, dynamic int8). Every row
runs in its own child process under the Python that has its engine (benchmarks/peer_engines.py), which
times the same prompt and the same teacher-forced token sequence the same way (wall time around the
engine call, median per step) and reports its own peak RSS. Rounds are interleaved (each round runs every
row once, in a rotated order), so a ratio is only ever taken between two rows of the same round.

Peers are optional: the script builds or finds them under the peers directory (benchmarks/peer_builds.py)
and prints what it skipped and why. The first run builds llama.cpp (many minutes on 2 cores).

    python benchmarks/cpu_peers.py                                     # both mid presets, 1 and 2 threads
    python benchmarks/cpu_peers.py --preset falcon-mid --threads 1 --rows perch-int4,llama-Q4_0-pure
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import peer_builds as pb  # noqa: E402

PERCH = {"perch-fp32": {}, "perch-int8": {"quantize": "int8", "block_size": 32},
         "perch-int4": {"quantize": "int4", "block_size": 32},
         "perch-int4-inplace": {"quantize": "int4", "block_size": 32, "variant": "inplace"}}
LLAMA = {"llama-f32": "f32", "llama-Q8_0": "Q8_0", "llama-Q4_0": "Q4_0", "llama-Q4_0-pure": "Q4_0-pure"}
OPENVINO = ("ov-fp32", "ov-int8", "ov-int4")
OPTIMUM = ("optimum-fp32", "optimum-int8")
ROWS = (*PERCH, *LLAMA, *OPENVINO, *OPTIMUM)
# Perch row -> the peer rows it is compared with (like-for-like precision first).
PAIRS = {"perch-int4": ("llama-Q4_0-pure", "llama-Q4_0", "ov-int4"),
         "perch-int4-inplace": ("llama-Q4_0-pure", "llama-Q4_0", "ov-int4"),
         "perch-int8": ("llama-Q8_0", "ov-int8", "optimum-int8"),
         "perch-fp32": ("llama-f32", "ov-fp32", "optimum-fp32")}

_EXPORT = """
import sys, json
from perch.dev.presets import preset_dir
from perch.exporter.export import export, options_for
export(preset_dir(sys.argv[1]), sys.argv[2], options_for("onnx", max_context=int(sys.argv[3]), **json.loads(sys.argv[4])))
"""


def prepare(row: str, preset: str, model_dir: Path, peers: Path, args) -> dict:
    """Build the row's artifact (cached); return how to run it: engine, path, python and extra flags."""
    art = peers / "artifacts" / preset
    if row in PERCH:
        out = art / row
        if not (out / "manifest.json").is_file():
            art.mkdir(parents=True, exist_ok=True)
            pb.run([sys.executable, "-c", _EXPORT, preset, out, str(args.max_context), json.dumps(PERCH[row])],
                   log=art / f"{row}.log", env=_env())
        return {"engine": "perch", "path": out, "python": sys.executable}
    if row in LLAMA:
        path = pb.gguf(peers, model_dir, art / "gguf", LLAMA[row])
        lib = pb.llama_library(peers)
        return {"engine": "llama.cpp", "path": path, "python": sys.executable,
                "flags": ["--lib-dir", lib, "--binding-dir", pb.llama_source(peers)]}
    if row in OPENVINO:
        path = pb.openvino(peers, model_dir, art / row, row)
        return {"engine": "openvino", "path": path, "python": pb.venv(peers, "openvino")}
    path = pb.optimum(peers, model_dir, art / row, row)
    return {"engine": "optimum", "path": path, "python": pb.venv(peers, "optimum")}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}


def run_row(plan: dict, threads: int, args) -> dict:
    cmd = [plan["python"], HERE / "peer_engines.py", "--engine", plan["engine"], "--path", plan["path"],
           "--threads", threads, "--prompt", args.prompt, "--steps", args.steps, "--repeats", args.repeats,
           *plan.get("flags", []), *(["--workload", args.workload] if args.workload and plan["engine"] == "perch" else [])]
    env = {**_env(), "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip()[-1500:]}
    return json.loads(lines[-1])


def bench_preset(preset: str, args, peers: Path) -> dict:
    from perch.dev.presets import get, preset_dir

    model_dir = preset_dir(preset)
    rows = [r for r in args.rows if not (r == "perch-int4-inplace" and get(preset).arch != "falcon")]
    plans, skipped = {}, {}
    for row in rows:
        try:
            plans[row] = prepare(row, preset, model_dir, peers, args)
            plans[row]["size_mb"] = pb.size_mb(Path(plans[row]["path"]))
        except pb.Skip as e:
            skipped[row] = str(e)
        print(f"  {row:<20} {'ready' if row in plans else 'SKIPPED: ' + skipped[row]}", flush=True)
    rounds: list[dict] = []
    for r in range(args.rounds):
        for threads in args.threads:
            names = list(plans)
            names = names[r % len(names):] + names[: r % len(names)] if names else names
            got = {}
            for name in names:
                got[name] = run_row(plans[name], threads, args)
                print(f"  round {r + 1} t{threads} {name:<20} {_brief(got[name])}", flush=True)
            rounds.append({"round": r + 1, "threads": threads, "rows": got})
    sizes = {n: p["size_mb"] for n, p in plans.items()}
    return {"preset": preset, "sizes_mb": sizes, "skipped": skipped, "rounds": rounds,
            "summary": summarize(rounds, sizes, args.threads)}


def _brief(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"].splitlines()[-1][:120]
    return f"decode {r['decode_ms']} ms  prefill {r['prefill_tok_s']} tok/s  peak {r['peak_rss_mb']} MiB"


def summarize(rounds: list[dict], sizes: dict, threads_list: list[int]) -> dict:
    """Per thread count: each row's medians over rounds, and each Perch/peer ratio's range over rounds."""
    out = {}
    for threads in threads_list:
        mine = [rd["rows"] for rd in rounds if rd["threads"] == threads]
        rows = {}
        for name in sizes:
            ok = [r[name] for r in mine if name in r and "error" not in r[name]]
            if ok:
                rows[name] = {"decode_ms": statistics.median(r["decode_ms"] for r in ok),
                              "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in ok),
                              "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "size_mb": sizes[name]}
        ratios = {}
        for ours, peers in PAIRS.items():
            for peer in peers:
                dec = [r[ours]["decode_ms"] / r[peer]["decode_ms"] for r in mine if _ok(r, ours, peer)]
                pre = [r[peer]["prefill_tok_s"] / r[ours]["prefill_tok_s"] for r in mine if _ok(r, ours, peer)]
                if dec:
                    ratios[f"{ours} / {peer}"] = {"decode": [round(min(dec), 2), round(max(dec), 2)],
                                                  "prefill": [round(min(pre), 2), round(max(pre), 2)]}
        out[str(threads)] = {"rows": rows, "ratios": ratios, "agreement": agreement(mine)}
    return out


def _ok(r: dict, a: str, b: str) -> bool:
    return a in r and b in r and "error" not in r[a] and "error" not in r[b]


def agreement(rounds: list[dict]) -> dict:
    """Share of teacher-forced steps whose argmax matches Perch fp32's: the rows run the same model."""
    out = {}
    for r in rounds[:1]:
        ref = r.get("perch-fp32", {}).get("argmax")
        for name, v in r.items():
            if ref and "argmax" in v and name != "perch-fp32":
                out[name] = round(sum(a == b for a, b in zip(ref, v["argmax"])) / len(ref), 2)
    return out


def table(result: dict) -> str:
    lines = []
    for threads, s in result["summary"].items():
        lines.append(f"\n{result['preset']}, {threads} thread(s): medians over rounds")
        lines.append(f"{'row':<20} {'decode ms':>9} {'prefill tok/s':>13} {'peak RSS MiB':>12} {'file MiB':>8} "
                     f"{'argmax = fp32':>13}")
        for name, r in s["rows"].items():
            agree = s["agreement"].get(name, "-")
            lines.append(f"{name:<20} {r['decode_ms']:>9.2f} {r['prefill_tok_s']:>13.1f} {r['peak_rss_mb']:>12} "
                         f"{r['size_mb']:>8} {agree:>13}")
        lines.append(f"{'Perch / peer (same round)':<44} {'decode time':>14} {'peer prefill / ours':>20}")
        for pair, v in s["ratios"].items():
            lines.append(f"{pair:<44} {v['decode'][0]:>6.2f}-{v['decode'][1]:<7.2f} "
                         f"{v['prefill'][0]:>11.2f}-{v['prefill'][1]:.2f}")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="falcon-mid,falcon-mamba-mid", help="comma list of presets")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="prefills timed per run (after one warm-up)")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--workload", default=None, help="Perch rows: OnnxRuntime session-options preset")
    ap.add_argument("--peers-dir", default=None, help="where peers are built and cached "
                    "(default $PERCH_PEER_DIR or ~/.cache/perch/peers)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per timed child")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu_peers.json)")
    args = ap.parse_args(argv)
    args.presets = [p for p in args.preset.split(",") if p]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    args.rows = [r for r in args.rows.split(",") if r]
    if bad := [r for r in args.rows if r not in ROWS]:
        ap.error(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    peers = pb.peers_dir(args.peers_dir)
    results = []
    for preset in args.presets:
        print(f"{preset}: preparing rows (peers in {peers})", flush=True)
        results.append(bench_preset(preset, args, peers))
        print(table(results[-1]), flush=True)
    import onnxruntime

    meta = {"machine": platform.platform(), "cpu": _cpu(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "llama-cpp-python source": pb.LLAMA_CPP_PYTHON,
            "venvs": {n: [r for r in pb.VENVS[n]] for n in pb.VENVS}, "prompt": args.prompt, "steps": args.steps,
            "rounds": args.rounds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = Path(args.out or HERE / "results" / "cpu_peers.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
