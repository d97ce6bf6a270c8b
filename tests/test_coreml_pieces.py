"""Pieced Core ML conversion (exporter/coreml_pieces.py) equals the one-piece conversion on tiny models:
the same logits and states in Perch's MIL executor over a prefill and a decode step, bit for bit, and the
same weights. Also: the progress reporter, and the streamed preset writer."""
from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np
import pytest

import perch
from perch.archs.pieces import PIECES
from perch.errors import PerchError
from perch.runtimes.mil.executor import MilExecutor
from perch.runtimes.mil.program import MilProgram, PackedBlob

PRESETS = {"falcon": "falcon-tiny", "falcon_mamba": "falcon-mamba-tiny"}


def _feeds(program: MilProgram, ids: np.ndarray, end: int) -> dict:
    feeds = {"inputIds": ids.astype(np.int32)}
    names = [t.name for t in program.inputs("main")]
    t = ids.shape[1]
    if "causalMask" in names:
        full = np.triu(np.full((end, end), -1e4, np.float16), 1)
        feeds["causalMask"] = full[end - t:][None, None]
    return feeds


def _run(package) -> tuple[list[np.ndarray], dict]:
    program = MilProgram.load(package)
    ex = MilExecutor(program)
    state = ex.make_state()
    ids = np.random.default_rng(0).integers(0, 500, (1, 5))
    out = [ex.predict(_feeds(program, ids, 5), state)["logits"],
           ex.predict(_feeds(program, np.array([[7]]), 6), state)["logits"]]
    return out, state


def _weights(package) -> Counter:
    fn = MilProgram.load(package).program.functions["main"]
    return Counter(op.outputs[0].val.tobytes() for op in fn.operations
                   if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.size >= 16)


def _export(preset, out, pieced: bool, **kw):
    options = perch.options_for("coreml", max_context=64, pieced=pieced, **kw)
    return perch.export(preset, out, options)


def test_every_architecture_with_pieces_is_tested():
    assert set(PIECES) == set(PRESETS)


# Each architecture at one precision in `make test`, the other in `make test-extended` (~40 s a case).
@pytest.mark.parametrize("arch,precision", [
    ("falcon", "fp16"), ("falcon_mamba", "fp32"),
    pytest.param("falcon", "fp32", marks=pytest.mark.extended),
    pytest.param("falcon_mamba", "fp16", marks=pytest.mark.extended)])
def test_pieced_package_equals_the_one_piece_package(arch, precision, tmp_path, load_preset):
    ckpt = load_preset(PRESETS[arch])
    whole = _export(ckpt, tmp_path / "whole", False, precision=precision)
    pieced = _export(ckpt, tmp_path / "pieced", True, precision=precision)
    assert pieced.extras["pieced"] and not whole.extras["pieced"]
    assert [b.name for b in pieced.bindings] == [b.name for b in whole.bindings]
    (wa, sa), (wb, sb) = (_run(tmp_path / d / "model.mlpackage") for d in ("whole", "pieced"))
    for a, b in zip(wa, wb):
        np.testing.assert_array_equal(a, b)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name])
    # Same distinct weight values; a tied head is stored once per piece that uses it.
    assert set(_weights(tmp_path / "whole" / "model.mlpackage")) == set(_weights(tmp_path / "pieced" / "model.mlpackage"))


