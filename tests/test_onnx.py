"""ONNX exports run in ONNX Runtime (CPU, through the same IO-binding path CUDA uses) and equal transformers.

Each tiny preset is traced once per variant and dtype for the whole module (tracing is the slow part);
quantized artifacts are made from the fp32 exports with `quantize_artifact`, and one through the full
`export()` path. Every comparison runs the same script: a prefill of 16 (batch 2: the second row
left-padded by 4), 8 greedy steps, then a second chunk of 5 tokens, scored on the real positions.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from perch.exporter import to_onnx
from perch.exporter.export import export, options_for
from perch.errors import PerchError
from perch.dev.presets import PRESETS
from perch.spec import Manifest
from perch.runtimes.onnxrt import OnnxRuntime
from perch.runtimes.pytorch.reference import ReferenceRuntime
from tests.matrix import TINY_PRESETS

MAX_CONTEXT = 64
FP32_TOL = 1e-4
PREFILL, STEPS, CHUNK, PADS = 16, 8, 5, 4
# Bounds on max |logit - reference| over the script, teacher-forced on the reference's tokens, batch 2
# (random tiny presets: logits of std ~0.8, max ~7), each ~2-3x the value measured on 2026-11-23 with
# onnxruntime 1.32, 1 thread. int8/int4 use accuracy_level 4 (int8 activations), which adds ~1e-2 alone.
#   fp16:           falcon-tiny 3.6e-4   falcon-mamba-tiny 2.3e-3
#   int8 block 32:  falcon-tiny 1.2e-2   falcon-mamba-tiny 6.2e-2
#   int4 block 32:  falcon-tiny 0.12     falcon-mamba-tiny 0.78  (Mamba's recurrence compounds the error)
#   int4 block 128: falcon-tiny 0.084    falcon-mamba-tiny 0.25
#   fp16 + int4:    falcon-tiny 0.12     falcon-mamba-tiny 0.78
# falcon-h1-tiny (2026-12-01, onnxruntime 1.31.1, logits std 0.81, max 3.9): fp16 2.3e-3, int8 5.8e-2,
#   int4 0.78, int4 block 128 0.39, fp16 + int4 0.84.
BOUNDS = {
    ("falcon-h1-tiny", "fp16"): 6e-3, ("falcon-h1-tiny", "int8"): 0.15, ("falcon-h1-tiny", "int4"): 1.6,
    ("falcon-h1-tiny", "int4-128"): 0.8, ("falcon-h1-tiny", "fp16-int4"): 1.7,
    ("falcon-tiny", "fp16"): 1e-3, ("falcon-mamba-tiny", "fp16"): 6e-3,
    ("falcon-tiny", "int8"): 3e-2, ("falcon-mamba-tiny", "int8"): 0.15,
    ("falcon-tiny", "int4"): 0.3, ("falcon-mamba-tiny", "int4"): 1.6,
    ("falcon-tiny", "int4-128"): 0.25, ("falcon-mamba-tiny", "int4-128"): 0.6,
    ("falcon-tiny", "fp16-int4"): 0.3, ("falcon-mamba-tiny", "fp16-int4"): 1.6,
}
QUANT = {"int8": ("int8", 32), "int4": ("int4", 32), "int4-128": ("int4", 128)}
EXTERNAL = ("falcon40b-tiny", "fp32")  # exported with the external-data threshold forced to 0


# ---------------------------------------------------------------- artifacts, made once per module
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, load_preset):
    """(preset, kind) -> export dir; kind: fp32, fp16, inplace, int8, int4, int4-128, fp16-int4, int4-export."""
    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str, kind: str = "fp32") -> Path:
        if (name, kind) in made:
            return made[(name, kind)]
        out = root / f"{name}-{kind}"
        if kind in QUANT:
            to_onnx.quantize_artifact(get(name), out, *QUANT[kind])
        elif kind == "fp16-int4":  # MatMulNBits with fp16 activations and scales
            to_onnx.quantize_artifact(get(name, "fp16"), out, "int4", 32)
        else:
            opts = {"fp16": dict(precision="fp16"), "inplace": dict(variant="inplace"),
                    # int4-search: the recipe quantize_artifact's int4 falls back to without a checkpoint to
                    # calibrate on (GPTQ's own end-to-end figures: tests/test_quant.py, benchmarks/quant_quality.py)
                    "int4-export": dict(quantize="int4-search", block_size=32)}.get(kind, {})
            with pytest.MonkeyPatch.context() as mp:
                if (name, kind) == EXTERNAL:  # force the external-data path a 7B export takes
                    mp.setattr(to_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
                export(load_preset(name), out, options_for("onnx", max_context=MAX_CONTEXT, **opts))
        made[(name, kind)] = out
        return out

    return get


def script(runtime, batch: int, vocab: int, forced: np.ndarray | None = None, seed: int = 0):
    """(logits (B, T, V) over prefill + steps + chunk, greedy tokens (B, STEPS), real-position mask (B, T)).

    `forced`: feed these tokens instead of the runtime's own greedy picks (teacher forcing), so a
    quantized model is scored on the reference's path: on flat random-weight logits a near-tie flips.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, PREFILL))
    mask = np.ones((batch, PREFILL), np.int64)
    if batch > 1:
        mask[1, :PADS] = 0
    runtime.reset(batch)
    logits = [runtime.prefill(ids, mask)]
    tok, tokens = logits[0][:, -1].argmax(-1), []
    for i in range(STEPS):
        tokens.append(tok)
        step = runtime.step(tok if forced is None else forced[:, i])
        logits.append(step[:, None])
        tok = step.argmax(-1)
    logits.append(runtime.prefill(rng.integers(1, vocab, (batch, CHUNK))))
    real = np.concatenate([mask, np.ones((batch, STEPS + CHUNK), np.int64)], axis=1) > 0
    return np.concatenate(logits, axis=1), np.stack(tokens, axis=1), real


