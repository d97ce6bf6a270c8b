"""Building or finding the CPU peers for benchmarks/cpu_peers.py, and converting one checkpoint for each.

Everything lands in a peers directory (`--peers-dir`, `$PERCH_PEER_DIR`, default ~/.cache/perch/peers) and is
reused on the next run. Nothing here is vendored into Perch:
- llama.cpp comes from the llama-cpp-python source package (`pip download`), built with cmake. Its GGUF
  converter needs two fixes for Perch's presets; they are applied to a copy at run time (see `patch_converter`).
- OpenVINO (optimum-intel) and optimum's ONNX exporter each get their own virtual environment: they pin
  transformers versions Perch does not use.
A peer that cannot be built or converted is skipped with the reason, never silently.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp 0c1e57098 (ggml 0.25.3)
LLAMA_TARGETS = ("llama-bench", "llama-completion", "llama-quantize", "llama-perplexity", "llama")
VENVS = {  # name -> pip requirements; torch pinned to the version beside us (a CPU build when we have one)
    "openvino": ["{torch}", "optimum-intel[openvino]==2.2.*", "transformers==5.3.0"],  # mamba export: <= 5.3.0
    "optimum": ["{torch}", "optimum-onnx[onnxruntime]==0.1.0", "transformers>=4.51,<4.58"],
}


class Skip(Exception):
    """A peer that is not available here, with the reason shown in the report."""


def peers_dir(flag: str | None) -> Path:
    d = Path(flag or os.environ.get("PERCH_PEER_DIR") or Path.home() / ".cache" / "perch" / "peers").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def run(cmd: list[str], *, log: Path, env: dict | None = None, cwd: Path | None = None, timeout: int = 7200) -> None:
    """Run a build step, its output to `log`; a failure becomes a Skip quoting the log's tail."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-600:].strip().splitlines()[-3:]
        raise Skip(f"`{Path(cmd[0]).name} ...` failed (see {log}): {' | '.join(tail)}")


# ---------------------------------------------------------------- llama.cpp
def llama_source(peers: Path) -> Path:
    """The unpacked llama-cpp-python source package (its vendor/llama.cpp is the code we build)."""
    src = peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    tgz = peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tgz.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", peers], log=peers / "llama.cpp-download.log")
    with tarfile.open(tgz) as tar:
        tar.extractall(peers, filter="data")
    return src


