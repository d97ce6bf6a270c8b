"""`perch check`'s library: a correct model passes; deliberately broken ones (a wrong decode position, a
perturbed weight, a dropped state write) fail, and the report names the metric, the step and (--bisect)
the layer; report.json validates against its schema; plots are valid PNGs. Tiny presets, CPU, real
transformers and Perch's own module; no mocks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from perch.runtimes.pytorch.eager import EagerRuntime
from perch.errors import PerchError
from perch.spec import Manifest
from perch.runtimes.pytorch.reference import ReferenceRuntime
from perch.validate import metrics
from perch.validate.bisect import bisect
from perch.validate.render import write_report
from perch.validate.report import validate_report
from perch.validate.runner import check
from tests.matrix import FIRST_PRESET
from perch.validate.controls import DroppedStateWrite, ShiftedDecode, perturbed
from perch.validate.tolerances import DEFAULTS, loosest, precision_of, tolerance_for, tolerance_for_precision

CTX = 64
N_NEW = 6
FP32 = tolerance_for_precision("fp32")
PRESET_OF = FIRST_PRESET
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# arch -> broken variant -> (runtime factory, where the first drift is: "prefill" at step 0 or the first
# "decode" step, the layer --bisect must name). Falcon-Mamba has no positions to get wrong.
BROKEN = {
    "falcon": {
        "position": (lambda c: ShiftedDecode(c, max_context=CTX), "decode", 0),
        "weight": (lambda c: EagerRuntime(perturbed(c), max_context=CTX), "prefill", 1),
        "state_write": (lambda c: DroppedStateWrite(c, max_context=CTX), "decode", 1),
    },
    "falcon_mamba": {
        "weight": (lambda c: EagerRuntime(perturbed(c), max_context=CTX), "prefill", 1),
        "state_write": (lambda c: DroppedStateWrite(c, max_context=CTX), "decode", 1),
    },
    "falcon_h1": {
        "position": (lambda c: ShiftedDecode(c, max_context=CTX), "decode", 0),
        "weight": (lambda c: EagerRuntime(perturbed(c), max_context=CTX), "prefill", 1),
        "state_write": (lambda c: DroppedStateWrite(c, max_context=CTX), "decode", 1),
    },
}
CASES = [(arch, bug) for arch, bugs in BROKEN.items() for bug in bugs]


@pytest.fixture(scope="module")
def setup(load_preset):
    """arch -> (checkpoint, transformers reference, prompts): two prompts of different lengths."""
    out = {}
    for arch, preset in PRESET_OF.items():
        ckpt = load_preset(preset)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, ckpt.config.vocab_size, n).tolist() for n in (9, 5)]
        out[arch] = (ckpt, ReferenceRuntime(ckpt, max_context=CTX), prompts)
    return out


def test_every_architecture_has_broken_variants():
    assert set(BROKEN) == set(PRESET_OF)



@pytest.mark.parametrize("arch", sorted(PRESET_OF))
def test_correct_model_passes(setup, arch):
    ckpt, ref, prompts = setup[arch]
    report = check(EagerRuntime(ckpt, max_context=CTX), ref, prompts, max_new_tokens=N_NEW, tolerances=FP32)
    assert report.passed, report.summary()
    assert report.first_drift is None and report.exit_code == 0
    assert report.overall["steps"] == sum(len(p) + N_NEW for p in prompts)
    assert report.overall["top1"] == 1.0 and report.overall["greedy_match"] == 1.0
    assert all(p.artifact_tokens == p.reference_tokens for p in report.prompts)
    validate_report(report.to_dict())


@pytest.mark.parametrize("arch,bug", CASES)
def test_broken_model_fails_and_is_localized(setup, arch, bug):
    ckpt, ref, prompts = setup[arch]
    make, phase, layer = BROKEN[arch][bug]
    art = make(ckpt)
    report = check(art, ref, prompts, max_new_tokens=N_NEW, tolerances=FP32)
    assert not report.passed and report.exit_code == 1
    drift = report.first_drift
    first_step = 0 if phase == "prefill" else len(prompts[0])  # the first decode step is the prompt's length
    assert (drift["prompt"], drift["step"], drift["phase"]) == (0, first_step, phase), report.summary()
    assert "rel_l2" in drift["metrics"]
    # every failure is gathered: each prompt's per-step failure, named by metric and first step
    named = {(f.prompt, f.metric, f.step) for f in report.failures}
    assert (0, "rel_l2", first_step) in named and (1, "rel_l2", 0 if phase == "prefill" else len(prompts[1])) in named
    if bug == "state_write":
        state = [f for f in report.failures if f.check == "state"]
        assert state and state[0].where.endswith(".1"), [f.line() for f in report.failures]
    assert f"first drift at prompt 0, step {first_step} ({phase})" in report.failure_line()
    assert report.failures[0].step == first_step and "FAIL" in report.summary()
    found = bisect(report, art, ref)
    assert found["layer"] == layer, found["message"]
    assert found["position"] == first_step and f"layer {layer}" in found["message"]
    report.bisect = found
    validate_report(report.to_dict())


def test_report_files_json_schema_and_pngs(setup, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpt, ref, prompts = setup["falcon"]
    art = DroppedStateWrite(ckpt, max_context=CTX)
    report = check(art, ref, prompts, max_new_tokens=N_NEW, tolerances=FP32, speed=True,
                   speed_options={"decode_tokens": 4, "repeats": 2})
    report.bisect = bisect(report, art, ref)
    files = write_report(report, tmp_path / "report")
    data = json.loads(files["json"].read_text())
    validate_report(data)  # what --json prints is report.to_dict(), the same object
    assert data["passed"] is False and data["bisect"]["layer"] == 1 and data["speed"]["ratios"]["decode_tok_s"] > 0
    for key in ("errors_png", "speed_png"):
        raw = files[key].read_bytes()
        assert raw[:8] == PNG_SIGNATURE
        image = plt.imread(files[key])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    md = files["markdown"].read_text()
    assert "# perch check: FAIL" in md and "error_per_step.png" in md and "layer 1" in md


def test_schema_rejects_a_broken_report(setup):
    import jsonschema

    ckpt, ref, prompts = setup["falcon_mamba"]
    data = check(EagerRuntime(ckpt, max_context=CTX), ref, prompts[:1], max_new_tokens=2, tolerances=FP32).to_dict()
    for breakage in ({"schema_version": 99}, {"passed": "yes"}, {"failures": [{"check": "teacher_forced"}]}):
        with pytest.raises(jsonschema.ValidationError):
            validate_report({**data, **breakage})
    del data["overall"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(data)


def test_speed_side_by_side(setup):
    ckpt, ref, prompts = setup["falcon"]
    report = check(EagerRuntime(ckpt, max_context=CTX), ref, prompts[:1], max_new_tokens=2, tolerances=FP32,
                   speed=True, speed_options={"decode_tokens": 4, "repeats": 2})
    sp = report.speed
    for side in ("reference", "artifact"):
        assert sp[side]["ttft_ms"] > 0 and sp[side]["decode_tok_s"] > 0 and sp[side]["peak_rss_mb"] > 10
        assert sp[side]["peak_gpu_mb"] is None
    ratio = sp["artifact"]["decode_tok_s"] / sp["reference"]["decode_tok_s"]
    assert sp["ratios"]["decode_tok_s"] == pytest.approx(ratio)
    assert report.passed and "decode (tok/s)" in report.summary()
    # a speed floor is a failure like any other (exit 1), named in the report
    strict = FP32.with_overrides(min_decode_speed_ratio=1e9)
    slow = check(EagerRuntime(ckpt, max_context=CTX), ref, prompts[:1], max_new_tokens=2, tolerances=strict,
                 speed=True, speed_options={"decode_tokens": 2, "repeats": 1})
    assert [f.metric for f in slow.failures] == ["decode_speed_ratio"]


def test_metrics_are_stable_and_exact():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 50)) * 1e4  # huge logits: a naive softmax overflows
    assert metrics.kl_div(ref, ref) == 0.0 and metrics.max_abs(ref, ref) == 0.0
    art = ref.copy()
    art[1, 0] += 1.0
    assert metrics.row_max_abs(ref, art).tolist() == [0.0, 1.0, 0.0]
    assert np.isfinite(metrics.row_kl(ref, art)).all() and metrics.cosine(ref, art) < 1.0
    flat, peaked = np.zeros((1, 4)), np.array([[10.0, 0, 0, 0]])
    p0 = np.exp(10) / (np.exp(10) + 3)  # KL(p || uniform) = sum p log p + log 4
    assert metrics.kl_div(peaked, flat) == pytest.approx(10 * p0 - np.log(np.exp(10) + 3) + np.log(4), rel=1e-9)
    assert metrics.topk_agreement(np.array([[5, 4, 3, 2, 1, 0.0]]), np.array([[5, 4, 3, 2, 0, 1.0]]), k=5) == 0.8
    assert metrics.greedy_match_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    state = metrics.state_divergence({"key.0": np.ones((1, 2, 3)), "ssm.0": np.ones(2)},
                                     {"key.0": np.ones((1, 2, 8)), "conv.0": np.ones(2)})
    assert state["key.0"] == {"max_abs": 0.0, "rel_l2": 0.0}  # a fixed-size buffer is cut to the valid part
    assert "missing" in state["ssm.0"]["error"] and "missing" in state["conv.0"]["error"]


def _manifest(dtype: str, method: str, state_dtype: str) -> Manifest:
    from perch.archs.falcon import io_spec
    from perch.dev.presets import make_config

    io = io_spec(make_config("falcon-tiny"), 64, state_dtype=state_dtype)
    return Manifest(format="onnx", arch="falcon", io=io, hf_config={}, max_context=64, dtype=dtype,
                    quantization={"method": method})


def test_tolerances_follow_precision_and_quantization():
    assert precision_of(_manifest("fp32", "none", "float32")) == "fp32"
    assert precision_of(_manifest("fp32", "none", "float16")) == "fp32+fp16state"
    assert precision_of(_manifest("fp16", "none", "float16")) == "fp16"
    assert precision_of(_manifest("fp16", "int4", "float16")) == "int4"
    assert precision_of(_manifest("fp16", "int4-mixed", "float16")) == "int4"
    assert precision_of(_manifest("fp16", "int4-rtn", "float16")) == "int4-rtn"  # min/max: its own limits
    for key in ("fp32", "fp16", "int8", "int4", "int4-rtn", "palettize4"):
        assert key in DEFAULTS and DEFAULTS[key].basis, f"{key} limits must say what they were measured on"
    fp32, fp16, int4 = (tolerance_for_precision(k) for k in ("fp32", "fp16", "int4"))
    assert fp32.max_abs < fp16.max_abs and fp16.mean_kl < int4.mean_kl and fp32.min_top1 >= int4.min_top1
    assert int4.mean_kl <= tolerance_for_precision("int4-rtn").mean_kl  # the error-minimising default is held tighter
    vs_bf16 = tolerance_for(_manifest("fp32", "none", "float32"), "bfloat16")
    assert vs_bf16 == loosest(fp32, tolerance_for_precision("bf16"))
    with pytest.raises(PerchError, match="reference dtype"):
        tolerance_for(_manifest("fp32", "none", "float32"), "float8")


class NaNAtSecondStep(EagerRuntime):
    name = "broken-nan"

    def _forward(self, ids, mask, positions):
        out = super()._forward(ids, mask, positions)
        return out * np.nan if mask.shape[1] == self.prompt_len + 2 else out


def test_nan_logits_fail_every_metric(setup):
    ckpt, ref, prompts = setup["falcon"]
    art = NaNAtSecondStep(ckpt, max_context=CTX)
    art.prompt_len = len(prompts[0])
    report = check(art, ref, prompts[:1], max_new_tokens=N_NEW, tolerances=FP32)
    assert not report.passed
    assert {f.metric for f in report.failures} >= {"max_abs", "rel_l2", "cosine", "kl"}
    assert report.first_drift["step"] == len(prompts[0]) + 1
    json.dumps(report.to_dict(), allow_nan=False)  # NaN is written as a string, as the schema says
    validate_report(report.to_dict())


def test_input_errors_are_perch_errors(tmp_path):
    from perch.cli import main
    from perch.validate.artifact import load_prompts

    assert main(["check", str(tmp_path / "missing")]) == 2  # no manifest: a usage error, exit 2
    with pytest.raises(PerchError, match="cannot read"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PerchError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.json").write_text('["one", "two"]')
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(tmp_path / "p.json") == ["one", "two"]
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    from perch.exporter.export import export, options_for

    out = tmp_path_factory.mktemp("onnx") / "falcon-tiny"
    export("falcon-tiny", out, options_for("onnx", max_context=CTX))
    return out


def perturb_onnx_layer(artifact, layer: int = 1, scale: float = 1.05) -> str:
    """Scale one of `layer`'s weight initializers in place: a broken conversion, not a broken model."""
    import onnx
    from onnx import numpy_helper

    path = artifact / "model.onnx"
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if f".h.{layer}." in t.name and len(t.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale), init.name))
    onnx.save(model, str(path))
    return init.name