@pytest.fixture(scope="module")
def reference(load_preset):
    """(preset, batch) -> the reference runtime's script output, computed once."""
    done = {}

    def get(name: str, batch: int):
        if (name, batch) not in done:
            ckpt = load_preset(name)
            done[(name, batch)] = script(ReferenceRuntime(ckpt), batch, ckpt.config.vocab_size)
        return done[(name, batch)]

    return get


def max_error(artifact: Path, name: str, batch: int, reference, *, forced: bool = False) -> tuple[float, bool]:
    """Max |logit - reference| on real positions, and whether the greedy tokens were identical."""
    rt = OnnxRuntime(artifact, threads=1)
    ref_logits, ref_tokens, _ = reference(name, batch)
    logits, tokens, real = script(rt, batch, rt.vocab_size, ref_tokens if forced else None)
    assert np.isfinite(logits).all()
    return float(np.abs(logits - ref_logits)[real].max()), bool((tokens == ref_tokens).all())


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_fp32_matches_reference(artifacts, reference, name, batch):
    err, same_tokens = max_error(artifacts(name), name, batch, reference)
    assert err <= FP32_TOL, f"{name} batch {batch}: max |logit diff| {err:.2e} > {FP32_TOL}"
    assert same_tokens


# Above MAX_CONTEXT (its own export) and above several SSD chunks: Falcon-H1's graph once fixed its chunk
# axis at the trace sample's one chunk, and failed on every prompt longer than a chunk.
LONG_PREFILL = 100


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_long_prefill_then_step_matches_reference(tmp_path, load_preset, name):
    ckpt = load_preset(name)
    export(ckpt, tmp_path / "a", options_for("onnx", max_context=2 * LONG_PREFILL))
    ids = np.random.default_rng(0).integers(1, ckpt.config.vocab_size, (1, LONG_PREFILL + 1))
    got, ref = OnnxRuntime(tmp_path / "a", threads=1), ReferenceRuntime(ckpt)
    for rt in (got, ref):
        rt.reset(1)
    a = [got.prefill(ids[:, :-1])[:, -1], got.step(ids[:, -1])]
    b = [ref.prefill(ids[:, :-1])[:, -1], ref.step(ids[:, -1])]
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) <= FP32_TOL


@pytest.mark.parametrize("name", ["falcon-tiny", "falcon40b-tiny"])
def test_inplace_variant_matches_reference(artifacts, reference, name):
    path = artifacts(name, "inplace")
    graph = onnx.load(path / "model.onnx", load_external_data=False)
    layers = PRESETS[name].config["num_hidden_layers"]
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node) == layers
    for batch in (1, 2):
        err, same_tokens = max_error(path, name, batch, reference)
        assert err <= FP32_TOL and same_tokens, f"{name} inplace batch {batch}: {err:.2e}"


def test_inplace_buffer_is_written_in_place(artifacts):
    rt = OnnxRuntime(artifacts("falcon-tiny", "inplace"), threads=1)
    rt.reset(1)
    before = {k: v.data_ptr() for k, v in rt.values.items()}
    rt.prefill(np.arange(1, 9)[None])
    rt.step(np.array([3]))
    assert {k: v.data_ptr() for k, v in rt.values.items()} == before
    assert rt.state()["key.0"].shape[2] == 9 and np.abs(rt.state()["key.0"]).sum() > 0


