"""Speed side by side: time to first token, prefill and decode throughput, peak host RSS and GPU memory.

Both runtimes live in one process, so peak RSS is the process's resident size *while that runtime runs*
(sampled every few ms), not memory owned by it alone; compare the two as "what running it costs on top of
everything loaded". Every runtime returns numpy logits, so each call is synchronous (GPU work included)
and wall-clock timing is exact without explicit synchronisation.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from perch.errors import PerchError


@dataclass
class SpeedResult:
    runtime: str
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    ttft_ms: float  # reset + prefill of the prompt + picking the first token
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms_per_token: float
    peak_rss_mb: float | None
    peak_gpu_mb: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_bytes() -> int | None:
    try:  # Linux: current resident set, cheap to read
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def _torch_cuda():
    """torch.cuda if torch is already imported and CUDA is in use; never imports torch itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class PeakMemory:
    """Samples process RSS and device memory in use (all allocators: torch, onnxruntime) in a thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval, self.peak_rss, self.peak_gpu = interval_s, 0, 0
        self._stop, self._cuda = threading.Event(), _torch_cuda()

    def _sample(self) -> None:
        rss = _rss_bytes()
        if rss is not None:
            self.peak_rss = max(self.peak_rss, rss)
        if self._cuda is not None:
            free, total = self._cuda.mem_get_info()
            self.peak_gpu = max(self.peak_gpu, total - free)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def rss_mb(self) -> float | None:
        return self.peak_rss / 2**20 if self.peak_rss else None

    @property
    def gpu_mb(self) -> float | None:
        return self.peak_gpu / 2**20 if self._cuda is not None else None


def _one_run(runtime, ids: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds for `decode_tokens` greedy steps)."""
    t0 = time.perf_counter()
    runtime.reset(1)
    tok = int(runtime.prefill(ids[None], last_only=True)[0, -1].argmax())
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        tok = int(runtime.step(np.array([tok]))[0].argmax())
    return t1 - t0, time.perf_counter() - t1


def measure(runtime, prompt_ids, *, decode_tokens: int = 32, warmup: int = 1, repeats: int = 3) -> SpeedResult:
    """Time `runtime` on one prompt (batch 1): `warmup` untimed runs, then the median of `repeats`."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if len(ids) + decode_tokens > runtime.max_context:
        raise PerchError(f"speed run needs {len(ids) + decode_tokens} tokens but {runtime.name} holds "
                         f"{runtime.max_context}; use a shorter prompt or fewer decode tokens")
    if repeats < 1 or decode_tokens < 1:
        raise PerchError("speed measurement needs repeats >= 1 and decode_tokens >= 1")
    for _ in range(warmup):
        _one_run(runtime, ids, decode_tokens)
    with PeakMemory() as mem:
        runs = [_one_run(runtime, ids, decode_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return SpeedResult(runtime=getattr(runtime, "name", "runtime"), prompt_tokens=len(ids), decode_tokens=decode_tokens,
                       repeats=repeats, ttft_ms=ttft * 1e3, prefill_tok_s=len(ids) / ttft,
                       decode_tok_s=decode_tokens / decode, decode_ms_per_token=decode / decode_tokens * 1e3,
                       peak_rss_mb=mem.rss_mb, peak_gpu_mb=mem.gpu_mb)


def compare(artifact: SpeedResult, reference: SpeedResult) -> dict:
    """Both results and the artifact/reference ratio of each figure (>1: the artifact's figure is larger)."""
    a, r = artifact.to_dict(), reference.to_dict()
    keys = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_ms_per_token", "peak_rss_mb", "peak_gpu_mb")
    ratios = {k: (a[k] / r[k] if a[k] is not None and r[k] else None) for k in keys}
    return {"reference": r, "artifact": a, "ratios": ratios}
