"""llama.cpp's rows for benchmarks/quant_quality.py: its Q4_0 (+ --pure), Q4_K_M and Q8_0 on the same text.

Two scorings, both from the llama.cpp built by benchmarks/peer_builds.py (into $PERCH_PEER_DIR):
- like-for-like with Perch's rows: llama.cpp's logits at every position of exactly Perch's token windows
  (peer_engines.py --score-ids, through libllama), against the same transformers fp32 reference;
- as issue 18 quoted it: `llama-perplexity --kl-divergence` over the held-out text against llama.cpp's own f32
  conversion (-c 128 --chunks 32: the second half of each window scored), when that tool was built.
Bits per weight come from each GGUF's tensor table, counted the way Perch's manifest counts.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peer_builds  # noqa: E402

KINDS = ("Q4_0-pure", "Q4_0", "Q4_K_M", "Q8_0")  # f32 is built too: every kind is quantized from it
SSM_PARAMS = (".ssm_a", ".ssm_conv1d")  # not MatMul weights: Perch keeps A_log float and its conv 3-D


def gguf_bits(path: Path, converter: Path) -> dict:
    """Stored bits over parameters of the GGUF's 2-D tensors, and of its MatMul/embedding weights alone
    (SSM A and conv kernels left out): the two counts Perch's manifest gives (bits_per_weight, _linear_)."""
    sys.path.insert(0, str(converter / "gguf-py"))
    from gguf import GGUFReader

    allw, lin, types = [0, 0], [0, 0], {}
    for t in GGUFReader(str(path)).tensors:
        if len([d for d in t.shape if d > 1]) < 2:
            continue
        n, bits = int(t.n_elements), 8 * int(t.n_bytes)
        allw[0], allw[1] = allw[0] + n, allw[1] + bits
        if not any(s in t.name for s in SSM_PARAMS):
            lin[0], lin[1] = lin[0] + n, lin[1] + bits
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + n
    return {"bits_per_weight": round(allw[1] / allw[0], 3), "bits_per_linear_weight": round(lin[1] / lin[0], 3),
            "tensor_types": types}


def score(peers: Path, gguf: Path, ids: np.ndarray, work: Path) -> np.ndarray:
    """(windows, ctx/2, vocab) logits from llama.cpp, each window from an empty state, one thread."""
    ids_file, out = work / "ids.npy", work / f"{gguf.stem}-logits.npy"
    np.save(ids_file, ids.astype(np.int32))
    subprocess.run([sys.executable, HERE / "peer_engines.py", "--engine", "llama.cpp", "--path", gguf,
                    "--threads", "1", "--lib-dir", peer_builds.llama_library(peers),
                    "--binding-dir", peer_builds.llama_source(peers), "--score-ids", ids_file, "--logits-out", out],
                   check=True)
    return np.load(out).astype(np.float64)


def perplexity_kld(bin_dir: Path, f32: Path, quant: Path, text: Path, work: Path, chunks: int, ctx: int) -> dict:
    """llama-perplexity --kl-divergence of `quant` against `f32` over `text` (what the issue quoted)."""
    tool = bin_dir / "llama-perplexity"
    if not tool.is_file():
        return {}
    base = work / f"{f32.parent.name}-f32.kld"
    common = ["-t", "1", "-c", str(ctx), "--chunks", str(chunks), "--kl-divergence-base", base]
    if not base.is_file():
        subprocess.run([tool, "-m", f32, "-f", text, *common], check=True, capture_output=True)
    for _ in range(2):  # seen in two of eight runs: a complete run whose captured log lacked the summary lines
        out = subprocess.run([tool, "-m", quant, "--kl-divergence", *common], check=True, capture_output=True)
        log = (out.stdout + out.stderr).decode(errors="replace")
        kld = re.search(r"Mean\s+KLD:\s+([-\d.e]+)", log)
        top = re.search(r"Same top p:\s+([\d.]+)", log)
        if kld and top:
            break
    return {"llama_perplexity_kl_mean": float(kld.group(1)) if kld else None,
            "llama_perplexity_top1": float(top.group(1)) / 100 if top else None}


def rows(arch: str, model_dir: Path, ids: np.ndarray, ref: np.ndarray, compare, work: Path, text: str,
         peers_flag: str | None = None) -> list[dict]:
    """One row per llama.cpp kind; a peer that cannot be built is one row saying why."""
    try:
        peers = peer_builds.peers_dir(peers_flag)
        out_dir = peers / "quality" / f"{arch}-{model_dir.name}"
        f32 = peer_builds.gguf(peers, model_dir, out_dir, "f32")
        converter = peer_builds.patch_converter(peers)
    except peer_builds.Skip as e:
        return [{"arch": arch, "backend": "llama.cpp", "quantize": "all", "skipped": str(e)}]
    text_file = work / f"{arch}-heldout.txt"
    text_file.write_text(text)
    own = score(peers, f32, ids, work)
    result = [{"arch": arch, "backend": "llama.cpp", "precision": "f32", "quantize": "none", "chunks": len(ids),
               **compare(ref, own, ids), **gguf_bits(f32, converter)}]
    for kind in KINDS:
        gguf = peer_builds.gguf(peers, model_dir, out_dir, kind)
        logits = score(peers, gguf, ids, work)
        vs_own = compare(own, logits, ids)
        result.append({"arch": arch, "backend": "llama.cpp", "precision": "f32", "quantize": kind,
                       "chunks": len(ids), **compare(ref, logits, ids), **gguf_bits(gguf, converter),
                       "kl_mean_vs_llama_f32": vs_own["kl_mean"], "top1_vs_llama_f32": vs_own["top1"],
                       **perplexity_kld(peers / "llama.cpp-build" / "bin", f32, gguf, text_file, work,
                                        len(ids), ids.shape[1])})
    return result