def test_state_matches_reference(artifacts, load_preset):
    for name in ("falcon-tiny", "falcon-mamba-tiny", "falcon-h1-tiny"):
        ref, rt = ReferenceRuntime(load_preset(name)), OnnxRuntime(artifacts(name), threads=1)
        for r in (ref, rt):
            r.reset(1)
            r.prefill(np.arange(1, 13)[None])
            r.step(np.array([7]))
        want, got = ref.state(), rt.state()
        assert want.keys() == got.keys()
        assert max(np.abs(want[k] - got[k]).max() for k in want) <= FP32_TOL


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4", "int4-128", "fp16-int4"])
@pytest.mark.parametrize("name", ["falcon-tiny", "falcon-mamba-tiny", "falcon-h1-tiny"])
def test_reduced_precision_error_is_bounded(artifacts, reference, name, kind):
    err, _ = max_error(artifacts(name, kind), name, 2, reference, forced=True)
    assert err <= BOUNDS[(name, kind)], f"{name} {kind}: max |logit diff| {err:.3g} > {BOUNDS[(name, kind)]}"
    assert err > 0  # a quantized model that matches exactly was not quantized


def test_quantization_manifest_says_what_and_why(artifacts):
    fp32 = Manifest.load(artifacts("falcon-mamba-tiny"))
    q = Manifest.load(artifacts("falcon-mamba-tiny", "int4"))
    assert q.quantization["method"] == "int4" and q.quantization["block_size"] == 32
    assert "lm_head.weight" in q.quantization["quantized"]
    assert "backbone.embeddings.weight" in q.quantization["quantized"]
    kept = q.quantization["not_quantized"]
    assert "dt_proj" in " ".join(kept) and all(reason for reason in kept.values())
    assert q.quantization["size_bytes"] < 0.4 * fp32.model_bytes
    # GGUF's count (MatMul/embedding weights only): the SSM's A and conv taps are folded constants here, so
    # neither count holds them and the two agree
    assert 4.6 <= q.quantization["bits_per_linear_weight"] <= q.quantization["bits_per_weight"]
    ops = {n.op_type for n in onnx.load(artifacts("falcon-mamba-tiny", "int4") / "model.onnx").graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops


def test_export_path_quantizes_like_quantize_artifact(artifacts):
    """int4 through export() (weights quantized from the checkpoint) == int4 from the fp32 artifact."""
    direct = OnnxRuntime(artifacts("falcon-tiny", "int4-export"), threads=1)
    later = OnnxRuntime(artifacts("falcon-tiny", "int4"), threads=1)
    ids = np.arange(1, 17)[None]
    for rt in (direct, later):
        rt.reset(1)
    assert np.abs(direct.prefill(ids) - later.prefill(ids)).max() <= 1e-5
    assert direct.manifest.quantization["quantized"] == later.manifest.quantization["quantized"]


# ---------------------------------------------------------------- large models
def test_external_data_when_large(artifacts):
    path = artifacts(*EXTERNAL)
    m = Manifest.load(path)
    assert m.extras["external_data"] and (path / "model.onnx.data").is_file()
    assert (path / "model.onnx").stat().st_size < (path / "model.onnx.data").stat().st_size
    assert m.extras["ir_version"] == onnx.load(path / "model.onnx", load_external_data=False).ir_version <= 10


def test_export_never_materialises_stand_in_weights(load_preset):
    """The traced module holds zero-stride stand-ins: tracing allocates nothing weight-sized."""
    ckpt = load_preset("falcon-tiny")
    stand = to_onnx.stand_in_weights(ckpt.state_dict, to_onnx.TORCH_DTYPES["fp32"])
    assert all(t.stride() == (0,) * t.dim() for t in stand.values() if t.dim())
    assert stand.keys() == ckpt.state_dict.keys()


# ---------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_graph_that_is_not_ours(artifacts, tmp_path):
    path = _copy(artifacts("falcon-tiny"), tmp_path / "foreign")
    x = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path / "model.onnx")
    m = Manifest.load(path)
    m.model_bytes = None
    m.save(path)
    with pytest.raises(PerchError, match="not `perch export`"):
        OnnxRuntime(path)


