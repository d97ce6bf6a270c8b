"""One timing harness for every CPU engine: Perch's ONNX, llama.cpp, OpenVINO and optimum's ONNX.

Run as a child by benchmarks/cpu_peers.py, under the Python that has the engine (the peers live in their own
virtual environments), so this file imports nothing from Perch at module level and needs only numpy.
Every engine is wrapped behind the same three calls (reset, prefill the prompt, step one token, each
returning the last position's logits as a host float32 array) and timed the same way: wall time around
the call, the same prompt, then the same fixed token sequence (teacher-forced, so every engine does the
same work whatever it would have predicted), median per step.

    python benchmarks/peer_engines.py --engine perch --path DIR --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np


def peak_mb() -> int:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over across fork+exec)."""
    return _status_mb("VmHWM:")


def rss_mb() -> int:
    return _status_mb("VmRSS:")


def _status_mb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return round(int(line.split()[1]) / 1024)
    return -1


def token_plan(vocab: int, prompt: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The prompt and the decode tokens every engine is fed (ids 1..vocab-1; 0 is BOS/EOS/pad here)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, (1, prompt)), rng.integers(1, vocab, steps)


def measure(engine, prompt_ids: np.ndarray, decode_ids: np.ndarray, repeats: int) -> dict:
    """Prefill `repeats` times after one warm-up (fresh state each), then decode after the last prefill."""
    prefill = []
    for _ in range(repeats + 1):
        engine.reset()
        t0 = time.perf_counter()
        logits = engine.prefill(prompt_ids)
        prefill.append(time.perf_counter() - t0)
    first = int(np.argmax(logits))
    per_step, argmax = [], []
    for tok in decode_ids:
        t0 = time.perf_counter()
        logits = engine.step(int(tok))
        per_step.append(time.perf_counter() - t0)
        argmax.append(int(np.argmax(logits)))
    return {"prefill_tok_s": round(prompt_ids.shape[1] / float(np.median(prefill[1:])), 1),
            "decode_ms": round(1e3 * float(np.median(per_step)), 2),
            "decode_ms_p90": round(1e3 * float(np.percentile(per_step, 90)), 2),
            "argmax": [first, *argmax]}


# ---------------------------------------------------------------- engines
class PerchEngine:
    def __init__(self, path: str, threads: int, workload: str | None = None):
        from perch.runtimes.onnxrt import OnnxRuntime

        kw = {"workload": workload} if workload else {}
        self.rt = OnnxRuntime(path, threads=threads, **kw)
        self.vocab = self.rt.vocab_size

    def reset(self):
        self.rt.reset(1)

    def prefill(self, ids):
        return self.rt.prefill(ids, last_only=True)[0, -1]

    def step(self, tok):
        return self.rt.step(np.array([tok]))[0]


def llama_binding(lib_dir: str, binding_dir: str):
    """llama-cpp-python's ctypes module over our libllama.so (the package __init__ wants extra deps: skipped)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(Path(binding_dir) / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    import llama_cpp.llama_cpp as ll

    return ll


def llama_quantize(src: str, dst: str, kind: str, lib_dir: str, binding_dir: str) -> None:
    """What `llama-quantize [--pure] SRC DST TYPE` does, through the library: kind Q8_0, Q4_0, Q4_K_M or
    Q4_0-pure (the "-pure" suffix: every tensor at the type, embedding and output included)."""
    import ctypes

    ll = llama_binding(lib_dir, binding_dir)
    params = ll.llama_model_quantize_default_params()
    ftypes = {"Q8_0": ll.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": ll.LLAMA_FTYPE_MOSTLY_Q4_0,
              "Q4_K_M": ll.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params.ftype = ftypes[kind.split("-")[0]]
    params.pure, params.nthread = kind.endswith("-pure"), 1
    if ll.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src} -> {kind}")


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's ctypes binding (pure Python, from the same source package),
    loading the libllama.so this benchmark built: decode and prefill are `llama_decode` calls."""

    def __init__(self, path: str, threads: int, lib_dir: str, binding_dir: str, context: int = 512):
        import ctypes

        ll = llama_binding(lib_dir, binding_dir)
        self.ll, self.ctypes = ll, ctypes
        quiet = ll.llama_log_callback(lambda level, text, data: None)
        self._quiet = quiet  # keep the callback alive
        ll.llama_log_set(quiet, None)
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = context, context, context
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cp)
        self.vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))

    def reset(self):
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def _decode(self, tokens):
        arr = (self.ll.llama_token * len(tokens))(*tokens)
        if self.ll.llama_decode(self.ctx, self.ll.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()

    def prefill(self, ids):
        return self._decode([int(t) for t in ids[0]])

    def step(self, tok):
        return self._decode([tok])

    def all_logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) logits at every position of one sequence from an empty state: a batch that
        asks for each token's output (llama_batch_get_one returns only the last)."""
        ll, n = self.ll, len(tokens)
        batch = ll.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, 1
                batch.seq_id[i][0] = 0
            self.reset()
            if ll.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return np.stack([np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
                             for i in range(n)]).copy()
        finally:
            ll.llama_batch_free(batch)


