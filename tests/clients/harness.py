"""Drive each real client of our artifacts greedily, and transformers as the truth.

Each function returns the new tokens and the next-token scores the client exposes (numpy float32 rows):
- `reference`: transformers' own greedy `generate` (min_new_tokens = max_new_tokens, so eos never ends a
  run early: every client is asked for the same count), scores from one full forward over the result.
- `genai`: onnxruntime_genai.Model(dir) + Generator, one `generate_next_token` at a time.
- `transformers_js`: tests/clients/tjs_generate.mjs in Node (AutoModelForCausalLM.from_pretrained, local).
- `swift`: tests/clients/swift_feed.py, swift-transformers' LanguageModel feed over our Core ML executor.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))


@cache
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def reference(model_dir: str | Path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    import torch

    model = _hf_model(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        logits = model(out[:, :-1]).logits[0, len(ids) - 1 :].float().numpy()
    return out[0, len(ids) :].tolist(), logits


def genai(artifact: str | Path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    tokens, scores = [], []
    for _ in range(n):  # (with min_length = max_length, is_done() stays False at the last token)
        assert not gen.is_done()
        # get_logits() holds the scores the next token is chosen from (genai runs the model on each new
        # token inside generate_next_token, so read them before it).
        scores.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, np.stack(scores)


def node_modules() -> Path:
    """The folder holding node_modules/@huggingface/transformers, installed on first use (install.sh)."""
    where = Path(os.environ.get("PERCH_NODE_MODULES", ROOT / ".cache" / "clients" / "node"))
    if not (where / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        subprocess.run(["bash", str(HERE / "install.sh"), "node", str(where)], check=True, timeout=900)
    return where


def transformers_js(artifact: str | Path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Tokens from transformers.js' generate(); scores only for the first step (what its forward returns)."""
    env = {**os.environ, "PERCH_NODE_MODULES": str(node_modules())}
    p = subprocess.run(["node", str(HERE / "tjs_generate.mjs"), str(artifact), json.dumps(ids), str(n)],
                       capture_output=True, text=True, timeout=600, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"transformers.js failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["tokens"], np.asarray([out["first_logits"]], dtype=np.float32)


def swift(package: str | Path, ids: list[int], n: int, eos_token_id: int | None = None):
    """(new tokens, scores per call, the driver) from swift-transformers' feed; stops at eos like the app."""
    from swift_feed import SwiftLanguageModel

    lm = SwiftLanguageModel(package)
    tokens, scores = lm.generate(ids, n, eos_token_id=eos_token_id)
    return tokens[len(ids) :], np.stack(scores), lm


def perch_tokens(artifact: str | Path, ids: list[int], n: int) -> list[int]:
    """Perch's own runtime, greedy: what the artifact itself computes (the truth for quantized weights)."""
    from perch.runtimes import open_artifact

    rt = open_artifact(artifact)
    rt.reset(1)
    scores, tokens = rt.prefill(np.array([ids]))[0, -1], []
    for _ in range(n):
        tokens.append(int(np.argmax(scores)))
        scores = rt.step(np.array([tokens[-1]]))[0]
    return tokens


def genai_decoder_config_for(manifest) -> dict:
    """What a user might hand genai for a Falcon-Mamba graph: its generic decoder config (it has no other)."""
    hf = manifest.hf_config
    return {"model": {"type": "decoder", "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
                      "context_length": manifest.max_context, "vocab_size": hf["vocab_size"],
                      "decoder": {"filename": manifest.model_file, "head_size": 1, "hidden_size": hf["hidden_size"],
                                  "num_attention_heads": 1, "num_key_value_heads": 1,
                                  "num_hidden_layers": hf["num_hidden_layers"], "session_options": {},
                                  "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                                  "outputs": {"logits": "logits"}}},
            "search": {"max_length": manifest.max_context, "do_sample": False}}
