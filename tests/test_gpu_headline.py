"""The GPU headline benchmark, run on CPU: the exact command sent to the GPU machine, plus --dry-run (tiny twins,
fp32, the torch twins of the kernels), from a bare checkout as the GPU machine has it (perch not installed).
Every path runs (ONNX Runtime on its CPU provider) and the fp32 paths match transformers' full forward."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_headline  # noqa: E402
from gpu_headline import GPU_COMMAND, PATHS  # noqa: E402

# Drop the editable install's import hook, so the script must find perch the way it does on the GPU machine.
BARE = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_the_gpu_command_dry_runs_on_cpu(tmp_path):
    words = shlex.split(GPU_COMMAND)
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    while "=" in words[0]:  # leading VAR=value assignments
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["python", "benchmarks/gpu_headline.py"]
    args = [os.path.expandvars(w.replace("$OUT", env["OUT"])) for w in words[2:]]
    run = subprocess.run([sys.executable, "-c", BARE, str(ROOT / words[1]), *args, "--dry-run"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_headline.json").read_text())
    rows = result["rows"]
    assert {(r["preset"], r["path"], r["batch"]) for r in rows} == {
        (p, path, b) for p in ("falcon-tiny", "falcon-mamba-tiny") for path in PATHS for b in (1, 8)}
    assert [r for r in rows if r["status"] != "ok"] == []
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms_per_step"] > 0 and r["x_floor"] > 0 and r["peak_rss_gb"] > 0
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_step"])
        limit = {"transformers": 1e-9, "perch": 1e-9, "onnx-fp16": 1e-5, "onnx-int4": 0.05}[r["path"]]
        assert r["kl"] <= limit, r
        if r["path"] in ("transformers", "perch"):
            assert r["top1"] == 1.0 and r["max_abs"] < 1e-4, r
    assert all(p["floor_ms"] > 0 and p["weight_gb"] > 0 for p in result["presets"])
    table = (tmp_path / "out" / "gpu_headline.md").read_text()
    assert run.stdout.endswith(table) and "| preset | path | batch |" in table  # the table is printed last
    assert result["meta"]["dry_run"] and result["meta"]["device"] == "CPU (dry run)"


def test_benchmarks_md_quotes_the_command_that_is_tested():
    assert GPU_COMMAND in (ROOT / "BENCHMARKS.md").read_text()


def test_onnx_rows_say_skipped_without_onnxruntime_gpu(load_preset, tmp_path):
    """On the GPU machine as it is (onnxruntime without its CUDA provider) the ONNX rows are skipped, by name,
    before any export starts."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    a = gpu_headline.parse_args(["--device", "cuda", "--batches", "1", "8"])
    rows = gpu_headline.run_path("onnx-int4", load_preset("falcon-tiny"), a, None, None, None, tmp_path, 1.0)
    assert [r["batch"] for r in rows] == [1, 8] and not list(tmp_path.iterdir())
    assert all(r["status"].startswith("skipped: ") and "onnxruntime-gpu" in r["status"] for r in rows), rows
