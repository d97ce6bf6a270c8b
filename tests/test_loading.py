"""perch.loading / perch.archs against real transformers, safetensors, bitsandbytes and peft on tiny models.

Every model here is random (hidden 64, 2 layers) and saved with save_pretrained, so each test reads files
exactly as a user's checkpoint would be read.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, FalconMambaConfig, LlamaConfig

from perch.archs import SUPPORTED, describe_supported, detect_arch, falcon_layout, falcon_variant
from perch.errors import PerchError, UnsupportedModel
from perch.loading import (build_hf_model, load_checkpoint, load_config, load_state_dict, merge_adapter,
                           resolve_model_dir)

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
}
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, directory it was saved to)."""
    root, out = tmp_path_factory.mktemp("models"), {}
    for name in TINY:
        model = make_model(name)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# ---------------------------------------------------------------- the registry
def test_every_supported_arch_has_a_tiny_model():
    assert {arch for _, arch, _ in TINY.values()} == set(SUPPORTED)


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


def test_falcon_layout_resolves_transformers_rules():
    lay = falcon_layout(TINY["falcon_multi_query"][0]())
    assert (lay.num_kv_heads, lay.parallel_attn, lay.layer_norms) == (1, True, ("input_layernorm",))
    lay = falcon_layout(TINY["falcon_grouped"][0]())
    assert (lay.num_kv_heads, lay.layer_norms) == (2, ("ln_attn", "ln_mlp"))
    lay = falcon_layout(TINY["falcon_multi_head_sequential"][0]())
    assert (lay.num_kv_heads, lay.parallel_attn) == (4, False)
    assert lay.layer_norms == ("input_layernorm", "post_attention_layernorm")
    text = describe_supported()
    assert all(n in text for e in SUPPORTED.values() for n in e["hf_model_types"] + e["hf_architectures"])


def test_rotary_buffers_without_transformers_init():
    """The fallback for transformers versions whose _init_weights leaves rotary buffers alone."""
    from perch.loading import _rebuild_buffers

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
    ckpt = load_checkpoint(path)
    with pytest.raises(PerchError, match="does not match the weights") as err:
        build_hf_model(ckpt.config, ckpt.state_dict)
    assert "missing from the weights: transformer.h.2." in str(err.value)
    assert "query_key_value.weight: weights (96, 64) vs config (80, 64)" in str(err.value)


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