def test_pieced_int4_quantizes_like_the_one_piece_export(tmp_path, load_preset, monkeypatch):
    """The same int4 codes piece by piece as in one piece (same names, same recipe), a tied head included.

    The tiny preset ties its head to the embedding: one const in the one-piece program; pieced, the head is
    compressed as the table is and joined onto the embedding piece's copy, and the manifest counts it once.
    Neither export leaves coremltools' temporary packages behind (it deletes them only at exit)."""
    import tempfile

    made, real_mkdtemp = [], tempfile.mkdtemp
    sys_tmp = tmp_path / "sys-tmp"
    sys_tmp.mkdir()

    def mkdtemp(suffix=None, prefix=None, dir=None):
        path = real_mkdtemp(suffix, prefix, dir or str(sys_tmp))
        made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    ckpt = load_preset("falcon-mamba-tiny")
    whole = _export(ckpt, tmp_path / "whole", False, precision="fp16", quantize="int4")
    pieced = _export(ckpt, tmp_path / "pieced", True, precision="fp16", quantize="int4")
    packages = [p for p in made if p.endswith(".mlpackage")]
    assert packages and not [p for p in packages if os.path.exists(p)]
    for key in ("compressed", "tensors"):
        assert pieced.quantization[key] == whole.quantization[key], key
    assert abs(pieced.quantization["bits_per_weight"] - whole.quantization["bits_per_weight"]) < 0.005
    assert pieced.quantization["tied"] == ["core_lm_head_weight (stored once, with the table it is tied to)"]
    blocks = [op for op in MilProgram.load(tmp_path / "pieced" / "model.mlpackage").program.functions["main"].operations
              if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(blocks) == len(whole.quantization["tensors"]["4-bit gptq, blocks of 32"]) + 1  # + the one table
    (wa, _), (wb, _) = (_run(tmp_path / d / "model.mlpackage") for d in ("whole", "pieced"))
    for a, b in zip(wa, wb):
        np.testing.assert_array_equal(a, b)


def test_pieced_serves_a_client_profile(tmp_path, load_preset):
    """swift-transformers' mask contract (one row, one extra column) is built in the embedding piece."""
    ckpt = load_preset("falcon-tiny")
    kw = dict(precision="fp16", profile="swift-transformers")
    _export(ckpt, tmp_path / "whole", False, **kw)
    _export(ckpt, tmp_path / "pieced", True, **kw)
    outs = []
    for d in ("whole", "pieced"):
        ex = MilExecutor(MilProgram.load(tmp_path / d / "model.mlpackage"))
        state = ex.make_state()
        feeds = {"inputIds": np.array([[3, 4, 5]], np.int32), "causalMask": np.zeros((1, 1, 1, 4), np.float16)}
        outs.append(ex.predict(feeds, state)["logits"])
    np.testing.assert_array_equal(*outs)


def test_pieced_refuses_what_it_cannot_do(tmp_path, load_preset):
    with pytest.raises(PerchError, match="not available for falcon_h1"):
        _export(load_preset("falcon-h1-tiny"), tmp_path / "h1", True)
    with pytest.raises(PerchError, match="--multifunction"):
        _export(load_preset("falcon-tiny"), tmp_path / "mf", True, multifunction=True)


def test_progress_logs_plain_lines_off_a_terminal(monkeypatch):
    from perch.progress import Progress

    monkeypatch.setenv("PERCH_PROGRESS", "1")
    monkeypatch.setattr("perch.progress.LOG_EVERY", 0.0)
    out = io.StringIO()
    bar = Progress(4, "Core ML int4", unit="piece", stream=out, tty=False)
    for i in range(4):
        bar.advance(1, f"layer{i}")
    lines = out.getvalue().splitlines()
    assert lines and "\r" not in out.getvalue()
    assert lines[-1].startswith("Core ML int4: 4/4 pieces (100%)") and "ETA" in lines[-1]


def test_progress_draws_a_bar_with_an_eta_on_a_terminal():
    from perch.progress import Progress

    out = io.StringIO()
    bar = Progress(2, "ONNX weights", unit="tensor", stream=out, tty=True)
    bar.advance(1, "w0")
    assert out.getvalue().startswith("\r") and "ETA" in out.getvalue() and "1/2 tensors" in out.getvalue()


def test_streamed_preset_writer_matches_the_model_layout(tmp_path):
    """Every parameter transformers expects is written (tied head once), and the model loads strictly."""
    import torch
    from transformers import AutoModelForCausalLM

    from perch.dev.presets import make_config
    from perch.dev.streamed import write_streamed

    for name in PRESETS.values():
        out = write_streamed(make_config(name), torch.bfloat16, tmp_path / name)
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def _in_mapped_file(v) -> bool:
    import mmap

    while getattr(v, "base", None) is not None:
        v = v.base
    return isinstance(v, mmap.mmap)


@pytest.mark.parametrize("quantize", ["none", "int4", "palettize4"])
def test_lazy_weights_give_the_same_numbers(quantize, tmp_path, load_preset):
    """The executor's large-model mode (weights dequantized and upcast per use, freed after their last use,
    4-bit codes left packed in the weight file) computes exactly what the load-time folding does."""
    _export(load_preset("falcon-tiny"), tmp_path / "a", True, precision="fp16", quantize=quantize)
    package = tmp_path / "a" / "model.mlpackage"
    program, packed = MilProgram.load(package), MilProgram.load(package, packed=True)
    outs = []
    for prog, lazy in ((program, False), (program, True), (packed, True), (packed, False)):
        ex = MilExecutor(prog, lazy_weights=lazy)
        blobs = [v for v in ex._lazy_consts.values() if isinstance(v, PackedBlob)]
        # int4: every quantized weight's codes and uint4 offsets stay packed (9 weights in falcon-tiny);
        # palettize4: every weight's palette indices (a 7B package once failed to load them as uint8)
        per_weight = {"int4": 2, "palettize4": 1}.get(quantize, 0)
        assert len(blobs) == (per_weight * 9 if prog is packed and lazy else 0)
        # fp16: the packed load leaves every large weight in the memory-mapped file, none copied
        mapped = [v for v in ex._lazy_consts.values() if _in_mapped_file(v)]
        assert bool(mapped) == (quantize == "none" and prog is packed and lazy)
        state = ex.make_state()
        outs.append([ex.predict(_feeds(prog, np.array([[1, 2, 3]]), 3), state)["logits"],
                     ex.predict(_feeds(prog, np.array([[4]]), 4), state)["logits"], state])
    for other in outs[1:]:
        for a, b in zip(outs[0][:2], other[:2]):
            np.testing.assert_array_equal(a, b)
        for name in outs[0][2]:
            np.testing.assert_array_equal(outs[0][2][name], other[2][name])
