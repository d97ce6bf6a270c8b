"""The additive causal mask every attention front-end builds from a 0/1 key mask (the "keys" contract)."""
from __future__ import annotations

import torch

from perch.spec import MASK_MIN


def additive_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """(B, S) 0/1 key mask -> (B, 1, T, S) additive causal mask; the T queries are the last T keys."""
    s = attention_mask.shape[-1]
    q_pos = torch.arange(s - query_len, s, device=attention_mask.device)[:, None]
    k_pos = torch.arange(s, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & (attention_mask[:, None, :] > 0)
    return torch.where(allowed, 0.0, MASK_MIN).unsqueeze(1)