# ---------------------------------------------------------------- bitsandbytes
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def nf4_serialize(w: torch.Tensor, blocksize: int, nested: bool, storage: torch.dtype):
    """bitsandbytes' documented nf4 layout, re-implemented: blockwise absmax, nearest code, high nibble first.

    Returns the serialized tensors (keys relative to the module) and the dense weight they stand for.
    """
    code, flat = torch.tensor(NF4), w.reshape(-1).float()
    n, blocks = flat.numel(), -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(1)
    q = (padded / absmax[:, None]).reshape(-1)[:n, None].sub(code).abs().argmin(1).to(torch.uint8)
    qp = torch.nn.functional.pad(q, (0, n % 2))
    out = {"weight": ((qp[::2] << 4) | qp[1::2]).view(storage).unsqueeze(1), "weight.quant_map": code}
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": list(w.shape)}
    if nested:  # 8-bit blockwise quantization of absmax around its mean, with a linear code here
        offset, nested_code = absmax.mean(), torch.linspace(-1, 1, 256)
        scale = (absmax - offset).abs().amax().reshape(1)
        aq = ((absmax - offset)[:, None] / scale).sub(nested_code).abs().argmin(1).to(torch.uint8)
        out |= {"weight.nested_absmax": scale, "weight.nested_quant_map": nested_code}
        meta |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset.item()}
        absmax, out["weight.absmax"] = nested_code[aq.long()] * scale + offset.item(), aq
    else:
        out["weight.absmax"] = absmax
    out["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out, (code[q.long()] * absmax.repeat_interleave(blocksize)[:n]).view(w.shape)


def test_bnb_layouts_dequantize_without_bitsandbytes(saved, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    src = saved["falcon_multi_head_sequential"][1]
    sd = load_file(src / "model.safetensors")
    nf4_dq, nf4_odd, int8 = ("transformer.h.0.mlp.dense_h_to_4h.weight", "transformer.h.1.mlp.dense_h_to_4h.weight",
                             "transformer.h.1.self_attention.dense.weight")
    # 49x3 = 147 values: a partial last block and a padding nibble. bf16 quant_storage: bytes are what count.
    refs, expected = {nf4_dq: sd[nf4_dq], nf4_odd: sd[nf4_odd][:49, :3], int8: sd[int8]}, {}
    for key, nested, storage in ((nf4_dq, True, torch.bfloat16), (nf4_odd, False, torch.uint8)):
        del sd[key]
        packed, expected[key] = nf4_serialize(refs[key], 64, nested, storage)
        sd |= {key.removesuffix("weight") + k: v for k, v in packed.items()}
    scb = refs[int8].abs().amax(1)
    sd[int8] = torch.round(refs[int8] * 127 / scb[:, None]).to(torch.int8)
    sd[int8.removesuffix("weight") + "SCB"] = scb
    sd[int8.removesuffix("weight") + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
    expected[int8] = sd[int8].float() * scb[:, None] / 127
    shutil.copy(src / "config.json", tmp_path)
    save_file(sd, tmp_path / "model.safetensors")
    out = load_state_dict(tmp_path)
    for key, tol in ((nf4_dq, 0.15), (nf4_odd, 0.15), (int8, 0.005)):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
        err = ((out[key] - refs[key]).abs().max() / refs[key].abs().max()).item()
        assert 0 < err < tol, (key, err)  # quantization error, as expected for 4 and 8 bits
    assert not any(".absmax" in k or k.endswith(".SCB") or "quant_state" in k for k in out)


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (optional extra); the "
                               "re-implemented layout test above covers the dequantizer without it")


def quantize_falcon(model, mode: str):
    """bnb-quantize every FalconLinear by hand: transformers 5.23 only swaps modules of type exactly nn.Linear,
    so its BitsAndBytesConfig leaves Falcon unquantized. bnb's own modules still serialize the weights."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for cname, lin in list(parent.named_children()):
            if type(lin).__name__ != "FalconLinear":
                continue
            args = (lin.in_features, lin.out_features, lin.bias is not None)
            if mode == "int8":
                q = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(*args, compute_dtype=torch.float32, quant_type=mode, compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=mode,
                                             compress_statistics=True, module=q)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            setattr(parent, cname, q.to("cpu"))  # .to() quantizes
    return model.eval()


def save_bnb_falcon(model, path, mode):
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    q = BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True)
    model.config.quantization_config = q.to_dict()
    model.config.save_pretrained(path)


def bnb_dense(bnb, module) -> torch.Tensor:
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def check_against_bnb(bnb, qmodel, path, mode):
    dense = {n + ".weight": bnb_dense(bnb, m) for n, m in qmodel.named_modules()
             if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert dense
    for m in qmodel.modules():
        # bnb's AVX512-BF16 CPU kernel rounds absmax to bf16 (functional._convert_weight_packed_for_cpu):
        # 0.7% logit error here. Its plain path multiplies by exactly the dense weights read above.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ref = logits(qmodel)
    ckpt = load_checkpoint(path)
    assert ckpt.source["dequantized_from"] == {"int8": "int8"}.get(mode, mode)
    assert not hasattr(ckpt.config, "quantization_config")
    for key, w in dense.items():
        assert torch.equal(ckpt.state_dict[key], w.float()), key
    got = logits(build_hf_model(ckpt.config, ckpt.state_dict))
    # 4-bit: bnb multiplies by the same dense weights (0 seen). int8: LLM.int8 also quantizes the
    # activations (2.2e-2 seen on Falcon-Mamba).
    tol = 0.05 if mode == "int8" else 1e-6
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"{mode}: max |logit diff| / max |logit| = {err:.2e}"


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_bnb_falcon_matches_bitsandbytes(bnb, mode, tmp_path):
    qmodel = quantize_falcon(make_model("falcon_grouped"), mode)
    save_bnb_falcon(qmodel, tmp_path, mode)
    check_against_bnb(bnb, qmodel, tmp_path, mode)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bnb_mamba_saved_by_transformers(bnb, saved, mode, tmp_path):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    qmodel = AutoModelForCausalLM.from_pretrained(saved["falcon_mamba"][1], quantization_config=q,
                                                  device_map="cpu", dtype=torch.float32)
    qmodel.save_pretrained(tmp_path)
    check_against_bnb(bnb, qmodel, tmp_path, mode)


def test_qlora_adapter_on_bnb_checkpoint(bnb, saved, tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    qmodel = AutoModelForCausalLM.from_pretrained(saved["falcon_mamba"][1], quantization_config=q,
                                                  device_map="cpu", dtype=torch.float32)
    qmodel.save_pretrained(tmp_path / "base")
    peft_model = save_adapter(qmodel, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["in_proj", "x_proj"]))
    ckpt = load_checkpoint(tmp_path / "base", adapter=tmp_path / "adapter")
    lora_layers = {n.removeprefix("base_model.model.") + ".weight": m for n, m in peft_model.named_modules()
                   if isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)}
    assert len(lora_layers) == 4
    for key, layer in lora_layers.items():
        expected = bnb_dense(bnb, layer.base_layer) + layer.get_delta_weight("default")
        torch.testing.assert_close(ckpt.state_dict[key], expected, rtol=0, atol=1e-6, msg=key)
    for m in peft_model.modules():  # see check_against_bnb
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ours = logits(build_hf_model(ckpt.config, ckpt.state_dict))
    torch.testing.assert_close(ours, logits(peft_model.eval()), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- LoRA
LORA_CASES = {
    "falcon_qlora_targets": ("falcon_multi_query", dict(r=4, lora_alpha=8, target_modules=[
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])),
    "falcon_rslora_patterns_embedding": ("falcon_grouped", dict(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["query_key_value", "dense_4h_to_h", "word_embeddings"],
        rank_pattern={"h.1.self_attention.query_key_value": 2}, alpha_pattern={"dense_4h_to_h": 3})),
    "falcon_bias_and_modules_to_save": ("falcon_multi_head_sequential", dict(
        r=2, lora_alpha=4, target_modules=["query_key_value", "dense"], bias="lora_only", lora_bias=True,
        modules_to_save=["ln_f"])),
    "mamba_fan_in_fan_out": ("falcon_mamba", dict(r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=[
        "in_proj", "x_proj", "dt_proj"])),  # peft refuses out_proj and conv1d on Mamba
}


def save_adapter(base, out, peft_config):
    """Train-free adapter on `base` (a model or its directory): peft's own wrapping, trainables randomised."""
    from peft import get_peft_model

    torch.manual_seed(1)
    base = base if isinstance(base, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(base, peft_config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_merge_matches_peft(saved, case, tmp_path):
    from peft import LoraConfig

    base, kwargs = LORA_CASES[case]
    peft_model = save_adapter(saved[base][1], tmp_path / "adapter", LoraConfig(**kwargs))
    merged = peft_model.merge_and_unload().eval()
    ckpt = load_checkpoint(saved[base][1], adapter=tmp_path / "adapter")
    assert ckpt.source["adapter"] == str((tmp_path / "adapter").resolve())
    ours = build_hf_model(ckpt.config, ckpt.state_dict)
    for key, w in merged.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict[key], w, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(ours), logits(merged), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(ours), logits(saved[base][0]), atol=1e-3)  # the adapter did something


def test_lora_rejections(saved, tmp_path):
    from peft import IA3Config, LoraConfig

    mq, grouped, mamba = (saved[n][1] for n in ("falcon_multi_query", "falcon_grouped", "falcon_mamba"))
    sd, config = load_state_dict(mq), load_config(mq)
    save_adapter(mq, tmp_path / "dora", LoraConfig(r=2, target_modules=["dense"], use_dora=True))
    with pytest.raises(PerchError, match="use_dora is not supported"):
        merge_adapter(sd, tmp_path / "dora", config)
    save_adapter(mq, tmp_path / "ia3", IA3Config(target_modules=["dense_4h_to_h"], feedforward_modules=[]))
    with pytest.raises(PerchError, match="PEFT type 'IA3' is not supported"):
        merge_adapter(sd, tmp_path / "ia3", config)
    save_adapter(grouped, tmp_path / "grouped", LoraConfig(r=2, target_modules=["query_key_value"]))
    with pytest.raises(PerchError, match=r"transformer.h.0.self_attention.query_key_value.weight has shape "
                                         r"\(128, 64\) but the model's is \(96, 64\)"):
        merge_adapter(sd, tmp_path / "grouped", config)
    save_adapter(mamba, tmp_path / "mamba", LoraConfig(r=2, target_modules=["in_proj"]))
    with pytest.raises(PerchError, match="targets backbone.layers.0.mixer.in_proj.weight, which this model"):
        load_checkpoint(mq, adapter=tmp_path / "mamba")