def test_cli_check_of_an_onnx_artifact(onnx_artifact, tmp_path, capsys):
    """The command the CLI runs: exit 0 and schema-valid --json for a correct export; exit 1, the failure
    named on stderr, and a bisect that blames the conversion (the module agrees) for a corrupted one."""
    import shutil

    from perch.cli import main

    assert main(["check", str(onnx_artifact), "--json", "--max-new-tokens", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    validate_report(data)
    assert data["passed"] and data["artifact"]["format"] == "onnx" and len(data["prompts"]) == 3
    broken = tmp_path / "broken"
    shutil.copytree(onnx_artifact, broken)
    perturb_onnx_layer(broken)
    report_dir = tmp_path / "report"
    assert main(["check", str(broken), "--bisect", "--report", str(report_dir), "--max-new-tokens", "4"]) == 1
    out, err = capsys.readouterr()
    assert "check(s) failed; first drift at prompt 0, step 0 (prefill)" in err
    assert "FAIL" in out and "first drift: prompt 0, step 0 (prefill)" in out
    data = json.loads((report_dir / "report.json").read_text())
    validate_report(data)
    assert data["bisect"]["layer"] is None and "conversion to onnx" in data["bisect"]["message"]
    assert (report_dir / "error_per_step.png").read_bytes()[:8] == PNG_SIGNATURE
