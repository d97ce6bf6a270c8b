"""The step API shared by every runtime: reset, prefill (continues from state), step, state.

The base class owns the bookkeeping every backend needs the same way: the running attention mask (for
left padding), per-row positions, the context limit, and input checks. A backend implements `_forward`.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from perch.errors import PerchError
from perch.spec import MASK_MIN, ModelIO


def available_bytes() -> int:
    """MemAvailable (free plus reclaimable page cache): "free" alone is near zero on a busy machine."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc (macOS): total memory


class Runtime(ABC):
    """One model, one batch of sequences, state kept between calls.

    prefill(ids, mask) -> logits (B, T, V) float32, continuing from the stored state (B, 1, V) with
    last_only=True, which lets a backend skip the lm_head for the other positions;
    step(ids) -> logits (B, V) for one new token per row; state() -> {"key.0": array, ...}.
    """

    io: ModelIO
    vocab_size: int
    max_context: int
    name: str = "runtime"
    logit_bits: int | None = None  # significant bits of the logits as computed (8: a bf16 model); None: fp32 or unknown

    def reset(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size
        self.mask = np.zeros((batch_size, 0), dtype=np.int64)  # 1 = real token, 0 = left pad
        self._reset(batch_size)

    @property
    def position(self) -> int:
        """Tokens stored so far per row (pads included): where the next token is written."""
        return self.mask.shape[1]

    last_only = False  # read by a backend's _forward during a prefill(last_only=True)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                last_only: bool = False) -> np.ndarray:
        ids = self._check_ids(input_ids)
        b, t = ids.shape
        if attention_mask is None:
            attention_mask = np.ones((b, t), dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if attention_mask.shape != (b, t):
            raise PerchError(f"attention_mask has shape {attention_mask.shape}, expected {(b, t)} like input_ids")
        if self.position + t > self.max_context:
            raise PerchError(
                f"context of {self.position + t} tokens exceeds this model's max context {self.max_context}; "
                "shorten the prompt or export with a larger --max-context"
            )
        mask = np.concatenate([self.mask, attention_mask], axis=1)
        # Left-padded rows count positions from their first real token, as transformers does.
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -t:]
        self.last_only = last_only
        try:
            logits = self._forward(ids, mask, positions)
        finally:
            self.last_only = False
        if last_only:
            logits = logits[:, -1:]
        self.mask = mask  # only once the backend took the tokens: a failed call leaves the state consistent
        return np.asarray(logits, dtype=np.float32)

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        return self.prefill(ids, last_only=True)[:, -1]

    def _check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise PerchError(f"input_ids must be integers, got {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise PerchError(f"input_ids must have shape (batch, tokens>=1), got {ids.shape}")
        if not hasattr(self, "mask"):
            self.reset(ids.shape[0])
        if ids.shape[0] != self.batch_size:
            raise PerchError(f"batch of {ids.shape[0]} rows after reset({self.batch_size}); call reset() first")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise PerchError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids.astype(np.int64)

    @abstractmethod
    def _reset(self, batch_size: int) -> None:
        """Clear the state for a new batch."""

    @abstractmethod
    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run T new tokens. mask: (B, past+T) over everything stored; positions: (B, T) rotary positions."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """The stored state as float32 arrays named like `ModelIO.state_layer_names()`."""

    def close(self) -> None:
        """Release device memory or sessions; the default has nothing to release."""


def additive_causal_mask(mask: np.ndarray, query_len: int) -> np.ndarray:
    """(B, S) 0/1 key mask -> (B, 1, T, S) fp16 additive mask; the T queries are the last T keys."""
    s = mask.shape[1]
    allowed = (np.arange(s)[None, :] <= np.arange(s - query_len, s)[:, None])[None] & (mask[:, None, :] > 0)
    return np.where(allowed, 0.0, MASK_MIN).astype(np.float16)[:, None]


def model_inputs(io: ModelIO, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds under canonical names, built by the I/O spec's mask contract (perch.spec.MASK_CONTRACTS).

    `mask` covers everything stored (B, past+T): "keys" takes it whole, "new" takes the last T columns,
    "additive" becomes the (B, 1, T, past+T) causal mask, "none" has no input and cannot skip padding.
    """
    t = input_ids.shape[1]
    if io.mask == "none" and not mask.all():
        raise PerchError(f"this {io.arch} export has no attention-mask input, so it cannot skip padding; "
                         "run padded rows one at a time without padding")
    feeds = {"input_ids": input_ids, "position_ids": positions,
             "attention_mask": mask if io.mask == "keys" else mask[:, -t:]}
    if io.mask == "additive":
        feeds["causal_mask"] = additive_causal_mask(mask, t)
    elif io.mask == "additive_plus_one":  # swift-transformers' convention: one column past the keys
        feeds["causal_mask"] = np.pad(additive_causal_mask(mask, t), ((0, 0), (0, 0), (0, 0), (0, 1)))
    missing = [s.name for s in io.inputs if s.name not in feeds]
    if missing:
        raise PerchError(f"graph input(s) {missing} are not ones Perch knows how to feed; re-export with this Perch")
    return {s.name: np.ascontiguousarray(feeds[s.name], dtype=np.dtype(s.dtype)) for s in io.inputs}


def empty_state(io: ModelIO, batch_size: int) -> dict[str, np.ndarray]:
    """Per-layer state before the first token: zero-length caches, zero conv/SSM states."""
    out = {}
    for i in range(io.num_layers):
        for s in io.states:
            out[f"{s.kind}.{i}"] = np.zeros(s.concrete_shape(batch_size, 0), dtype=np.dtype(s.dtype))
    return out
