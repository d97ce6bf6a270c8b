"""bitsandbytes checkpoints written the way a QLoRA user has them, for the tests and the full-size benchmark.

transformers only swaps modules of type exactly nn.Linear, so `from_pretrained(quantization_config=...)`
leaves Falcon's FalconLinear layers in bf16 and saves an unquantized checkpoint (measured: transformers 5.24,
"no linear modules were found"). These helpers quantize every FalconLinear with bitsandbytes' own modules,
which serialize the weights in bitsandbytes' format, and write the config transformers reads back.
"""
from __future__ import annotations

from pathlib import Path

import torch


def quantize_falcon(model, mode: str, compute_dtype: torch.dtype = torch.float32):
    """Replace each FalconLinear of `model` by bitsandbytes' int8 or 4-bit (`mode` "nf4"/"fp4") module, in
    place, one layer at a time (the bf16 weight of a layer is freed as soon as it is quantized)."""
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
                q = bnb.nn.Linear4bit(*args, compute_dtype=compute_dtype, quant_type=mode, compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=mode,
                                             compress_statistics=True, module=q)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            setattr(parent, cname, q.to("cpu"))  # .to() quantizes
    return model.eval()


def save_bnb_falcon(model, path: Path, mode: str) -> None:
    """model.safetensors and config.json (with its quantization_config) of a `quantize_falcon` model."""
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    tied = getattr(model.config, "tie_word_embeddings", True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, Path(path) / "model.safetensors", metadata={"format": "pt"})
    q = BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True)
    model.config.quantization_config = q.to_dict()
    model.config.save_pretrained(path)