def test_corrupted_or_truncated_model(artifacts, tmp_path):
    path = _copy(artifacts("falcon-tiny"), tmp_path / "bad")
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(PerchError, match="truncated"):
        OnnxRuntime(path)
    (path / "model.onnx").write_bytes(b"\x07garbage" * (len(data) // 8) + b"\x00" * (len(data) % 8))
    with pytest.raises(PerchError, match="cannot load"):
        OnnxRuntime(path)


def test_missing_external_data(artifacts, tmp_path):
    path = _copy(artifacts(*EXTERNAL), tmp_path / "noext")
    (path / "model.onnx.data").unlink()
    with pytest.raises(PerchError, match="model.onnx.data missing"):
        OnnxRuntime(path)


def test_fp16_export_too_large_for_cpu_memory_is_refused_by_name(artifacts, monkeypatch):
    """ORT's CPU kernels upcast fp16 weights to fp32 at load: a 7B fp16 export was OOM-killed at 18.8 GB.
    Refused before ORT is asked when it cannot fit; loads when it can; quantized fp16 graphs are not fp16 weights."""
    from perch.runtimes import onnxrt

    OnnxRuntime(artifacts("falcon-tiny", "fp16")).close()
    monkeypatch.setattr(onnxrt, "available_bytes", lambda: 1)  # tiny weights: any need exceeds it
    with pytest.raises(PerchError, match=r"fp16 ONNX export .* --quantize int4") as err:
        OnnxRuntime(artifacts("falcon-tiny", "fp16"))
    assert "GB is available" in str(err.value)
    OnnxRuntime(artifacts("falcon-tiny", "fp16-int4")).close()  # int4 weights: no fp16 table to upcast


def test_manifest_that_does_not_match_the_graph(artifacts, tmp_path):
    path = _copy(artifacts("falcon-tiny"), tmp_path / "mismatch")
    raw = json.loads((path / "manifest.json").read_text())
    raw["io"]["states"][0]["dtype"] = "float16"
    raw["io"]["outputs"][0]["shape"][-1] = 999
    raw["io"]["inputs"] = raw["io"]["inputs"][:2]
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(PerchError) as err:
        OnnxRuntime(path)
    text = str(err.value)  # every problem reported at once
    assert "float32 in the graph, float16" in text and "999" in text and "'position_ids' is in the graph" in text


@pytest.mark.parametrize("bad,needle", [
    (np.array([[1.5, 2.0]]), "must be integers"),
    (np.ones((1, 2, 3), np.int64), "shape"),
    (np.array([[1, 512]]), "outside the vocabulary"),
    (np.array([[-1, 2]]), "outside the vocabulary"),
])
def test_bad_inputs_are_perch_errors(artifacts, bad, needle):
    rt = OnnxRuntime(artifacts("falcon-tiny"), threads=1)
    rt.reset(1)
    with pytest.raises(PerchError, match=needle):
        rt.prefill(bad)


@pytest.mark.parametrize("kind", ["fp32", "inplace"])
def test_context_beyond_max_context(artifacts, kind):
    rt = OnnxRuntime(artifacts("falcon-tiny", kind), threads=1)
    rt.reset(1)
    rt.prefill(np.ones((1, MAX_CONTEXT - 1), np.int64))
    rt.step(np.array([1]))  # exactly max_context tokens: fine
    with pytest.raises(PerchError, match="max context"):
        rt.step(np.array([1]))


def test_cuda_without_onnxruntime_gpu(artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(PerchError, match="onnxruntime-gpu"):
        OnnxRuntime(artifacts("falcon-tiny"), device="cuda")
    with pytest.raises(PerchError, match="device"):
        OnnxRuntime(artifacts("falcon-tiny"), device="tpu")


def test_onnx_runtime_never_imports_exporter():
    code = ("import sys, perch.runtimes.onnxrt; bad = [m for m in sys.modules if m.split('.')[0] == 'exporter'];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_quantizing_logs_progress_per_tensor(artifacts, tmp_path, monkeypatch, capsys):
    """A 7B search runs for tens of minutes before the file is written: the quantizer says where it is."""
    monkeypatch.setenv("PERCH_PROGRESS", "1")
    monkeypatch.setattr("perch.progress.LOG_EVERY", 0.0)
    to_onnx.quantize_artifact(artifacts("falcon-tiny", "fp32"), tmp_path / "q", "int4-rtn")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ONNX int4-rtn:")]
    done, total = lines[-1].split()[2].split("/")  # "ONNX int4-rtn: 9/9 tensors (100%) ..."
    assert len(lines) > 2 and done == total and int(total) > 2
