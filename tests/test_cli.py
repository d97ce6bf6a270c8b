"""The `perch` console script: help, the architecture list, generation, and bad input -> one clear
message and exit code 2, with nothing half-written left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from perch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("export", "check", "generate", "train-fixture", "presets"):
        assert cmd in out


def test_console_script_is_installed():
    r = subprocess.run([str(Path(sys.executable).parent / "perch"), "export", "--list"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("falcon", "falcon_mamba", "FalconForCausalLM", "RWForCausalLM", "FalconMambaForCausalLM", "falcon-tiny"):
        assert name in r.stdout


def test_generate_streams_text_from_a_preset(capsys):
    assert main(["generate", "falcon-tiny", "--prompt", "The list", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The list")


def test_generate_sampling_is_reproducible_with_a_seed(capsys):
    args = ["generate", "falcon-mamba-tiny", "--prompt", "def", "--max-new-tokens", "6", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.9", "--seed", "7"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv,needle", [
    (["generate", "no-such-model-dir", "--prompt", "x"], "no-such-model-dir"),
    (["export", "falcon-tiny", "--to", "onnx"], "--out"),
    (["export", "falcon-tiny", "--to", "coreml", "--out", "{tmp}/x", "--quantize", "bogus"], "invalid choice"),
    (["export", "falcon-tiny", "--to", "onnx", "--out", "{tmp}/x", "--multifunction"], "Core ML"),
    (["export", "falcon-tiny", "--to", "onnx", "--out", "{tmp}/exists"], "already exists"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, argv, needle):
    (tmp_path / "exists").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # nothing half-written


def test_runtimes_never_import_exporter():
    """An app that only runs models does not install converters."""
    for path in (ROOT / "runtimes").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.strip().startswith(("import perch.exporter", "from perch.exporter")), f"{path}: {line}"
    code = ("import sys, pkgutil, importlib, perch.runtimes\n"
            "for m in pkgutil.walk_packages(perch.runtimes.__path__, 'perch.runtimes.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert not any(k.startswith('perch.exporter') for k in sys.modules), 'exporter imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
