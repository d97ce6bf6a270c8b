"""ONNX Runtime GenAI's `genai_config.json` for a Perch Falcon ONNX export (see docs/clients.md).

Names come from the manifest's bindings (what the ONNX naming function realised), never restated here.
"""
from __future__ import annotations

import json
from pathlib import Path

from perch.errors import PerchError

GENAI_CONFIG = "genai_config.json"
GENAI_NO_SSM = ("ONNX Runtime GenAI's decoder feeds only a growing K,V cache (past_key_values.N.key/value); "
                "it has no inputs for a recurrent model's conv and SSM states, so it cannot carry the Mamba layers' "
                "state between steps (Falcon-Mamba, Falcon-H1). Run this export with Perch's runtime or onnxruntime "
                "directly")


def genai_config(manifest, generation: dict | None = None) -> dict:
    """The decoder config genai reads: our graph's names, head sizes and search defaults.

    Why "decoder": genai's generic decoder-only model type (its "falcon" type is not registered). The in-place
    variant's K,V buffers are fed as both past and present, so genai must share one buffer between them.
    """
    kinds = {s.kind for s in manifest.io.states}
    if kinds != {"key", "value"}:  # genai's decoder carries a K,V cache and nothing else
        raise PerchError(f"no genai_config.json for {manifest.arch} (states {sorted(kinds)}): {GENAI_NO_SSM}")
    hf, io = manifest.hf_config, manifest.io
    key = io.state("key")
    # genai takes printf templates: the realised names of layer 0 with the layer number as %d.
    names = {kind: tuple(manifest.names(role)[f"{kind}.0"].replace(".0.", ".%d.") for role in ("past", "present"))
             for kind in ("key", "value")}
    gen = generation or {}
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": manifest.model_file,
        "head_size": int(key.shape[-1]),
        "hidden_size": int(hf["hidden_size"]),
        "num_attention_heads": int(hf["num_attention_heads"]),
        "num_hidden_layers": int(hf["num_hidden_layers"]),
        "num_key_value_heads": int(key.shape[1]),
        "inputs": {**{k: v for k, v in manifest.names("input").items()},
                   "past_key_names": names["key"][0], "past_value_names": names["value"][0]},
        "outputs": {"logits": manifest.names("output")["logits"],
                    "present_key_names": names["key"][1], "present_value_names": names["value"][1]},
    }
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": gen.get("bos_token_id", hf.get("bos_token_id")),
            "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", hf.get("pad_token_id", eos)),
            "context_length": int(manifest.max_context),
            "vocab_size": int(hf["vocab_size"]),
            "decoder": decoder,
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": int(manifest.max_context), "min_length": 0,
            "past_present_share_buffer": manifest.variant == "inplace",
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "num_return_sequences": 1,
        },
    }


def write_genai_config(manifest, out_dir: str | Path) -> str:
    out_dir = Path(out_dir)
    gen_path = out_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(manifest, generation), indent=2) + "\n")
    return GENAI_CONFIG
