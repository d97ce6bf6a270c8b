"""swift-transformers' `LanguageModel`, replayed call by call in Python over Perch's Core ML executor.

swift-transformers runs only where Core ML does (Apple platforms), so this driver mirrors what its Swift
code feeds a model, line by line, and runs the package with `perch.runtimes.mil` (which checks every feed
against the package's declared names, dtypes and shape ranges, as Core ML does). Read at
huggingface/swift-transformers@eec09bdffb04a6f13eaed57c7b4acca3f6729a6c; line numbers below are from that
commit:
- Sources/Models/LanguageModel.swift 162-182, 269-320: the stateful class is chosen when the model has
  states named `keyCache` and `valueCache` (one without the other is a fatal error); else the plain class.
- 95-123: the context range comes from `inputIds`' last axis (min = range lower bound, max = upper).
- 494-504: the stateful class needs a ranged query length (max - min > 1).
- 506-509: `resetState()` makes a fresh MLState and goes back to prefilling.
- 511-562: stateful call: the whole prompt first, then only the last token; `causalMask` (and
  `attentionMask`, if the model declares one) all zeros, Float16, shape [1, 1, 1, tokenCount + 1], where
  tokenCount counts every token so far; scores are read at the last input position of rank-3 `logits`.
- 60-86: stateless call: pad to maxContextLength with the pad id, `attentionMask` int32 1/0 if declared,
  scores at position tokenCount - 1; no state is passed.
- 227-238: the model name (used to fetch config and tokenizer) is the `co.huggingface.exporters.name`
  user metadata, else the display name.
- Sources/Generation/Generation.swift 65-109 and 176-197, Decoders.swift 7-11: greedy loop: argmax of the
  scores, stop at eos or at maxNewTokens + prompt length; `Models/LanguageModelTypes.swift` 106-118:
  `generate(config:prompt:)` calls `resetState()` first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from perch.runtimes.mil.executor import MilExecutor, MilProgram

SWIFT_TRANSFORMERS_COMMIT = "eec09bdffb04a6f13eaed57c7b4acca3f6729a6c"
INPUT_IDS, ATTENTION_MASK, CAUSAL_MASK, KEY_CACHE, VALUE_CACHE, LOGITS = (
    "inputIds", "attentionMask", "causalMask", "keyCache", "valueCache", "logits")


class SwiftLanguageModel:
    """`LanguageModel.loadCompiled(url:)` on a package's default function (MLModel loads that one)."""

    def __init__(self, package: str | Path):
        program = MilProgram.load(package)
        self.executor = MilExecutor(program)  # no functionName in MLModelConfiguration: the default one
        self.inputs = {t.name: t for t in self.executor.inputs}
        self.state_names = {s.name for s in self.executor.states}
        self.metadata = dict(program.spec.description.metadata.userDefined)
        ids = self.inputs[INPUT_IDS]  # LanguageModel.swift 241-243: force-unwrapped, so required
        lo, hi = ids.bounds[-1]
        self.min_context, self.max_context = lo, (hi if hi is not None else 128)
        self.stateful = self._kv_cache_availability()
        if self.stateful and not self.max_context - self.min_context > 1:
            raise RuntimeError("Expecting ranged query sequence length.")  # 501-503
        self.state = None
        self.mode = "prefilling"
        self.calls: list[dict[str, tuple]] = []  # every feed's shapes, for tests to inspect

    def _kv_cache_availability(self) -> bool:
        k, v = KEY_CACHE in self.state_names, VALUE_CACHE in self.state_names
        if k != v:
            raise RuntimeError("Invalid model configuration, expecting KV cache for states")  # 273-275
        if k:
            return True
        if KEY_CACHE in self.inputs or VALUE_CACHE in self.inputs:
            raise RuntimeError("KV Cache using IO is currently not supported")  # 305-319
        return False

    @property
    def model_name(self) -> str:
        return self.metadata.get("co.huggingface.exporters.name", "")

    def reset_state(self) -> None:
        if self.stateful:
            self.state = self.executor.make_state()
            self.mode = "prefilling"

    def predict_next_token_scores(self, tokens: np.ndarray, pad_token_id: int = 0) -> np.ndarray:
        """tokens (1, every token so far) int32 -> next-token scores (1, 1, vocab)."""
        if self.stateful:
            return self._stateful_scores(tokens)
        return self._stateless_scores(tokens, pad_token_id)

    def _stateful_scores(self, tokens: np.ndarray) -> np.ndarray:
        if self.state is None:
            raise RuntimeError("Encountered uninitialized `state`.")  # 517-523
        token_count = tokens.shape[1]
        input_ids = tokens if self.mode == "prefilling" else tokens[:, -1:]  # 524-528
        self.mode = "extending"
        feeds = {INPUT_IDS: input_ids.astype(np.int32)}
        zeros = np.zeros((1, 1, 1, token_count + 1), dtype=np.float16)  # 537 and 546
        if ATTENTION_MASK in self.inputs:
            feeds[ATTENTION_MASK] = zeros
        if CAUSAL_MASK in self.inputs:
            feeds[CAUSAL_MASK] = zeros
        self.calls.append({k: v.shape for k, v in feeds.items()})
        scores = np.asarray(self.executor.predict(feeds, self.state)[LOGITS])
        assert scores.ndim == 3  # 556
        return scores[:, input_ids.shape[1] - 1][:, None]  # 557-558

    def _stateless_scores(self, tokens: np.ndarray, pad_token_id: int) -> np.ndarray:
        token_count = tokens.shape[1]
        pad = self.max_context - token_count  # 66-68
        input_ids = np.concatenate([tokens, np.full((1, pad), pad_token_id, np.int32)], axis=1)
        feeds = {INPUT_IDS: input_ids.astype(np.int32)}
        if ATTENTION_MASK in self.inputs:  # 70-74
            feeds[ATTENTION_MASK] = np.array([[1] * token_count + [0] * pad], dtype=np.int32)
        self.calls.append({k: v.shape for k, v in feeds.items()})
        scores = np.asarray(self.executor.predict(feeds, None)[LOGITS])
        return scores[:, token_count - 1][:, None]  # 81-82

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 pad_token_id: int = 0) -> tuple[list[int], list[np.ndarray]]:
        """Greedy `generate(config:prompt:)`: returns (every token, prompt included; scores per call)."""
        self.reset_state()  # LanguageModelTypes.swift 108
        tokens = np.array([prompt], dtype=np.int32)
        max_total = max_new_tokens + len(prompt)  # Generation.swift 185 and 78
        scores_seen = []
        while tokens.shape[1] < max_total:  # 80
            scores = self.predict_next_token_scores(tokens, pad_token_id)
            scores_seen.append(scores[0, 0].astype(np.float32))
            next_token = int(np.argmax(scores, axis=-1).reshape(-1)[0])  # Decoders.swift 8
            if eos_token_id is not None and next_token == eos_token_id:  # 98-100
                break
            tokens = np.concatenate([tokens, [[next_token]]], axis=1).astype(np.int32)  # 102
        return [int(t) for t in tokens[0]], scores_seen
