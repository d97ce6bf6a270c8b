"""A seeded config fuzzer: random tiny Falcon / Falcon-Mamba / Falcon-H1 configs, valid ones and ones Perch must refuse.

`sample(rng)` draws one case: a config.json dict, and whether Perch must export it (`refuse` is None) or
refuse it (`refuse` names the field the refusal must mention). `run_case` writes a random-weight
checkpoint for it, exports it to each backend and runs `perch check`; a refused case must fail with
PerchError naming that field and leave no output. Used by tests/test_fuzz_configs.py (a few per run)
and benchmarks/fuzz_configs.py (hundreds).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from perch.dev.presets import TINY_VOCAB
from perch.errors import PerchError

_SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


@dataclass
class Case:
    arch: str
    config: dict
    refuse: str | None = None  # the config field a refusal must name; None: must export and pass
    label: str = ""
    results: dict = field(default_factory=dict)


def _falcon(rng: random.Random) -> dict:
    head_dim = rng.choice([4, 8, 16, 32])
    heads = rng.choice([1, 2, 3, 4, 6, 8, 12])
    cfg = dict(model_type="falcon", architectures=["FalconForCausalLM"], vocab_size=TINY_VOCAB + rng.choice([0, 8]),
               hidden_size=head_dim * heads, num_attention_heads=heads, num_hidden_layers=rng.randint(1, 3),
               layer_norm_epsilon=rng.choice([1e-5, 1e-6]), bias=rng.random() < 0.3, alibi=False,
               max_position_embeddings=rng.choice([64, 128, 512]), rope_theta=rng.choice([10000.0, 500000.0]),
               tie_word_embeddings=rng.random() < 0.5, **_SPECIAL)
    variant = rng.choice(["multi_query", "grouped", "multi_head"])
    if variant == "grouped":
        kv = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
        cfg.update(new_decoder_architecture=True, num_kv_heads=kv, parallel_attn=True,
                   num_ln_in_parallel_attn=rng.choice([None, 1, 2]))
    else:
        cfg.update(new_decoder_architecture=False, multi_query=variant == "multi_query",
                   parallel_attn=rng.random() < 0.7)
    if rng.random() < 0.3:
        cfg["ffn_hidden_size"] = cfg["hidden_size"] * rng.choice([2, 3])
    return cfg


def _falcon_mamba(rng: random.Random) -> dict:
    return dict(model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"], vocab_size=TINY_VOCAB,
                hidden_size=rng.choice([16, 32, 48, 64]), num_hidden_layers=rng.randint(1, 3),
                state_size=rng.choice([4, 8, 16]), conv_kernel=rng.choice([2, 3, 4]), expand=rng.choice([1, 2]),
                time_step_rank=rng.choice([4, 8, 16]), use_conv_bias=rng.random() < 0.7,
                use_bias=rng.random() < 0.3, mixer_rms_eps=rng.choice([1e-6, 1e-5]),
                tie_word_embeddings=rng.random() < 0.5, **_SPECIAL)


def _falcon_h1(rng: random.Random) -> dict:
    heads = rng.choice([2, 4, 8])
    m_heads, m_head_dim = rng.choice([2, 4, 8]), rng.choice([8, 16])
    mult = lambda: round(rng.uniform(0.5, 1.5), 2)  # noqa: E731 - µP multipliers: any positive value is valid
    return dict(model_type="falcon_h1", architectures=["FalconH1ForCausalLM"], vocab_size=TINY_VOCAB,
                hidden_size=rng.choice([32, 64, 96]), intermediate_size=rng.choice([64, 128]),
                num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads,
                num_key_value_heads=rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0]),
                head_dim=rng.choice([8, 16, 32]), mamba_n_heads=m_heads, mamba_d_head=m_head_dim,
                mamba_d_ssm=m_heads * m_head_dim, mamba_n_groups=rng.choice([g for g in (1, 2) if m_heads % g == 0]),
                mamba_d_state=rng.choice([8, 16]), mamba_d_conv=rng.choice([2, 3, 4]),
                mamba_chunk_size=rng.choice([8, 16]), mamba_rms_norm=rng.random() < 0.5,
                mamba_norm_before_gate=rng.random() < 0.5, mamba_conv_bias=rng.random() < 0.7,
                mamba_proj_bias=rng.random() < 0.3, projectors_bias=rng.random() < 0.3,
                attention_bias=rng.random() < 0.3, mlp_bias=rng.random() < 0.3,
                rms_norm_eps=rng.choice([1e-5, 1e-6]), max_position_embeddings=rng.choice([64, 512]),
                embedding_multiplier=mult(), lm_head_multiplier=mult(), key_multiplier=mult(),
                attention_in_multiplier=mult(), attention_out_multiplier=mult(), ssm_in_multiplier=mult(),
                ssm_out_multiplier=mult(), mlp_multipliers=[mult(), mult()],
                ssm_multipliers=[mult() for _ in range(5)], initializer_range=0.1,
                tie_word_embeddings=rng.random() < 0.5, **_SPECIAL)


# (arch, field, a bad value or None to delete the field): each must be refused naming `field`.
BAD = [
    ("falcon", "activation", "relu"), ("falcon", "activation", "silu"), ("falcon", "activation", "gelu_new"),
    ("falcon", "alibi", True), ("falcon", "hidden_size", None), ("falcon", "num_attention_heads", None),
    ("falcon", "num_hidden_layers", None), ("falcon", "rope_scaling", {"type": "linear", "factor": 2.0}),
    ("falcon_mamba", "hidden_act", "relu"), ("falcon_mamba", "hidden_act", "gelu"),
    ("falcon_mamba", "hidden_size", None), ("falcon_mamba", "num_hidden_layers", None),
    ("falcon_h1", "hidden_act", "gelu"), ("falcon_h1", "time_step_limit", [0.0, 10.0]),
    ("falcon_h1", "rope_scaling", {"type": "linear", "factor": 2.0}),
]


# transformers 5 reads rope_scaling into rope_parameters, so the refusal names the setting, not the key
NAMED_AS = {"rope_scaling": "RoPE scaling"}


# arch -> its config sampler (dev data, one row per fuzzed architecture)
SAMPLERS = {"falcon": lambda rng: _falcon(rng), "falcon_mamba": lambda rng: _falcon_mamba(rng),
            "falcon_h1": lambda rng: _falcon_h1(rng)}


def sample(rng: random.Random, bad_share: float = 0.25) -> Case:
    """One random case; about `bad_share` of them carry one unsupported field."""
    if rng.random() < bad_share:
        arch, key, value = rng.choice(BAD)
        cfg = SAMPLERS[arch](rng)
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
        return Case(arch, cfg, refuse=key, label=f"{arch} {key}={value!r}")
    arch = rng.choice(sorted(SAMPLERS))
    cfg = SAMPLERS[arch](rng)
    return Case(arch, cfg, label=_describe(cfg))


def _describe(cfg: dict) -> str:
    keys = ("hidden_size", "num_attention_heads", "num_kv_heads", "multi_query", "new_decoder_architecture",
            "parallel_attn", "num_hidden_layers", "state_size", "conv_kernel", "expand", "mamba_n_heads",
            "mamba_n_groups", "mamba_rms_norm", "mamba_norm_before_gate", "tie_word_embeddings")
    return f"{cfg['model_type']} " + " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def write_checkpoint(case: Case, out: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint for `case`: the model from the config as transformers reads it (for a bad
    case, a valid sibling's weights), its config.json exactly as sampled, and the tiny offline tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from perch.dev.tokenizer import build_tokenizer, save_tokenizer

    cfg = dict(case.config)
    if case.refuse:  # weights from the valid config the bad one was derived from
        # fill a deleted size so transformers can build weights (its RoPE wants an even head size)
        cfg.setdefault("hidden_size", 16 * cfg.get("num_attention_heads", 4))
        cfg.setdefault("num_attention_heads", next(d for d in (4, 2, 1) if cfg["hidden_size"] % (2 * d) == 0))
        cfg.setdefault("num_hidden_layers", 2)
        for k in ("activation", "hidden_act", "alibi", "rope_scaling", "time_step_limit"):
            cfg.pop(k, None)
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(case.config, indent=2))
    save_tokenizer(build_tokenizer(TINY_VOCAB), out)
    return out


PROMPTS = ("def main():\n    return", "The quick brown fox")  # short: fits a 64-position config


def run_case(case: Case, root: Path, backends: tuple[str, ...] = ("onnx", "coreml"), seed: int = 0) -> Case:
    """Export `case` to each backend and check it. Fills `case.results[backend]` with one of
    "passed", "check failed: ...", "refused: ..." and "error: ..."."""
    from perch.exporter.export import export
    from perch.exporter.options import options_for
    from perch.validate.runner import check_artifact

    model_dir = write_checkpoint(case, root / "model", seed)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for backend in backends:
        out = root / backend
        try:
            export(model_dir, out, options_for(backend))
        except PerchError as e:
            case.results[backend] = f"refused: {e}"
            continue
        except Exception as e:  # noqa: BLE001 - a crash is a finding, recorded as such
            case.results[backend] = f"error: {type(e).__name__}: {e}"
            continue
        try:
            report = check_artifact(out, prompts=prompts, max_new_tokens=4, quiet=True)
            case.results[backend] = "passed" if report.passed else f"check failed: {report.failure_line()}"
        except Exception as e:  # noqa: BLE001
            case.results[backend] = f"error: {type(e).__name__}: {e}"
    return case


def verdict(case: Case) -> str:
    """"exported" (valid, every backend passed), "refused" (bad, refused naming its field), or "wrong"."""
    if case.refuse is None:
        return "exported" if all(r == "passed" for r in case.results.values()) else "wrong"
    needle = NAMED_AS.get(case.refuse, case.refuse)
    ok = all(r.startswith("refused:") and needle in r for r in case.results.values())
    return "refused" if ok else "wrong"
