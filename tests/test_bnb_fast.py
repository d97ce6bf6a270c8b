"""bitsandbytes' own CPU dequantization (the fast path of perch.loading.bnb) gives bit-identical weights to
Perch's pure-torch path, for every 4-bit layout bitsandbytes writes."""
from __future__ import annotations

import pytest
import torch

from perch.loading import bnb as perch_bnb


def _serialized(w: torch.Tensor, quant_type: str, nested: bool, storage: torch.dtype) -> dict:
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested, quant_storage=storage)
    return {"m.weight": q, **{f"m.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_bitsandbytes_dequantize_equals_torch_path(quant_type, nested, storage, monkeypatch):
    torch.manual_seed(0)
    w = (torch.randn(96, 200) * 0.02).to(torch.bfloat16)  # 19200 values: not a multiple of 64 * 256 blocks
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        sd = _serialized(w, quant_type, nested, storage)
        monkeypatch.setattr(perch_bnb, "USE_BITSANDBYTES", False)
        slow = perch_bnb._dequant_4bit(dict(sd), "m.weight", quant_type, dtype)
        monkeypatch.setattr(perch_bnb, "USE_BITSANDBYTES", True)
        left = dict(sd)
        fast = perch_bnb._dequant_4bit(left, "m.weight", quant_type, dtype)
        assert fast.dtype == slow.dtype == (dtype or torch.bfloat16)
        assert torch.equal(fast, slow), (dtype, (fast.float() - slow.float()).abs().max())
        assert not left, f"quant-state entries left behind: {list(left)}"
        err = ((fast.float() - w.float()).abs().max() / w.float().abs().max()).item()
        assert 0 < err < 0.2  # it is a 4-bit copy of w, not w
