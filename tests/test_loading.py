"""perch.loading / perch.archs against real transformers, safetensors, bitsandbytes and peft on tiny models.

Every model here is random (hidden 64, 2 layers) and saved with save_pretrained, so each test reads files
exactly as a user's checkpoint would be read.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, FalconH1Config, FalconMambaConfig, LlamaConfig

from perch.archs import ARCH_MODULES, all_archs, arch_module, describe_supported, detect_arch
from perch.archs.falcon import falcon_layout, falcon_variant
from perch.errors import PerchError, UnsupportedModel
from perch.loading.checkpoint import (build_hf_model, load_checkpoint, load_config, load_state_dict,
                           resolve_model_dir)
from tests.tiny_models import FALCON, MAMBA, TINY, copy_model, edit_config, logits

H1 = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          mamba_d_ssm=64, mamba_n_heads=4, mamba_d_state=16)

# ---------------------------------------------------------------- the registry
def test_every_supported_arch_has_a_tiny_model():
    assert {arch for _, arch, _ in TINY.values()} == set(ARCH_MODULES)


@pytest.mark.parametrize("name", TINY)
def test_roundtrip_reproduces_logits_exactly(saved, name):
    model, path = saved[name]
    ckpt = load_checkpoint(path)
    assert ckpt.arch == TINY[name][1] and ckpt.model_dir == path.resolve()
    assert ckpt.source["format"] == "safetensors" and ckpt.source["dequantized_from"] is None
    assert set(ckpt.state_dict) == set(model.state_dict())
    if TINY[name][2]:
        assert falcon_variant(ckpt.config) == TINY[name][2]
    rebuilt = build_hf_model(ckpt.config, ckpt.state_dict)
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    for (n, b), (_, ref) in zip(rebuilt.named_buffers(), model.named_buffers()):
        assert torch.equal(b, ref), n  # rotary inv_freq, Mamba's weightless-norm ones
    assert torch.equal(logits(rebuilt), logits(model))


@pytest.mark.parametrize("name", ["falcon_multi_query", "falcon_mamba", "falcon_h1"])
def test_a_config_without_a_size_field_is_refused_by_name(saved, tmp_path, name):
    """Every architecture names its own REQUIRED_FIELDS; dropping any one is refused naming it."""
    _, path = saved[name]
    for field in arch_module(TINY[name][1]).REQUIRED_FIELDS:
        d = copy_model(path, tmp_path / field)
        cfg = json.loads((d / "config.json").read_text())
        del cfg[field]
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(PerchError, match=f"has no {field}: .*add them to config.json"):
            load_checkpoint(d)


def test_falcon_layout_resolves_transformers_rules():
    lay = falcon_layout(TINY["falcon_multi_query"][0]())
    assert (lay.num_kv_heads, lay.parallel_attn, lay.layer_norms) == (1, True, ("input_layernorm",))
    lay = falcon_layout(TINY["falcon_grouped"][0]())
    assert (lay.num_kv_heads, lay.layer_norms) == (2, ("ln_attn", "ln_mlp"))
    lay = falcon_layout(TINY["falcon_multi_head_sequential"][0]())
    assert (lay.num_kv_heads, lay.parallel_attn) == (4, False)
    assert lay.layer_norms == ("input_layernorm", "post_attention_layernorm")
    text = describe_supported()
    assert all(n in text for m in all_archs().values() for n in m.HF_MODEL_TYPES + m.HF_ARCHITECTURES)


def test_rotary_buffers_without_transformers_init():
    """The fallback for transformers versions whose _init_weights leaves rotary buffers alone."""
    from perch.loading.checkpoint import _rebuild_buffers

    config = FalconConfig(**FALCON)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rotary = model.transformer.rotary_emb
    _rebuild_buffers(model, "transformer.rotary_emb", rotary, ["inv_freq", "original_inv_freq"], torch.device("cpu"))
    expected = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)  # head_dim 16
    assert torch.equal(rotary.inv_freq, expected) and torch.equal(rotary.original_inv_freq, expected)


@pytest.mark.parametrize("config, needle", [
    (FalconConfig(**FALCON, alibi=True), "ALiBi"),
    (LlamaConfig(), "model_type 'llama'"),
    (FalconConfig(**FALCON, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "RoPE"),
    (FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2, parallel_attn=False), "parallel_attn"),
    (FalconMambaConfig(**MAMBA, quantization_config={"quant_method": "gptq", "bits": 4}), "gptq"),
    (FalconH1Config(**H1, time_step_limit=(0.0, 0.5)), "time_step_limit"),
    (FalconH1Config(**H1, hidden_act="gelu"), "hidden_act"),
    (FalconH1Config(**H1, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "RoPE"),
])
def test_unsupported_configs(config, needle):
    with pytest.raises(UnsupportedModel, match="^not supported:") as err:
        detect_arch(config)
    assert needle in str(err.value) and "perch export --list" in str(err.value)


def test_unknown_model_type_on_disk_is_unsupported(saved, tmp_path):
    path = copy_model(saved["falcon_multi_query"][1], tmp_path / "m")
    edit_config(path, model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(UnsupportedModel, match="^not supported: model_type 'mamba'"):
        load_checkpoint(path)
    edit_config(path, model_type="not_a_transformers_model")
    with pytest.raises(UnsupportedModel, match="^not supported:"):
        load_config(path)


# ---------------------------------------------------------------- files
def test_sharded_safetensors(saved, tmp_path):
    model, _ = saved["falcon_grouped"]
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    ckpt = load_checkpoint(tmp_path)
    assert len(ckpt.source["files"]) == len(set(shards))
    assert torch.equal(logits(build_hf_model(ckpt.config, ckpt.state_dict)), logits(model))


def test_legacy_refinedweb_configs_become_falcon_config(saved, tmp_path):
    legacy = {"architectures": ["RWForCausalLM"], "auto_map": {"AutoConfig": "configuration_RW.RWConfig",
              "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"}, "n_embed": 64, "n_head": 4, "n_layer": 2,
              "vocab_size": 96, "alibi": False, "bias": False, "parallel_attn": True, "layer_norm_epsilon": 1e-5,
              "apply_residual_connection_post_layernorm": False, "bos_token_id": 11, "eos_token_id": 11}
    for name, extra in (("falcon_multi_query", {"model_type": "RefinedWebModel", "multi_query": True}),
                        ("falcon_grouped", {"model_type": "RefinedWeb", "n_head_kv": 2})):
        model, src = saved[name]
        path = copy_model(src, tmp_path / name)
        (path / "config.json").write_text(json.dumps({**legacy, **extra}))
        ckpt = load_checkpoint(path)
        assert type(ckpt.config) is FalconConfig and ckpt.arch == "falcon"
        assert falcon_variant(ckpt.config) == TINY[name][2]
        assert torch.equal(logits(build_hf_model(ckpt.config, ckpt.state_dict)), logits(model))


def test_pickle_needs_allow_pickle(saved, tmp_path):
    model, src = saved["falcon_mamba"]
    shutil.copy(src / "config.json", tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(PerchError, match="--allow-pickle"):
        load_checkpoint(tmp_path)
    ckpt = load_checkpoint(tmp_path, allow_pickle=True)
    assert ckpt.source["format"] == "pickle"
    assert torch.equal(logits(build_hf_model(ckpt.config, ckpt.state_dict)), logits(model))
    (tmp_path / "pytorch_model.bin").unlink()  # now sharded, as older save_pretrained wrote big models
    keys, index = list(model.state_dict()), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: model.state_dict()[k] for k in part}, tmp_path / name)
        index |= dict.fromkeys(part, name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(PerchError, match="--allow-pickle"):
        load_checkpoint(tmp_path)
    ckpt = load_checkpoint(tmp_path, allow_pickle=True)
    assert len(ckpt.source["files"]) == 2
    assert torch.equal(logits(build_hf_model(ckpt.config, ckpt.state_dict)), logits(model))


def test_bad_files_give_perch_errors(saved, tmp_path):
    path = copy_model(saved["falcon_multi_query"][1], tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PerchError, match="model.safetensors.*re-download"):
        load_state_dict(path)
    weights.unlink()
    with pytest.raises(PerchError, match="no weights in"):
        load_state_dict(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(PerchError, match="config.json is unreadable or not valid JSON"):
        load_config(path)
    (path / "config.json").unlink()
    with pytest.raises(PerchError, match="config.json not found"):
        load_checkpoint(path)


def test_config_weights_mismatch(saved, tmp_path):
    path = copy_model(saved["falcon_multi_query"][1], tmp_path / "m")
    edit_config(path, num_hidden_layers=3, num_attention_heads=8)
    with pytest.raises(PerchError, match="does not match its config.json") as err:
        load_checkpoint(path)  # checked on load, before any backend or transformers model is built
    assert "missing from the weights: transformer.h.2." in str(err.value)
    assert "query_key_value.weight is (96, 64), the config needs (80, 64)" in str(err.value)
    state_dict = load_checkpoint(saved["falcon_multi_query"][1]).state_dict
    with pytest.raises(PerchError, match="does not match the weights"):  # build_hf_model's own check
        build_hf_model(ckpt_config(path), state_dict)


def ckpt_config(path):
    return load_config(path)


def test_hub_id_from_local_cache(saved, tmp_path, monkeypatch):
    model, src = saved["falcon_mamba"]
    repo = tmp_path / "home" / "hub" / "models--tiny-org--tiny-mamba"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():  # the hub's layout: snapshot files are symlinks to content-addressed blobs
        shutil.copy(f, repo / "blobs" / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(repo / "blobs" / f"blob-{f.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("tiny-org/tiny-mamba") == snapshot
    ckpt = load_checkpoint("tiny-org/tiny-mamba")
    assert torch.equal(logits(build_hf_model(ckpt.config, ckpt.state_dict)), logits(model))
    with pytest.raises(PerchError) as err:
        resolve_model_dir("tiny-org/absent")
    assert "no directory" in str(err.value) and str(tmp_path / "home" / "hub") in str(err.value)
