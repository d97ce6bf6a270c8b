"""bitsandbytes checkpoints and LoRA adapters against the real bitsandbytes and peft, on tiny models."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from perch.dev.bnb import quantize_falcon, save_bnb_falcon
from perch.errors import PerchError
from perch.loading.lora import merge_adapter
from perch.loading.checkpoint import build_hf_model, load_checkpoint, load_config, load_state_dict

from tests.tiny_models import logits, make_model


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
    import bitsandbytes  # in the test extra: its CPU backend runs here, so these tests never skip

    return bitsandbytes


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


def _mapped_files() -> dict[tuple[int, int], str]:
    """(start, end) -> path of every file mapping of this process (Linux /proc/self/maps)."""
    maps = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps[(lo, hi)] = fields[5]
    return maps


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bnb_weights_spill_to_an_unlinked_mapped_file(bnb, mode, tmp_path, monkeypatch):
    """A large checkpoint's dequantized weights are file-backed pages of a temporary file, not anonymous memory;
    the values are the in-memory ones bit for bit, and the file's name is gone from the disk at once."""
    import tempfile

    from perch.loading import spill

    save_bnb_falcon(quantize_falcon(make_model("falcon_grouped"), mode), tmp_path, mode)
    held = load_state_dict(tmp_path, dtype=torch.bfloat16)
    spill_dir = tmp_path / "tmp"
    spill_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_dir))
    monkeypatch.setattr(spill, "SPILL_OVER", 0)  # the tiny checkpoint spills as a 7B one does
    mapped = load_state_dict(tmp_path, dtype=torch.bfloat16)
    assert list(spill_dir.iterdir()) == []
    maps = _mapped_files()
    spilled = [k for k in mapped if "quant" not in k and k.endswith(".weight") and "h." in k and ".mlp." in k]
    assert spilled
    for key in spilled:
        ptr = mapped[key].data_ptr()
        where = [path for (lo, hi), path in maps.items() if lo <= ptr < hi]
        assert where and "perch-weights-" in where[0] and where[0].endswith("(deleted)"), (key, where)
    assert held.keys() == mapped.keys()
    for key in held:
        assert held[key].dtype == mapped[key].dtype and torch.equal(held[key], mapped[key]), key


def test_bnb_weights_stay_in_memory_without_room_for_the_file(tmp_path, monkeypatch):
    import collections

    from perch.loading import spill

    save_bnb_falcon(quantize_falcon(make_model("falcon_grouped"), "nf4"), tmp_path, "nf4")
    held = load_state_dict(tmp_path)
    monkeypatch.setattr(spill, "SPILL_OVER", 0)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda where: usage(1 << 40, 1 << 40, 10 << 20))
    with pytest.warns(UserWarning, match="point TMPDIR at a disk with room"):
        got = load_state_dict(tmp_path)
    for key in held:
        assert torch.equal(held[key], got[key]), key


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
