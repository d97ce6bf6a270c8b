"""Tiny random transformers models (every tensor perturbed, so a swapped key shows) shared by loader tests."""
from __future__ import annotations

import json
import shutil

import torch
from transformers import AutoModelForCausalLM, FalconConfig, FalconMambaConfig

FALCON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
# bnb's CPU 4-bit forward repacks weights and needs out_features % 32 == 0 and in_features >= its block (64):
# x_proj gives time_step_rank + 2 * state_size = 96 outputs, dt_proj takes time_step_rank = 64 inputs.
MAMBA = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, state_size=16, time_step_rank=64, expand=2)
TINY = {  # name -> (config, expected arch, expected falcon variant)
    "falcon_multi_query": (lambda: FalconConfig(**FALCON), "falcon", "multi_query"),
    "falcon_grouped": (lambda: FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2),
                       "falcon", "grouped"),
    "falcon2_one_norm": (lambda: FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2,
                                              num_ln_in_parallel_attn=1), "falcon", "grouped"),
    "falcon_multi_head_sequential": (lambda: FalconConfig(**FALCON, multi_query=False, parallel_attn=False,
                                                          bias=True), "falcon", "multi_head"),
    "falcon_mamba": (lambda: FalconMambaConfig(**MAMBA, tie_word_embeddings=False), "falcon_mamba", None),
    "falcon_h1": (lambda: _preset_config("falcon-h1-tiny"), "falcon_h1", None),
}


def _preset_config(name: str):
    from perch.dev.presets import make_config

    return make_config(name)
IDS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 33], [9, 9, 70, 2, 14, 51, 6, 80]])


def make_model(name: str, seed: int = 0):
    """A random tiny model whose every tensor differs (norms and biases too), so a swapped key shows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY[name][0]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
