"""Real ONNX clients run Perch exports unchanged, with transformers' greedy tokens.

ONNX Runtime GenAI (pip `onnxruntime-genai`, a test dependency) and transformers.js on onnxruntime-node
(npm `@huggingface/transformers`, installed on first use by tests/clients/install.sh) run the exports as a
user would (tests/clients/harness.py). optimum's ORTModelForCausalLM runs in its own environment:
tests/test_examples.py::test_optimum_load. Models: the trained 7B-style multi-query fixture and the
40B-style grouped preset (`falcon40b-tiny`). Falcon-Mamba: both clients refuse it, and so do we, clearly.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from perch.cli import main
from perch.dev.fixtures import fixture_dir
from perch.dev.presets import preset_dir
from perch.exporter.export import export
from perch.exporter.options import OnnxOptions
from perch.exporter.to_onnx import quantize_artifact
from perch.spec import Manifest
from perch.validate.tolerances import precision_of, tolerance_for_precision
from tests.clients import harness

NEW_TOKENS = 16
PROMPTS = ([472, 499, 442], [413, 391, 88, 9, 199])  # "The list type", and a few ids from the fixture's corpus
MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def models() -> dict:
    return {"falcon": fixture_dir("falcon"), "falcon40b": preset_dir("falcon40b-tiny"),
            "falcon_h1": preset_dir("falcon-h1-tiny")}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, models):
    """"model[:key=value,...]" -> its export directory, made once per module on first use.

    `quantize=int8|int4` quantizes the model's float export without tracing again (quantize_artifact)."""
    root, made = tmp_path_factory.mktemp("clients-onnx"), {}

    def get(name: str):
        if name not in made:
            model, _, rest = name.partition(":")
            opts = dict(kv.split("=") for kv in rest.split(",") if kv)
            out = root / name.replace(":", "-").replace(",", "-").replace("=", "-")
            if "quantize" in opts:
                quantize_artifact(get(model), out, opts["quantize"])
            else:
                export(models[model], out, OnnxOptions(max_context=MAX_CONTEXT, **opts))
            made[name] = out
        return made[name]

    return get


def assert_logits_close(ref: np.ndarray, got: np.ndarray, artifact) -> None:
    tol = tolerance_for_precision(precision_of(Manifest.load(artifact)))
    n = min(len(ref), len(got))
    rel = np.linalg.norm(got[:n] - ref[:n], axis=-1) / np.linalg.norm(ref[:n], axis=-1)
    assert rel.max() <= tol.rel_l2, f"relative L2 {rel.max():.3g} above the {tol.precision} limit {tol.rel_l2}"
    if tol.max_abs is not None:
        assert np.abs(got[:n] - ref[:n]).max() <= tol.max_abs


# slow: each is another export of the trained fixture; benchmarks/clients.py runs the same cases.
SLOW = pytest.mark.slow
# `make test-extended` only: the suite keeps the fixture at fp32, in-place and int8/int4, and the 40B-style at fp32
EXTENDED = [pytest.mark.slow, pytest.mark.extended]
GENAI_CASES = [
    "falcon", "falcon:variant=inplace", pytest.param("falcon:precision=fp16", marks=EXTENDED),
    pytest.param("falcon:quantize=int8", marks=SLOW), "falcon:quantize=int4",
    "falcon40b", pytest.param("falcon40b:variant=inplace", marks=EXTENDED),
]


