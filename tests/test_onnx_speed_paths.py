"""The CPU speed/size paths of the ONNX export: one quantized copy of a tied embedding/lm_head, and the
session-option workloads. Each must leave the logits exactly as they were (same bytes, same kernels)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from perch.errors import PerchError
from perch.exporter import onnx_quant, onnx_tie, to_onnx
from perch.exporter.export import export, options_for
from perch.runtimes.onnx_session import WORKLOADS
from perch.runtimes.onnxrt import OnnxRuntime


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "mamba-int4"
    export("falcon-mamba-tiny", out, options_for("onnx", quantize="int4", max_context=64))
    return out


def _logits(path, workload="generate"):
    rt = OnnxRuntime(path, threads=1, workload=workload)
    ids = np.arange(1, 13).reshape(1, 12)
    first = rt.prefill(ids)
    return np.concatenate([first[:, -1], rt.step(np.array([7])), rt.step(np.array([9]))])


def test_tied_table_is_stored_once(int4_export):
    model = onnx.load(int4_export / "model.onnx")
    tables = [i.name for i in model.graph.initializer if i.name.endswith(".q") and i.dims[0] == 512]
    assert tables == ["core.lm_head.weight.T.q"], tables  # 512 = the tiny vocab: only the head's packed table
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    producers = {o: n for n in model.graph.node for o in n.output}
    scales = producers[gather.input[2]]  # float16 scales, cast to the graph's float32 ahead of the gather
    assert (scales.op_type, scales.input[0]) == ("Cast", "core.lm_head.weight.T.scales")
    assert gather.input[3] == "core.lm_head.weight.T.zero_points"
    from perch.spec import Manifest

    quant = Manifest.load(int4_export).quantization
    assert "tied" in quant["tied_table"]
    assert quant["tensors"]  # the head took the embedding's choice: one group holds both
    both = [g for g, names in quant["tensors"].items() if {"lm_head.weight", "backbone.embeddings.weight"} <= set(names)]
    assert both, quant["tensors"]


def test_shared_table_changes_no_logit(load_preset, tmp_path, monkeypatch):
    """The same graph quantized with and without sharing gives bit-identical logits from a smaller file."""
    import onnxruntime as ort
    import onnx_ir as ir
    import torch

    ckpt = load_preset("falcon-mamba-tiny")
    embedding = "backbone.embeddings.weight"
    assert onnx_tie.is_tied(ckpt.state_dict, embedding)
    outs, sizes = [], []
    share_table = onnx_tie.share_tied_table
    for share in (False, True):
        model, io = to_onnx.build_graph(ckpt, 64, torch.float32)
        monkeypatch.setattr(onnx_tie, "share_tied_table", share_table if share else (lambda *a: None))
        rec = onnx_quant.quantize(model, "int4", 32, embedding=to_onnx.PREFIX + embedding, tied=True)
        assert ("tied_table" in rec) == share
        path = tmp_path / f"m{share}.onnx"
        ir.save(model, path)
        sizes.append(path.stat().st_size)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.arange(1, 9).reshape(1, 8), "attention_mask": np.ones((1, 8), np.int64)}
        for x in sess.get_inputs()[2:]:
            feeds[x.name] = np.zeros([1 if isinstance(d, str) else d for d in x.shape], np.float32)
        outs.append(sess.run(["logits"], feeds)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    table = 512 * 64 * (4 + (16 + 4) / 32) / 8  # the tiny vocab x hidden at 4 bits, blocks of 32 (the head's)
    assert sizes[0] - sizes[1] >= 0.95 * table, sizes


@pytest.mark.parametrize("method, block", [("int4", 32), ("int4-mixed", 16), ("int4-rtn", 32)])
def test_tied_table_takes_the_heads_block(load_preset, method, block):
    """The shared table is blocked as the recipe blocks the head (ORT runs a 65024-row head in blocks of 16
    1.6x slower than in 32), not as it blocks an untied embedding (16 in int4), and lookups read those bytes."""
    import torch

    ckpt = load_preset("falcon-mamba-tiny")
    embedding = "backbone.embeddings.weight"
    model, _ = to_onnx.build_graph(ckpt, 64, torch.float32)
    rec = onnx_quant.quantize(model, method, 32, embedding=to_onnx.PREFIX + embedding, tied=True)
    assert "tied_table" in rec
    ops = {n.op_type: n for n in model.graph if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
           and (n.op_type == "GatherBlockQuantized" or n.inputs[1].name.startswith(to_onnx.PREFIX + "lm_head"))}
    assert {op: n.attributes["block_size"].value for op, n in ops.items()} == \
        {"MatMulNBits": block, "GatherBlockQuantized": block}
    head = next(g for g, names in rec["tensors"].items() if "lm_head.weight" in names)
    assert embedding in rec["tensors"][head] and head.endswith(f"blocks of {block}"), rec["tensors"]


def test_untied_checkpoint_keeps_both_tables(load_preset):
    ckpt = load_preset("falcon-mamba-tiny")
    sd = dict(ckpt.state_dict)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()  # a separate tensor: untied
    assert not onnx_tie.is_tied(sd, "backbone.embeddings.weight")


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_every_workload_gives_the_same_logits(int4_export, workload):
    np.testing.assert_array_equal(_logits(int4_export, workload), _logits(int4_export, "ort-default"))


def test_unknown_workload_is_refused_by_name(int4_export):
    with pytest.raises(PerchError, match="workload 'fast'.*generate"):
        OnnxRuntime(int4_export, workload="fast")


def test_chunked_prefill_continues_the_state(int4_export):
    """A Falcon-Mamba prompt fed in chunks gives the logits of one call (the state carries over)."""
    ids = np.arange(1, 14).reshape(1, 13)
    whole = OnnxRuntime(int4_export, threads=1)
    whole.prefill_chunk = 1 << 20
    chunked = OnnxRuntime(int4_export, threads=1)
    chunked.prefill_chunk = 4
    a, b = whole.prefill(ids), chunked.prefill(ids)
    assert a.shape == b.shape == (1, 13, 512)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(whole.step(np.array([3])), chunked.step(np.array([3])), atol=1e-4)


def _with_and_without_rewrites(ckpt, tmp_path):
    """The graph built without and with exporter/onnx_fuse.py's rewrites: (paths, outputs of a prefill and a
    decode-sized call each)."""
    import onnxruntime as ort
    import onnx_ir as ir
    import torch

    from perch.exporter import onnx_fuse

    paths, outs = [], []
    for rewrite in (False, True):
        real = onnx_fuse.apply
        if not rewrite:
            onnx_fuse.apply = lambda model: {}
        try:
            model, _ = to_onnx.build_graph(ckpt, 64, torch.float32)
        finally:
            onnx_fuse.apply = real
        path = tmp_path / f"c{rewrite}.onnx"
        ir.save(model, path)
        paths.append(path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for t in (7, 1):  # from an empty K,V cache (past length 0), random conv/SSM states
            feeds = {"input_ids": np.arange(1, t + 1).reshape(1, t), "attention_mask": np.ones((1, t), np.int64)}
            for i, x in enumerate(sess.get_inputs()[2:]):
                if x.name == "position_ids":
                    feeds[x.name] = np.arange(t).reshape(1, t)
                    continue
                shape = [(0 if d.startswith("past") else 1) if isinstance(d, str) else d for d in x.shape]
                feeds[x.name] = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
            outs.append(sess.run(None, feeds))
    for a, b in zip(outs[:2], outs[2:]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    return paths


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_depthwise_conv_is_rewritten_and_exact(load_preset, tmp_path):
    """Falcon-Mamba's causal conv leaves the graph as Slice/Mul/Add, with the logits of the Conv graph."""
    before, after = _with_and_without_rewrites(load_preset("falcon-mamba-tiny"), tmp_path)
    assert "Conv" in _ops(before) and "Conv" not in _ops(after)


