"""Text generation over any Runtime: greedy or sampled (temperature, top-k, top-p, seed), stopping on EOS
or a stop string, streaming text as it is decoded."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from perch.errors import PerchError
from perch.runtimes.base import Runtime


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise PerchError("sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """(B, V) logits -> (B,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(z, axis=-1)[:, -min(sampling.top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < sampling.top_p  # always keeps the first
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate_ids(runtime: Runtime, prompt_ids: np.ndarray, max_new_tokens: int, *, sampling: Sampling = Sampling(),
                 eos_token_id: int | None = None, attention_mask: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yield (B,) new token ids step by step; a row that produced EOS keeps emitting EOS."""
    if max_new_tokens < 1:
        raise PerchError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    rng = np.random.default_rng(sampling.seed)
    runtime.reset(prompt_ids.shape[0])
    logits = runtime.prefill(prompt_ids, attention_mask, last_only=True)[:, -1]
    done = np.zeros(prompt_ids.shape[0], dtype=bool)
    # Stop at the artifact's context limit rather than fail after streaming half an answer.
    max_new_tokens = min(max_new_tokens, runtime.max_context - runtime.position + 1)
    for i in range(max_new_tokens):
        tok = pick(logits, sampling, rng)
        if eos_token_id is not None:
            tok = np.where(done, eos_token_id, tok)
            done |= tok == eos_token_id
        yield tok
        if done.all() or i == max_new_tokens - 1:
            return
        logits = runtime.step(tok)


def generate_text(runtime: Runtime, tokenizer, prompt: str, max_new_tokens: int, *, sampling: Sampling = Sampling(),
                  stop: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None) -> str:
    """Generate for one prompt, streaming decoded text to `on_text`; stops at EOS or any stop string."""
    ids = np.array([tokenizer.encode(prompt)], dtype=np.int64)
    if ids.shape[1] == 0:
        raise PerchError("the prompt encodes to no tokens; give a non-empty --prompt")
    new: list[int] = []
    shown = ""
    for tok in generate_ids(runtime, ids, max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id):
        if tokenizer.eos_token_id is not None and int(tok[0]) == tokenizer.eos_token_id:
            break
        new.append(int(tok[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        hit = [text.index(s) for s in stop if s in text]
        if hit:
            text = text[: min(hit)]
        if on_text and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
        if hit:
            return text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if on_text and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
