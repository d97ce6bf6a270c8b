"""Bad input, as a hostile user would give it: every case exits 2 with a message naming the problem and the
fix, and changes nothing on disk. Plus the destination's safety: kills mid-export (SIGINT, SIGTERM,
SIGKILL) and two exports racing for one --out.

Cases run in-process through `perch.cli.main` (one torch import for the whole table); the kill and race
tests run a real `perch` process. Models are copies of the tiny presets, edited per case.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perch.cli import main
from perch.dev.presets import preset_dir

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers to build bad inputs
def model(tmp: Path, preset: str = "falcon-tiny") -> Path:
    dst = tmp / "m"
    if not dst.exists():
        shutil.copytree(preset_dir(preset), dst)
    return dst


def config(tmp: Path, preset: str = "falcon-tiny", drop: tuple[str, ...] = (), **changes) -> Path:
    m = model(tmp, preset)
    cfg = json.loads((m / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(changes)
    (m / "config.json").write_text(json.dumps(cfg))
    return m


def tensors(tmp: Path, edit, preset: str = "falcon-tiny") -> Path:
    m = model(tmp, preset)
    sd = load_file(m / "model.safetensors")
    edit(sd)
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    return m


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def export_args(m, out, *extra) -> list[str]:
    return ["export", str(m), "--to", "onnx", "--out", str(out), *extra]


def first_key(sd: dict, part: str) -> str:
    return next(k for k in sorted(sd) if part in k)


def _mamba_width(t: Path) -> Path:
    return config(t, "falcon-mamba-tiny", hidden_size=96)


def _unwritable(t: Path) -> str:
    if os.geteuid() == 0:  # root writes anywhere permissions allow: use a file system that refuses writes
        return "/sys/perch-bad-input-test/out"
    d = t / "ro"
    d.mkdir()
    d.chmod(0o555)
    return str(d / "out")


def _shard_index(t: Path, index: str) -> Path:
    m = model(t)
    (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
    write(m / "model.safetensors.index.json", index)
    return m


def _artifact(t: Path, base: Path, edit=None) -> Path:
    dst = t / "art"
    shutil.copytree(base, dst)
    if edit is not None:
        d = json.loads((dst / "manifest.json").read_text())
        edit(d)
        (dst / "manifest.json").write_text(json.dumps(d))
    return dst


# (id, setup(tmp, artifact) -> argv, needles that must all appear in the message)
CASES = [
    # ---- the destination
    ("out_exists", lambda t, a: export_args("falcon-tiny", write(t / "o" / "f", "x").parent),
     ["already exists", "--overwrite"]),
    ("overwrite_foreign_dir", lambda t, a: export_args("falcon-tiny", write(t / "docs" / "a.txt", "mine").parent,
                                                     "--overwrite"), ["not a Perch artifact", "choose another --out"]),
    ("overwrite_file", lambda t, a: export_args("falcon-tiny", write(t / "f.txt", "x"), "--overwrite"),
     ["is a file", "choose another --out"]),
    ("overwrite_home", lambda t, a: export_args("falcon-tiny", "~", "--overwrite"), ["home", "choose"]),
    ("overwrite_cwd", lambda t, a: export_args("falcon-tiny", ".", "--overwrite"), ["current directory", "choose"]),
    ("out_is_symlink", lambda t, a: export_args("falcon-tiny", _symlink(t)), ["symbolic link", "plain path"]),
    ("out_under_file", lambda t, a: export_args("falcon-tiny", write(t / "f.txt", "x") / "sub"),
     ["not a directory", "choose"]),
    ("out_unwritable", lambda t, a: export_args("falcon-tiny", _unwritable(t)), ["cannot write", "writable --out"]),
    # ---- where the model is
    ("model_missing", lambda t, a: export_args(t / "nope", t / "o"), ["not found", "local model directory"]),
    ("model_is_file", lambda t, a: export_args(write(t / "f.txt", "x"), t / "o"), ["is a file", "config.json"]),
    ("no_config", lambda t, a: export_args(_rm(model(t) / "config.json"), t / "o"), ["config.json not found", "saved with"]),
    ("config_not_json", lambda t, a: export_args(write(model(t) / "config.json", "{nope").parent, t / "o"),
     ["not valid JSON", "re-save"]),
    ("config_no_model_type", lambda t, a: export_args(config(t, drop=("model_type",)), t / "o"),
     ["no model_type", "save_pretrained"]),
    ("model_type_llama", lambda t, a: export_args(config(t, model_type="llama"), t / "o"), ["not supported", "--list"]),
    ("base_model_class", lambda t, a: export_args(config(t, architectures=["FalconModel"]), t / "o"),
     ["causal language models", "FalconForCausalLM"]),
    ("alibi", lambda t, a: export_args(config(t, alibi=True), t / "o"), ["ALiBi", "rotary"]),
    ("rope_scaling", lambda t, a: export_args(config(t, rope_scaling={"type": "linear", "factor": 2.0}), t / "o"),
     ["RoPE scaling", "default rotary"]),
    ("gptq", lambda t, a: export_args(config(t, quantization_config={"quant_method": "gptq", "bits": 4}), t / "o"),
     ["gptq", "unquantized"]),
    # ---- config fields Perch does not implement
    ("falcon_relu", lambda t, a: export_args(config(t, activation="relu"), t / "o"), ["activation", "gelu"]),
    ("falcon_gelu_new", lambda t, a: export_args(config(t, activation="gelu_new"), t / "o"), ["activation", "gelu"]),
    ("falcon_silu", lambda t, a: export_args(config(t, activation="silu"), t / "o"), ["activation", "gelu"]),
    ("no_hidden_size", lambda t, a: export_args(config(t, drop=("hidden_size",)), t / "o"),
     ["hidden_size", "config.json"]),
    ("no_heads", lambda t, a: export_args(config(t, drop=("num_attention_heads",)), t / "o"),
     ["num_attention_heads", "config.json"]),
    ("no_layers", lambda t, a: export_args(config(t, drop=("num_hidden_layers",)), t / "o"),
     ["num_hidden_layers", "config.json"]),
    ("heads_do_not_divide", lambda t, a: export_args(config(t, num_attention_heads=5), t / "o"),
     ["num_attention_heads", "divis"]),
    ("mamba_relu", lambda t, a: export_args(config(t, "falcon-mamba-tiny", hidden_act="relu"), t / "o"),
     ["hidden_act", "silu"]),
    # ---- weights that do not match the config
    ("wrong_shape", lambda t, a: export_args(tensors(t, lambda sd: sd.update(
        {first_key(sd, "dense_h_to_4h"): torch.zeros(8, 8)})), t / "o"), ["wrong shape", "config.json saved with"]),
    ("int8_tensor", lambda t, a: export_args(tensors(t, lambda sd: sd.update(
        {first_key(sd, "dense_h_to_4h"): sd[first_key(sd, "dense_h_to_4h")].to(torch.int8)})), t / "o"),
     ["non-float", "unquantized"]),
    ("missing_tensor", lambda t, a: export_args(tensors(t, lambda sd: sd.pop(first_key(sd, "ln_f"))), t / "o"),
     ["missing from the weights", "config.json saved with"]),
    ("extra_tensor", lambda t, a: export_args(tensors(t, lambda sd: sd.update(
        {"transformer.h.9.extra.weight": torch.zeros(2)})), t / "o"), ["does not have", "config.json saved with"]),
    ("nan_weights", lambda t, a: export_args(tensors(t, lambda sd: sd.update(
        {first_key(sd, "dense_4h_to_h"): torch.full_like(sd[first_key(sd, "dense_4h_to_h")], float("nan"))})),
        t / "o"), ["NaN", "healthy checkpoint"]),
    ("mamba_width_mismatch", lambda t, a: export_args(_mamba_width(t), t / "o"), ["wrong shape", "config.json"]),
    ("truncated_safetensors", lambda t, a: export_args(_truncate(model(t) / "model.safetensors"), t / "o"),
     ["cannot read", "re-download"]),
    ("no_weights", lambda t, a: export_args(_rm(model(t) / "model.safetensors"), t / "o"),
     ["no weights", "model.safetensors"]),
    ("pickle_only", lambda t, a: export_args(_to_pickle(model(t)), t / "o"), ["pickle", "--allow-pickle"]),
    ("shard_index_list", lambda t, a: export_args(_shard_index(t, "[]"), t / "o"), ["shard index", "re-download"]),
    ("shard_index_empty", lambda t, a: export_args(_shard_index(t, '{"weight_map": {}}'), t / "o"),
     ["no shard files", "re-download"]),
    ("shard_missing", lambda t, a: export_args(_shard_index(t, '{"weight_map": {"x": "model-2.safetensors"}}'),
                                               t / "o"), ["missing", "finish the download"]),
    ("corrupt_tokenizer", lambda t, a: export_args(write(model(t) / "tokenizer.json", "{broken").parent, t / "o"),
     ["tokenizer", "restore them"]),
    ("adapter_missing", lambda t, a: export_args("falcon-tiny", t / "o", "--adapter", str(t / "no-adapter")),
     ["not found", "local model directory"]),
    # ---- export options
    ("max_context_over_model", lambda t, a: export_args("falcon-tiny", t / "o", "--max-context", "100000"),
     ["max_position_embeddings", "choose at most 512"]),
    ("max_context_zero", lambda t, a: export_args("falcon-tiny", t / "o", "--max-context", "0"), ["at least 1"]),
    ("max_context_text", lambda t, a: export_args("falcon-tiny", t / "o", "--max-context", "lots"),
     ["not a whole number", "at least 1"]),
    ("block_size", lambda t, a: export_args("falcon-tiny", t / "o", "--quantize", "int4", "--block-size", "7"),
     ["--block-size 7", "choose"]),
    ("palettize_onnx", lambda t, a: export_args("falcon-tiny", t / "o", "--quantize", "palettize4"),
     ["not available for onnx", "choose one of"]),
    ("multifunction_onnx", lambda t, a: export_args("falcon-tiny", t / "o", "--multifunction"), ["--multifunction", "--to coreml"]),
    ("export_no_out", lambda t, a: ["export", "falcon-tiny", "--to", "onnx"], ["--out", "--help"]),
    # ---- generate
    ("generate_negative_tokens", lambda t, a: ["generate", "falcon-tiny", "--prompt", "x", "--max-new-tokens", "-5"],
     ["-5 must be at least 1"]),
    ("generate_zero_tokens", lambda t, a: ["generate", str(a), "--prompt", "x", "--max-new-tokens", "0"],
     ["must be at least 1"]),
    ("generate_bad_temperature", lambda t, a: ["generate", "falcon-tiny", "--prompt", "x", "--temperature", "-1"],
     ["temperature >= 0"]),
    ("generate_nan_weights", lambda t, a: ["generate", str(tensors(t, lambda sd: sd.update(
        {first_key(sd, "ln_f.weight"): torch.full_like(sd[first_key(sd, "ln_f.weight")], float("inf"))}))),
        "--prompt", "x"], ["NaN or infinite", "healthy checkpoint"]),
    ("generate_no_model", lambda t, a: ["generate", str(t / "nope"), "--prompt", "x"], ["not found"]),
    # ---- check, and tampered manifests
    ("check_not_artifact", lambda t, a: ["check", str(write(t / "d" / "x", "").parent)],
     ["no manifest.json", "perch export"]),
    ("check_negative_tokens", lambda t, a: ["check", str(a), "--max-new-tokens", "-5"], ["must be at least 1"]),
    ("check_empty_prompts", lambda t, a: ["check", str(a), "--prompts", str(write(t / "p.txt", "\n\n"))],
     ["no prompts", "one prompt per line"]),
    ("manifest_not_json", lambda t, a: ["check", str(write(_artifact(t, a) / "manifest.json", "{").parent)],
     ["corrupt manifest", "re-export"]),
    ("manifest_model_file_escapes", lambda t, a: ["check", str(_artifact(t, a, lambda d: d.update(
        model_file="../../etc/passwd")))], ["outside the artifact", "re-export"]),
    ("manifest_model_file_absolute", lambda t, a: ["check", str(_artifact(t, a, lambda d: d.update(
        model_file="/etc/passwd")))], ["outside the artifact", "re-export"]),
    ("manifest_tokenizer_escapes", lambda t, a: ["generate", str(_artifact(t, a, lambda d: d.update(
        tokenizer_files=["../../../root/.bashrc"]))), "--prompt", "x"], ["outside the artifact", "re-export"]),
    ("manifest_files_escape", lambda t, a: ["check", str(_artifact(t, a, lambda d: d["extras"].update(
        files=["model.onnx", "../secret"])))], ["outside the artifact", "re-export"]),
    ("manifest_newer_schema", lambda t, a: ["check", str(_artifact(t, a, lambda d: d.update(schema_version=99)))],
     ["newer than this Perch", "upgrade"]),
    ("manifest_max_context_edited", lambda t, a: ["generate", str(_artifact(t, a, lambda d: d.update(
        max_context=4096))), "--prompt", "x"], ["max_context", "re-export"]),
]


def _symlink(t: Path) -> Path:
    (t / "real").mkdir()
    (t / "link").symlink_to(t / "real")
    return t / "link"


def _rm(path: Path) -> Path:
    path.unlink()
    return path.parent


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.parent


def _to_pickle(m: Path) -> Path:
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return m


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its size and mtime: "nothing changed on disk" means equal snapshots."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_relative_to(root / "home" / ".cache"):
            continue  # libraries' own caches (onnxruntime, ...) created on first use under $HOME

        st = p.lstat()
        # A directory is its entries (listed here too); a file, its size and modification time.
        out[str(p.relative_to(root))] = (True, 0, 0) if p.is_dir() else (False, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """One good ONNX export of falcon-tiny, copied by the cases that tamper with an artifact."""
    out = tmp_path_factory.mktemp("good") / "art"
    assert main(["export", "falcon-tiny", "--to", "onnx", "--out", str(out)]) == 0
    return out


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,setup,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_problem_and_fix_and_touches_nothing(tmp_path, monkeypatch, capsys, artifact,
                                                                      name, setup, needles):
    home, work = tmp_path / "home", tmp_path / "work"
    write(home / ".bashrc", "# mine")
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    argv = [str(a) for a in setup(tmp_path, artifact)]
    before, art_before = snapshot(tmp_path), snapshot(artifact)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert snapshot(tmp_path) == before and snapshot(artifact) == art_before


# ---------------------------------------------------------------- the destination under stress
def _perch(*args: str) -> subprocess.Popen:
    """perch as a user's foreground command: SIGINT at its default even when this suite runs as a background
    job (which inherits SIGINT ignored, and Perch then rightly leaves it ignored)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "perch.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_partial(parent: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(parent.glob(".out.partial-*"))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the export never started staging")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_export_cleans_up(tmp_path, sig, code):
    proc = _perch("export", "falcon-tiny", "--to", "onnx", "--out", str(tmp_path / "out"))
    _wait_for_partial(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode == code, proc.communicate()
    assert list(tmp_path.iterdir()) == []  # no partial, no lock, no half artifact


def test_sigkilled_export_is_cleaned_by_the_next_one(tmp_path):
    out = tmp_path / "out"
    proc = _perch("export", "falcon-tiny", "--to", "onnx", "--out", str(out))
    partial = _wait_for_partial(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert partial.exists()  # SIGKILL cannot be caught: the leftover is real
    assert main(["export", "falcon-tiny", "--to", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_exports_to_one_out_the_second_fails_fast(tmp_path, capsys):
    out = tmp_path / "out"
    first = _perch("export", "falcon-tiny", "--to", "onnx", "--out", str(out))
    _wait_for_partial(tmp_path, first)
    assert main(["export", "falcon-tiny", "--to", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another perch process is writing" in err and "choose another --out" in err
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert (out / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_partial_int4_export_says_how_much_was_quantized_and_why(tmp_path, capsys):
    """hidden 64 < a 128-wide block: most matrices stay float, and the CLI must say so, not just "int4"."""
    out = tmp_path / "q"
    assert main(["export", "falcon-tiny", "--to", "onnx", "--quantize", "int4", "--block-size", "128",
                 "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("quantization:"))
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    done = len(q["quantized"])
    kept = len([k for k in q["not_quantized"] if k != "1-D tensors"])
    assert 0 < kept and f"{done} of {done + kept} weight matrices quantized; {kept} kept in float" in line
    assert "smaller than one 128-wide block" in line