@pytest.mark.parametrize("case", GENAI_CASES)
def test_genai_runs_falcon_export_unchanged(case, exports, models):
    """onnxruntime_genai.Model(dir) + Generator on the export as written: transformers' tokens."""
    artifact = exports(case)
    config = json.loads((artifact / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] == ("inplace" in case)
    quantized = "quantize" in case
    for ids in PROMPTS:
        ref_tokens, ref_logits = harness.reference(models[case.partition(":")[0]], ids, NEW_TOKENS)
        tokens, logits = harness.genai(artifact, ids, NEW_TOKENS)
        assert len(tokens) == NEW_TOKENS
        # Quantized weights change the model: genai must compute what the artifact computes (Perch's runtime).
        assert tokens == (harness.perch_tokens(artifact, ids, NEW_TOKENS) if quantized else ref_tokens)
        assert_logits_close(ref_logits[:1] if quantized else ref_logits, logits[:1] if quantized else logits, artifact)


@pytest.mark.parametrize("model", ["falcon", "falcon40b", "falcon_h1"])
def test_transformers_js_runs_falcon_export(model, exports, models):
    """AutoModelForCausalLM.from_pretrained(dir) in Node, one flag at export: transformers' tokens."""
    artifact = exports(f"{model}:profile=transformers.js")
    assert (artifact / "onnx" / "model.onnx").is_file() and not (artifact / "model.onnx").exists()
    for ids in PROMPTS:
        ref_tokens, ref_logits = harness.reference(models[model], ids, NEW_TOKENS)
        tokens, first = harness.transformers_js(artifact, ids, NEW_TOKENS)
        assert tokens == ref_tokens
        assert_logits_close(ref_logits[:1], first, artifact)
        assert harness.perch_tokens(artifact, ids, NEW_TOKENS) == ref_tokens  # our runtime drives this layout
    if model == "falcon_h1":  # the other ONNX clients carry no Mamba state: the manifest says so
        verdicts = Manifest.load(artifact).extras["clients"]
        assert verdicts["transformers.js"] == "runs"
        assert verdicts["genai"].startswith("cannot run:") and verdicts["optimum"].startswith("cannot run:")


def test_every_onnx_export_uses_optimum_axis_names(exports):
    """transformers.js sizes its empty first cache from these names (any but batch_size becomes 0)."""
    import onnx

    graph = onnx.load(exports("falcon") / "model.onnx", load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"][0::2] == ["batch_size", "past_sequence_length"]
    assert dims["present.0.key"][2] == "past_sequence_length + sequence_length"
    clients = Manifest.load(exports("falcon")).extras["clients"]
    assert clients == {"optimum": "runs", "genai": "runs", "transformers.js": "export with --for transformers.js"}


def test_external_data_in_each_clients_naming(tmp_path, models, monkeypatch):
    """Weights above the threshold go to the client's data file, and the client still loads them."""
    from perch.exporter import to_onnx

    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_THRESHOLD", 0)  # every export "large"; 2 GB is too slow here
    export(models["falcon40b"], tmp_path / "genai", OnnxOptions(max_context=MAX_CONTEXT))
    export(models["falcon40b"], tmp_path / "tjs", OnnxOptions(max_context=MAX_CONTEXT, profile="transformers.js"))
    assert (tmp_path / "genai" / "model.onnx.data").is_file()
    assert (tmp_path / "tjs" / "onnx" / "model.onnx_data").is_file()
    config = json.loads((tmp_path / "tjs" / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] is True
    ids = PROMPTS[0]
    ref_tokens, _ = harness.reference(models["falcon40b"], ids, NEW_TOKENS)
    assert harness.genai(tmp_path / "genai", ids, NEW_TOKENS)[0] == ref_tokens
    assert harness.transformers_js(tmp_path / "tjs", ids, NEW_TOKENS)[0] == ref_tokens


@pytest.fixture(scope="module")
def mamba_onnx(tmp_path_factory) -> tuple:
    """(directory, CLI output) of a default Falcon-Mamba ONNX export."""
    out, printed = tmp_path_factory.mktemp("mamba") / "onnx", io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["export", "falcon-mamba-tiny", "--to", "onnx", "--max-context", str(MAX_CONTEXT), "--out", str(out)])
    assert rc == 0
    return out, printed.getvalue()


@pytest.mark.parametrize("client,why", [("genai", "conv and SSM states"), ("transformers.js", "falcon_mamba")])
def test_falcon_mamba_refused_by_name(client, why, tmp_path, capsys):
    assert main(["export", "falcon-mamba-tiny", "--to", "onnx", "--for", client, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--for {client}" in err and why in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("to,client,why", [("onnx", "genai", "conv and SSM states"),
                                           ("onnx", "optimum", "conv and SSM states"),
                                           ("coreml", "swift-transformers", "needs four")])
def test_falcon_h1_refused_by_name_where_the_client_has_no_mamba_state(to, client, why, tmp_path, capsys):
    assert main(["export", "falcon-h1-tiny", "--to", to, "--for", client, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--for {client}" in err and why in err
    assert not (tmp_path / "x").exists()


def test_falcon_mamba_export_says_genai_cannot_run_it(mamba_onnx, tmp_path):
    """Manifest and CLI say so; and the real genai, handed a decoder config anyway, fails on the SSM state."""
    artifact, printed = mamba_onnx
    verdicts = Manifest.load(artifact).extras["clients"]
    assert verdicts["genai"].startswith("cannot run:") and "SSM" in verdicts["genai"]
    assert verdicts["transformers.js"].startswith("cannot run:")
    assert "genai: cannot run: ONNX Runtime GenAI" in printed
    assert not (artifact / "genai_config.json").exists()
    probe = tmp_path / "probe"
    shutil.copytree(artifact, probe)
    (probe / "genai_config.json").write_text(json.dumps(harness.genai_decoder_config_for(Manifest.load(probe))))
    with pytest.raises(Exception, match="conv_state"):
        harness.genai(probe, PROMPTS[0], 2)


def test_falcon_mamba_is_not_a_transformers_js_model(mamba_onnx, tmp_path):
    """The real transformers.js refuses the architecture itself, whatever the layout."""
    probe = tmp_path / "probe"
    shutil.copytree(mamba_onnx[0], probe)
    (probe / "onnx").mkdir()
    shutil.move(probe / "model.onnx", probe / "onnx" / "model.onnx")
    with pytest.raises(RuntimeError, match="falcon_mamba"):
        harness.transformers_js(probe, PROMPTS[0], 2)


def test_client_examples_run(exports, models):
    """examples/clients/ as a user runs them: genai from Python, transformers.js from a Node project dir."""
    import subprocess
    import sys

    ids = PROMPTS[0]
    ref_tokens, _ = harness.reference(models["falcon"], ids, 8)
    examples = harness.ROOT / "examples" / "clients"
    p = subprocess.run([sys.executable, str(examples / "genai_generate.py"), str(exports("falcon")), "The list type",
                        "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"tokens: {ref_tokens}" in p.stdout
    project = harness.node_modules()  # a Node project: the script sits next to its node_modules
    script = project / "transformers_js_generate.mjs"
    shutil.copy(examples / "transformers_js_generate.mjs", script)
    p = subprocess.run(["node", str(script), str(exports("falcon:profile=transformers.js")), "The list type", "8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"tokens: {json.dumps(ref_tokens, separators=(',', ':'))}" in p.stdout