def llama_build(peers: Path) -> Path:
    """build/bin with llama-bench, llama-quantize, llama-perplexity and libllama.so; built once (many minutes)."""
    bin_dir = peers / "llama.cpp-build" / "bin"
    want = [bin_dir / t for t in LLAMA_TARGETS[:-1]] + [bin_dir / "libllama.so"]
    if all(p.is_file() for p in want):
        return bin_dir
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        raise Skip("llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
    src = llama_source(peers) / "vendor" / "llama.cpp"
    log, build = peers / "llama.cpp-build.log", peers / "llama.cpp-build"
    run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF"], log=log)
    run(["nice", "-n", "10", "cmake", "--build", build, f"-j{os.cpu_count() or 2}", "--target", *LLAMA_TARGETS], log=log)
    return bin_dir


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise Skip(f"cannot patch {path.name}: expected one {old[:60]!r} (llama.cpp changed; update the patch)")
    path.write_text(text.replace(old, new))


# transformers 5 saves num_kv_heads = num_attention_heads beside multi_query for 7B-style Falcon, and itself
# uses one K,V head then; the converter trusts num_kv_heads and fails on the fused QKV's shape.
_ONE_KV = '(1 if self.hparams.get("multi_query") and not self.hparams.get("new_decoder_architecture") else {})'


def patch_converter(peers: Path) -> Path:
    """A patched copy of convert_hf_to_gguf.py (+ conversion/, gguf-py/) for Perch checkpoints."""
    dst = peers / "convert-patched"
    if (dst / ".patched").is_file():
        return dst
    src = llama_source(peers) / "vendor" / "llama.cpp"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    shutil.copy2(src / "convert_hf_to_gguf.py", dst)
    for sub in ("conversion", "gguf-py"):
        shutil.copytree(src / sub, dst / sub)
    falcon = dst / "conversion" / "falcon.py"
    _replace_once(falcon, 'n_head_kv = self.hparams.get("num_kv_heads")',
                  "n_head_kv = " + _ONE_KV.format('self.hparams.get("num_kv_heads")'))
    _replace_once(falcon, 'n_head_kv = self.find_hparam(["num_kv_heads", "n_head_kv"], optional=True) or 1',
                  "n_head_kv = " + _ONE_KV.format('(self.find_hparam(["num_kv_heads", "n_head_kv"], optional=True) or 1)'))
    # Perch's byte-level BPE tokenizer splits like GPT-2 but has no registered pre-tokenizer hash: map the
    # hashes given in PERCH_GPT2_PRE_HASHES (computed by `pretokenizer_hash`) to "gpt-2".
    _replace_once(dst / "conversion" / "base.py", "        res = None\n\n        # NOTE: if you get an error here",
                  '        res = "gpt-2" if chkhsh in __import__("os").environ.get("PERCH_GPT2_PRE_HASHES", "")'
                  '.split(",") else None\n\n        # NOTE: if you get an error here')
    (dst / ".patched").write_text("ok\n")
    return dst


def pretokenizer_hash(model_dir: Path, converter: Path) -> str:
    """The hash the converter computes for this tokenizer: sha256 of its token ids for the converter's probe text."""
    import ast
    import re

    from transformers import AutoTokenizer

    text = (converter / "conversion" / "base.py").read_text()
    probe = ast.literal_eval(re.search(r"^\s*chktxt = (.+)$", text, re.M).group(1))
    ids = AutoTokenizer.from_pretrained(model_dir).encode(probe)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def gguf(peers: Path, model_dir: Path, out_dir: Path, kind: str) -> Path:
    """`kind`: f32, Q8_0, Q4_0 or Q4_0-pure (every tensor 4-bit; plain Q4_0 keeps the embedding/output at 8 or 6)."""
    out = out_dir / f"model-{kind}.gguf"
    if out.is_file():
        return out
    bin_dir = llama_library(peers)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gguf.log"
    if kind == "f32":
        conv = patch_converter(peers)
        env = {**os.environ, "PYTHONPATH": str(conv / "gguf-py"),
               "PERCH_GPT2_PRE_HASHES": pretokenizer_hash(model_dir, conv), "NO_LOCAL_GGUF": ""}
        run([sys.executable, conv / "convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", out],
            log=log, env=env)
        return out
    f32 = gguf(peers, model_dir, out_dir, "f32")
    # llama_model_quantize from libllama: what llama-quantize runs, without waiting for the tools to build.
    run([sys.executable, Path(__file__).with_name("peer_engines.py"), "--engine", "llama.cpp", "--path", f32,
         "--quantize-to", out, "--kind", kind, "--lib-dir", bin_dir, "--binding-dir", llama_source(peers)], log=log)
    return out


def llama_library(peers: Path) -> Path:
    """The directory holding libllama.so: all the timed rows need (the tools come with the full build)."""
    bin_dir = peers / "llama.cpp-build" / "bin"
    return bin_dir if (bin_dir / "libllama.so").is_file() else llama_build(peers)


# ---------------------------------------------------------------- Python peers in their own venvs
def venv(peers: Path, name: str) -> Path:
    """The venv's python, created and installed once (a marker file records what was installed)."""
    root = peers / f"{name}-venv"
    py, marker = root / "bin" / "python", root / ".perch-installed"
    reqs = [r.format(torch=_torch_requirement()) for r in VENVS[name]]
    if marker.is_file() and json.loads(marker.read_text()) == reqs:
        return py
    log = peers / f"{name}-venv.log"
    if not py.is_file():
        run([sys.executable, "-m", "venv", root], log=log)
    run([py, "-m", "pip", "install", "-q", *reqs], log=log, env={**os.environ, "PIP_NO_INPUT": "1"})
    marker.write_text(json.dumps(reqs))
    return py


def _torch_requirement() -> str:
    """The torch this process runs: a CPU build installed here is not traded for a GPU one gigabytes larger."""
    try:
        from importlib.metadata import version

        return f"torch=={version('torch')}"
    except Exception:
        return "torch"


_OV_WEIGHTS = {"ov-fp32": ["--weight-format", "fp32"], "ov-int8": ["--weight-format", "int8"],
               "ov-int4": ["--weight-format", "int4", "--group-size", "32", "--ratio", "1.0"]}


def openvino(peers: Path, model_dir: Path, out: Path, name: str) -> Path:
    if (out / "openvino_model.xml").is_file():
        return out
    py = venv(peers, "openvino")
    out.parent.mkdir(parents=True, exist_ok=True)
    run([py.parent / "optimum-cli", "export", "openvino", "--model", model_dir, "--task", "text-generation-with-past",
         *_OV_WEIGHTS[name], out], log=out.parent / f"{name}.log", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


_QUANTIZE = """
import sys
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
q = ORTQuantizer.from_pretrained(sys.argv[1], file_name="model.onnx")
q.quantize(save_dir=sys.argv[2], quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
"""


def optimum(peers: Path, model_dir: Path, out: Path, name: str) -> Path:
    """optimum-onnx's export (fp32), and its ORTQuantizer dynamic int8 (MatMulInteger, lm_head included)."""
    if any(out.glob("*.onnx")):
        return out
    py = venv(peers, "optimum")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fp32 = out.parent / "optimum-fp32"
    log = out.parent / f"{name}.log"
    if not any(fp32.glob("*.onnx")):
        run([py.parent / "optimum-cli", "export", "onnx", "--model", model_dir, "--task", "text-generation-with-past",
             fp32], log=log, env=env)
    if name == "optimum-int8":
        run([py, "-c", _QUANTIZE, fp32, out], log=log, env=env)
        for f in fp32.glob("*.json"):
            shutil.copy2(f, out)
    return out


def size_mb(path: Path) -> float:
    """Bytes of the model files (weights and graph; not tokenizer or config files)."""
    kinds = (".onnx", ".data", ".onnx_data", ".bin", ".xml", ".gguf")
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in kinds]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)