def score_windows(engine: LlamaCppEngine, ids_path: str, out_path: str) -> None:
    """Logits predicting the second half of each window (rows of the int array in `ids_path`), each window
    from an empty state, saved as float32 (windows, ctx/2, vocab): what quant_quality.py compares."""
    ids = np.load(ids_path)
    ctx = ids.shape[1]
    out = [engine.all_logits(list(row))[ctx // 2 - 1 : ctx - 1] for row in ids]
    np.save(out_path, np.stack(out).astype(np.float32))


class TorchCausalLM:
    """A transformers-style model (optimum's ORTModelForCausalLM, optimum-intel's OVModelForCausalLM):
    forward with the running attention mask and the returned cache, as `generate` drives it."""

    def __init__(self, model, vocab: int):
        import torch

        from perch.archs.layers import cache_kwarg, output_cache

        self.torch, self.model, self.vocab = torch, model, vocab
        self.cache_kwarg, self.output_cache = cache_kwarg(model), output_cache
        self.reset()

    def reset(self):
        self.past, self.length = None, 0

    def _run(self, ids: np.ndarray):
        t = self.torch
        self.length += ids.shape[1]
        kw = dict(input_ids=t.from_numpy(ids), attention_mask=t.ones((1, self.length), dtype=t.int64), use_cache=True)
        if self.past is not None:
            kw[self.cache_kwarg] = self.past
        if getattr(self.model.config, "model_type", "") == "falcon_mamba":
            kw["cache_position"] = t.arange(self.length - ids.shape[1], self.length)
        with t.no_grad():
            out = self.model(**kw)
        self.past = self.output_cache(out)
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids):
        return self._run(np.asarray(ids, np.int64))

    def step(self, tok):
        return self._run(np.array([[tok]], np.int64))


def openvino_engine(path: str, threads: int):
    from optimum.intel import OVModelForCausalLM

    cfg = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
           "INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": ""}  # f32: its default computes in bf16 where it can
    model = OVModelForCausalLM.from_pretrained(path, ov_config=cfg, compile=True)
    return TorchCausalLM(model, model.config.vocab_size)


def optimum_engine(path: str, threads: int):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    files = sorted(p.name for p in Path(path).glob("*.onnx"))
    name = next((f for f in files if "quantized" in f), files[0])
    model = ORTModelForCausalLM.from_pretrained(path, file_name=name, session_options=so,
                                                provider="CPUExecutionProvider")
    return TorchCausalLM(model, model.config.vocab_size)


def make_engine(args):
    if args.engine == "perch":
        return PerchEngine(args.path, args.threads, args.workload)
    if args.engine == "llama.cpp":
        return LlamaCppEngine(args.path, args.threads, args.lib_dir, args.binding_dir)
    if args.engine == "openvino":
        return openvino_engine(args.path, args.threads)
    if args.engine == "optimum":
        return optimum_engine(args.path, args.threads)
    raise SystemExit(f"unknown engine {args.engine}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, choices=("perch", "llama.cpp", "openvino", "optimum"))
    ap.add_argument("--path", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workload", default=None, help="perch only: session options preset")
    ap.add_argument("--lib-dir", default=None, help="llama.cpp only: where libllama.so is")
    ap.add_argument("--binding-dir", default=None, help="llama.cpp only: the unpacked llama-cpp-python source")
    ap.add_argument("--quantize-to", default=None, help="llama.cpp only: write a quantized GGUF here (no timing)")
    ap.add_argument("--kind", default=None, help="with --quantize-to: Q8_0, Q4_0, Q4_K_M or Q4_0-pure")
    ap.add_argument("--score-ids", default=None, help="llama.cpp only: .npy windows to score (no timing)")
    ap.add_argument("--logits-out", default=None, help="with --score-ids: where the .npy logits go")
    args = ap.parse_args(argv)
    if args.quantize_to:
        llama_quantize(args.path, args.quantize_to, args.kind, args.lib_dir, args.binding_dir)
        return 0
    if args.score_ids:
        ctx = int(np.load(args.score_ids).shape[1])
        score_windows(LlamaCppEngine(args.path, args.threads, args.lib_dir, args.binding_dir, context=ctx),
                      args.score_ids, args.logits_out)
        return 0
    base = rss_mb()
    t0 = time.perf_counter()
    engine = make_engine(args)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    prompt_ids, decode_ids = token_plan(engine.vocab, args.prompt, args.steps)
    result = measure(engine, prompt_ids, decode_ids, args.repeats)
    result.update(load_s=round(load_s, 2), base_rss_mb=base, loaded_rss_mb=loaded, peak_rss_mb=peak_mb())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
