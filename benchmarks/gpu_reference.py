"""Decode speed of the fast CUDA reference (validate/gpu_reference.py) beside transformers, on full-size presets.

Random weights in bf16, batch 1, built directly on the GPU (no checkpoint on disk); both paths share the
same weight tensors and run behind the same Runtime step API, timed by `perch.validate.speed.measure` (warm-up,
median of repeats). Also prints how far the fast path's logits are from transformers' on the same tokens.
Targets (issue 5): Falcon-7B <= 8 ms/token (transformers ~26 ms), Falcon-Mamba-7B <= 10 ms/token
(transformers ~127 ms); the bandwidth floor is ~4.6 ms (docs/traps.md).

    python benchmarks/gpu_reference.py [--presets falcon-7b falcon-mamba-7b] [--prompt 512] [--steps 64]
                                       [--json $OUT/gpu_reference.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout (the GPU machine)
from perch.errors import PerchError  # noqa: E402


def build(preset: str, max_context: int, device: str = "cuda"):
    """(transformers runtime, fast runtime) over one random bf16 model on the GPU, weights shared.

    `device="cpu"` runs the same plumbing on CPU (torch kernels, no graphs, fp32): a dry run for tiny presets.
    """
    from transformers import AutoModelForCausalLM

    from perch.archs import detect_arch
    from perch.loading import Checkpoint
    from perch.dev.presets import make_config
    from perch.runtimes.pytorch.reference import ReferenceRuntime
    from perch.runtimes.pytorch.fast import FastFalcon, FastFalconMamba, open_gpu_reference

    config, dtype = make_config(preset), torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ckpt = Checkpoint(Path("."), config, detect_arch(config), model.state_dict(), {"preset": preset})
    del model  # the runtimes below take the same tensors (assign=True): one copy on the GPU
    hf = ReferenceRuntime(ckpt, device=device, dtype=dtype, max_context=max_context)
    if device == "cuda":
        return hf, open_gpu_reference(ckpt, dtype=dtype, max_context=max_context), ckpt
    cls, extra = (FastFalcon, {}) if ckpt.arch == "falcon" else (FastFalconMamba, {"kernels": "torch"})
    fast = cls(config, ckpt.state_dict, device="cpu", dtype=dtype, max_context=max_context, cuda_graphs=False, **extra)
    return hf, fast, ckpt


def parity(hf, fast, ids: np.ndarray, steps: int) -> dict:
    """Teacher-forced agreement of the fast path with transformers (both bf16): prefill, then `steps` tokens."""
    from perch.validate.runner import check
    from perch.validate.tolerances import Tolerances

    report = check(fast, hf, [ids.tolist()], max_new_tokens=steps, tolerances=Tolerances("bf16-info", *([None] * 9)))
    keep = ("max_abs", "rel_l2", "cosine", "mean_kl", "top1", "greedy_match")
    return {k: report.overall[k] for k in keep}


def run_preset(preset: str, prompt: int, steps: int, repeats: int, device: str = "cuda") -> dict:
    from perch.validate.speed import compare, measure

    t0 = time.time()
    hf, fast, ckpt = build(preset, max_context=prompt + steps + 8, device=device)
    built = time.time() - t0
    ids = np.random.default_rng(0).integers(1, ckpt.config.vocab_size, prompt)
    opts = dict(decode_tokens=steps, warmup=1, repeats=repeats)
    result = compare(measure(fast, ids, **opts), measure(hf, ids, **opts))
    result["parity"] = parity(hf, fast, ids[:64], 16)
    params = sum(v.numel() for v in {id(v): v for v in ckpt.state_dict.values()}.values())  # tied: count once
    result.update(preset=preset, build_s=round(built, 1), params_b=params / 1e9)
    fast.close()
    hf.close()
    del ckpt
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["falcon-7b", "falcon-mamba-7b"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the plumbing")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_reference.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = {}
    for preset in a.presets:
        try:
            rows[preset] = run_preset(preset, a.prompt, a.steps, a.repeats, a.device)
        except PerchError as e:
            rows[preset] = {"skipped": str(e)}
        print(json.dumps({preset: rows[preset]}, default=float), flush=True)
    where = torch.cuda.get_device_name() if a.device == "cuda" else "CPU dry run"
    dtype = "bf16" if a.device == "cuda" else "fp32"
    print(f"\n{where}, torch {torch.__version__}, {dtype}, batch 1, prompt {a.prompt}, "
          f"{a.steps} decode steps, median of {a.repeats}")
    print(f"{'preset':<18}{'transformers ms/tok':>21}{'perch ms/tok':>14}{'speed-up':>10}{'prefill ms (hf/perch)':>24}"
          f"{'top1':>7}{'max|d|':>9}")
    for preset, r in rows.items():
        if "skipped" in r:
            print(f"{preset:<18} skipped: {r['skipped']}")
            continue
        hf, fast, p = r["reference"], r["artifact"], r["parity"]
        print(f"{preset:<18}{hf['decode_ms_per_token']:>21.2f}{fast['decode_ms_per_token']:>14.2f}"
              f"{hf['decode_ms_per_token'] / fast['decode_ms_per_token']:>9.1f}x"
              f"{hf['ttft_ms']:>12.1f} / {fast['ttft_ms']:<9.1f}{p['top1']:>7.3f}{p['max_abs']:>9.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