@pytest.mark.parametrize("preset", ["falcon-mamba-tiny", "falcon-h1-tiny"])
def test_rms_norms_reach_ort_as_one_fused_kernel(preset, load_preset, tmp_path):
    """x * Reciprocal(Sqrt(v)) becomes x / Sqrt(v) (weightless norms times ones), with the same logits, and ORT
    then fuses every RMS norm into SimplifiedLayerNormalization (it skips the Reciprocal form: none before)."""
    import onnxruntime as ort

    paths = _with_and_without_rewrites(load_preset(preset), tmp_path)
    fused, pows = [], []
    for path in paths:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = _ops(opts.optimized_model_filepath)
        fused.append(ops.count("SimplifiedLayerNormalization"))
        pows.append(ops.count("Pow"))
    assert "Reciprocal" in _ops(paths[0]) and "Reciprocal" not in _ops(paths[1])
    # every norm fused, the weightless ones (scaled by ones) too: no Pow (x^2) is left for ORT to run
    assert fused[0] == 0 and fused[1] == pows[0] and pows[1] == 0, (fused, pows)


def test_logits_to_keep_is_optional_and_keeps_the_last_row(int4_export):
    """A client that feeds nothing gets every position (it is not a required input); Perch's runtime asks
    for the last one, in chunks too (Falcon-Mamba's prefill runs in chunks), and gets the same row."""
    import onnxruntime as ort

    from perch.spec import LOGITS_TO_KEEP

    sess = ort.InferenceSession(str(int4_export / "model.onnx"), providers=["CPUExecutionProvider"])
    assert LOGITS_TO_KEEP not in [i.name for i in sess.get_inputs()]
    assert LOGITS_TO_KEEP in [i.name for i in sess.get_overridable_initializers()]
    rt = OnnxRuntime(int4_export, threads=1)
    rt.prefill_chunk = 8  # 20 tokens: three chunks
    ids = np.arange(1, 21).reshape(1, 20)
    every = rt.prefill(ids)
    after_every = rt.step(np.array([5]))
    rt.reset(1)
    last = rt.prefill(ids, last_only=True)
    assert every.shape == (1, 20, 512) and last.shape == (1, 1, 512)
    np.testing.assert_allclose(last[0, 0], every[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rt.step(np.array([5])), after_every, rtol=1e-5, atol=1e-5)  # same state after
