"""The GPU headline: every inference path on full-size presets, against the bandwidth floor, in one command.

For each preset (random weights built on the device from `perch.dev.presets`, nothing read from disk):
transformers (eager PyTorch, its default attention), Perch's fast reference (runtimes/pytorch/fast.py:
static cache + CUDA graphs; Triton kernels for Falcon-Mamba), and ONNX Runtime fp16 and int4 when its CUDA
provider is importable (a clear "skipped" row when not). For each path: prefill of the prompt and greedy
decode at each batch size (median of repeats after a warm-up), peak device memory, and fidelity against
transformers' full forward over prompt + teacher-forced tokens (top-1 agreement, mean KL, max |logit diff|).
The floor is the time to read every weight once per decode step (weight bytes / --bandwidth); each decode
figure is also given as a multiple of it. Writes gpu_headline.json and gpu_headline.md under --out (default
$OUT, else benchmarks/results) and prints the table last.

    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python benchmarks/gpu_headline.py --device cuda --out $OUT

`--dry-run` runs the same command on CPU with each preset's tiny twin, fp32, a short prompt and the torch
twins of the kernels: every code path but the GPU's, in a minute (tests/test_gpu_headline.py runs it).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a bare checkout: perch is not installed on the GPU machine
import perch  # noqa: E402

if importlib.util.find_spec("perch.runtimes") is None:  # map the top-level folders in, as pyproject's package-dir does
    perch.__path__.append(str(ROOT))
from perch.errors import PerchError  # noqa: E402

PATHS = ("transformers", "perch", "onnx-fp16", "onnx-int4")
DRY_TWIN = {"falcon-7b": "falcon-tiny", "falcon-mamba-7b": "falcon-mamba-tiny", "falcon-40b": "falcon40b-tiny"}
H200_BANDWIDTH = 4.3e12  # bytes/s, a device-to-device copy measured on the GPU machine (read + write counted)
# The command sent to the GPU machine, kept here so the test can dry-run exactly it (BENCHMARKS.md quotes it).
GPU_COMMAND = "PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python benchmarks/gpu_headline.py --device cuda --out $OUT"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["falcon-7b", "falcon-mamba-7b"])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fidelity-tokens", type=int, default=16, help="teacher-forced tokens after the prompt")
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes/s for the floor")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    ap.add_argument("--dry-run", action="store_true", help="the same command on CPU: tiny twins, fp32, short")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.device, a.presets = "cpu", [DRY_TWIN.get(p, p) for p in a.presets]
        a.prompt, a.steps, a.repeats, a.fidelity_tokens = min(a.prompt, 24), min(a.steps, 3), 1, min(a.fidelity_tokens, 4)
    return a


def build(preset: str, device: str, dtype: torch.dtype, workdir: Path):
    """A random-weight Checkpoint built directly on `device` from the preset's definition (one weight copy)."""
    from transformers import AutoModelForCausalLM

    from perch.archs import detect_arch
    from perch.dev.presets import make_config
    from perch.loading import Checkpoint

    config = make_config(preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    sd = model.state_dict()
    del model  # the runtimes take these tensors as they are (assign=True): never two copies
    return Checkpoint(workdir, config, detect_arch(config), sd, {"preset": preset})


def weight_bytes(state_dict: dict) -> int:
    unique = {t.data_ptr(): t for t in state_dict.values()}  # tied embeddings count once
    return sum(t.numel() * t.element_size() for t in unique.values())


def open_path(path: str, ckpt, a: argparse.Namespace, dtype: torch.dtype, max_context: int, workdir: Path):
    """The runtime of one path; PerchError (a skipped row) when the path cannot run here."""
    if path == "transformers":
        from perch.runtimes.pytorch.reference import ReferenceRuntime

        return ReferenceRuntime(ckpt, device=a.device, dtype=dtype, max_context=max_context)
    if path == "perch":
        from perch.runtimes.pytorch.fast import FastFalcon, FastFalconMamba, open_gpu_reference

        if a.device == "cuda":
            return open_gpu_reference(ckpt, dtype=dtype, max_context=max_context)
        fast = {cls.ARCH: cls for cls in (FastFalcon, FastFalconMamba)}[ckpt.arch]  # torch twins on CPU, no graphs
        return fast(ckpt.config, ckpt.state_dict, device="cpu", dtype=dtype, max_context=max_context, cuda_graphs=False)
    return open_onnx(path, ckpt, a.device, max_context, workdir)


def open_onnx(path: str, ckpt, device: str, max_context: int, workdir: Path):
    """Export with Perch's exporter (fp16, or int4 MatMulNBits with fp16 compute) and open it in ORT."""
    from perch.runtimes.onnxrt import OnnxRuntime, providers_for

    providers_for(device)  # PerchError without onnxruntime-gpu's CUDA provider: before a slow export
    from perch.archs import arch_module
    from perch.exporter.export import export, options_for

    # The in-place cache (GroupQueryAttention) where the architecture has one: ORT's fast decode graph.
    variant = "inplace" if "inplace" in arch_module(ckpt.arch).FRONTENDS else "default"
    # int4-search: the default int4 calibrates through the checkpoint's tokenizer, which the bare presets lack
    opts = options_for("onnx", precision="fp16", quantize="int4-search" if path == "onnx-int4" else "none",
                       max_context=max_context, variant=variant)
    cpu = type(ckpt)(ckpt.model_dir, ckpt.config, ckpt.arch, {k: v.cpu() for k, v in ckpt.state_dict.items()},
                     ckpt.source)
    out = workdir / f"{ckpt.source.get('preset', ckpt.arch)}-{path}"
    t0 = time.perf_counter()
    export(cpu, out, opts)
    rt = OnnxRuntime(out, device=device)
    rt.export_s, rt.export_dir = time.perf_counter() - t0, out
    return rt


def fidelity(rt, seq: np.ndarray, prompt: int, ref: np.ndarray) -> dict:
    """Prefill `prompt` tokens, then teacher-force the rest of `seq`; compare each next-token distribution."""
    from perch.validate import metrics

    rt.reset(1)
    rows = [rt.prefill(seq[None, :prompt])[0, -1]]
    rows += [rt.step(np.array([tok]))[0] for tok in seq[prompt:-1]]
    art = np.stack(rows)
    return {"top1": metrics.top1_agreement(ref, art), "kl": metrics.kl_div(ref, art),
            "max_abs": metrics.max_abs(ref, art)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_run(rt, ids: np.ndarray, steps: int, device: str) -> tuple[float, list[float]]:
    """(prefill seconds, per-step decode seconds) for a batch, greedy; logits come back to the host each call."""
    rt.reset(ids.shape[0])
    _sync(device)
    t0 = time.perf_counter()
    tok = rt.prefill(ids)[:, -1].argmax(-1)
    prefill = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = rt.step(tok).argmax(-1)
        times.append(time.perf_counter() - t0)
    return prefill, times


def speed(rt, ids: np.ndarray, a: argparse.Namespace) -> dict:
    from perch.validate.speed import PeakMemory

    one_run(rt, ids, min(4, a.steps), a.device)  # warm-up: graph capture, Triton compiles, cuBLAS handles
    if a.device == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory() as mem:
        runs = [one_run(rt, ids, a.steps, a.device) for _ in range(a.repeats)]
    step_ms = statistics.median(t for r in runs for t in r[1]) * 1e3
    return {"prefill_ms": statistics.median(r[0] for r in runs) * 1e3, "decode_ms_per_step": step_ms,
            "decode_tok_s": ids.shape[0] * 1e3 / step_ms, "peak_gpu_gb": _gb(mem.gpu_mb), "peak_rss_gb": _gb(mem.rss_mb)}


def _gb(mb: float | None) -> float | None:
    return None if mb is None else mb / 1024


def run_path(path: str, ckpt, a, dtype, ref_logits, seq, workdir, floor_ms) -> list[dict]:
    base = {"preset": ckpt.source.get("preset", ckpt.arch), "path": path}
    ctx = a.prompt + max(a.steps, a.fidelity_tokens) + 8
    try:
        rt = open_path(path, ckpt, a, dtype, ctx, workdir)
    except PerchError as e:
        return [{**base, "batch": b, "status": f"skipped: {e}"} for b in a.batches]
    except Exception as e:  # one failing path must not cost the rest of the one GPU run
        traceback.print_exc()
        return [{**base, "batch": b, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"} for b in a.batches]
    rows = []
    attention = getattr(getattr(getattr(rt, "model", None), "config", None), "_attn_implementation", None)  # transformers
    try:
        fid = fidelity(rt, seq, a.prompt, ref_logits)
        for b in a.batches:
            ids = np.random.default_rng(b).integers(1, ckpt.config.vocab_size, (b, a.prompt))
            s = speed(rt, ids, a)
            rows.append({**base, "batch": b, "status": "ok", "runtime": rt.name, "attention": attention, **s, **fid,
                         "x_floor": s["decode_ms_per_step"] / floor_ms, "export_s": getattr(rt, "export_s", None)})
    except Exception as e:
        traceback.print_exc()
        done = {r["batch"] for r in rows}
        rows += [{**base, "batch": b, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"} for b in a.batches
                 if b not in done]
    finally:
        rt.close()
        if getattr(rt, "export_dir", None):  # a 7B fp16 export is 14 GB: free the disk for the next one
            shutil.rmtree(rt.export_dir, ignore_errors=True)
    return rows


def run_preset(preset: str, a: argparse.Namespace, workdir: Path) -> tuple[dict, list[dict]]:
    from perch.runtimes.pytorch.reference import ReferenceRuntime

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    ckpt = build(preset, a.device, dtype, workdir)
    nbytes = weight_bytes(ckpt.state_dict)
    info = {"preset": preset, "arch": ckpt.arch, "build_s": time.perf_counter() - t0, "weight_gb": nbytes / 1e9,
            "params_b": nbytes * 8 / torch.finfo(dtype).bits / 1e9, "floor_ms": nbytes / a.bandwidth * 1e3}
    seq = np.random.default_rng(0).integers(1, ckpt.config.vocab_size, a.prompt + a.fidelity_tokens)
    hf = ReferenceRuntime(ckpt, device=a.device, dtype=dtype, max_context=len(seq) + 8)
    ref_logits = hf.prefill(seq[None])[0, a.prompt - 1 : -1]  # one full forward: the trustworthy reference
    hf.close()
    rows = []
    for path in a.paths:
        t1 = time.perf_counter()
        rows += run_path(path, ckpt, a, dtype, ref_logits, seq, workdir, info["floor_ms"])
        print(f"  {preset} {path}: {time.perf_counter() - t1:.1f} s, {rows[-1]['status']}", flush=True)
        _free(a.device)
    del ckpt
    _free(a.device)
    return info, rows


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(meta: dict, presets: list[dict], rows: list[dict]) -> str:
    floors = {p["preset"]: p for p in presets}
    head = (f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
            f"transformers {meta['transformers']}, onnxruntime "
            f"{meta['onnxruntime']}, {meta['dtype']}, prompt {meta['prompt']}, {meta['steps']} decode steps, "
            f"median of {meta['repeats']}; floor = weight bytes / {meta['bandwidth'] / 1e12:.1f} TB/s\n\n")
    lines = ["| preset | path | batch | prefill ms | decode ms/step | tok/s | x floor | peak GPU GB | top-1 | KL | max abs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['preset']} | {r['path']} | {r['batch']} | {r['status']} |||||||||")
            continue
        lines.append(f"| {r['preset']} | {r['path']} | {r['batch']} | {r['prefill_ms']:.1f} | {r['decode_ms_per_step']:.2f} | "
                     f"{r['decode_tok_s']:.1f} | {r['x_floor']:.3g} | {_f(r['peak_gpu_gb'], '.1f')} | {r['top1']:.3f} | "
                     f"{r['kl']:.2e} | {r['max_abs']:.3g} |")
    tail = "\n\n" + "\n".join(f"- {p['preset']}: {p['params_b']:.3g} B params, {p['weight_gb']:.3g} GB of weights, "
                              f"floor {p['floor_ms']:.3g} ms/step, built in {p['build_s']:.1f} s" for p in floors.values())
    return head + "\n".join(lines) + tail + "\n"


def environment(a: argparse.Namespace) -> dict:
    import transformers

    try:
        import onnxruntime

        ort = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        ort = "not installed"
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "not installed"
    device = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (dry run)" if a.dry_run else "CPU"
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tri,
            "transformers": transformers.__version__, "onnxruntime": ort,
            "dtype": "bf16" if a.device == "cuda" else "fp32", "prompt": a.prompt, "steps": a.steps,
            "repeats": a.repeats, "batches": a.batches, "bandwidth": a.bandwidth, "dry_run": a.dry_run,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:]}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_headline.py --device cuda needs a CUDA GPU; add --dry-run to run it on CPU", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, meta = time.perf_counter(), environment(a)
    presets, rows = [], []
    for preset in a.presets:
        print(f"{preset}: building", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"perch-headline-{preset}-") as workdir:
            info, preset_rows = run_preset(preset, a, Path(workdir))
        presets.append(info)
        rows += preset_rows
        (out / "gpu_headline.json").write_text(json.dumps({"meta": meta, "presets": presets, "rows": rows}, indent=2) + "\n")
    meta["wall_s"] = time.perf_counter() - t0
    (out / "gpu_headline.json").write_text(json.dumps({"meta": meta, "presets": presets, "rows": rows}, indent=2) + "\n")
    table = markdown(meta, presets, rows)
    (out / "gpu_headline.md").write_text(table)
    print(f"\nwall {meta['wall_s']:.0f} s; wrote {out / 'gpu_headline.json'} and {out / 'gpu_headline.md'}\n")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
