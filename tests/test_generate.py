"""The generation loop over the step API: greedy, sampling limits, EOS, stop strings, the context limit."""
from __future__ import annotations

import numpy as np
import pytest

from perch.runtimes.pytorch.eager import EagerRuntime
from perch.runtimes.generate import Sampling, generate_ids, generate_text, pick


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    assert {int(pick(logits, Sampling(temperature=1.0, top_k=2), rng)[0]) for _ in range(200)} == {0, 1}
    assert {int(pick(logits, Sampling(temperature=1.0, top_p=0.7), rng)[0]) for _ in range(200)} == {0, 1}
    assert {int(pick(logits, Sampling(temperature=1.0), rng)[0]) for _ in range(400)} == {0, 1, 2, 3}
    assert int(pick(logits, Sampling(), rng)[0]) == 0


def test_bad_sampling_settings_are_rejected():
    from perch.errors import PerchError

    with pytest.raises(PerchError):
        Sampling(temperature=-1)


def test_generation_stops_at_the_context_limit(load_preset):
    rt = EagerRuntime(load_preset("falcon-tiny"), max_context=12)
    out = list(generate_ids(rt, np.array([[5, 6, 7, 8, 9]]), max_new_tokens=50))
    assert len(out) == 12 - 5 + 1  # the last token is produced but never needs to be stored
    assert rt.position == 12


def test_eos_and_stop_strings(load_preset):
    from transformers import AutoTokenizer

    ckpt = load_preset("falcon-mamba-tiny")
    tok = AutoTokenizer.from_pretrained(ckpt.model_dir)
    rt = EagerRuntime(ckpt, max_context=64)
    greedy = list(generate_ids(rt, np.array([tok.encode("The list")]), 6))
    eos = int(greedy[2][0])  # pretend this greedy token is EOS: generation ends at its first occurrence
    first = [int(t[0]) for t in greedy].index(eos)
    assert len(list(generate_ids(rt, np.array([tok.encode("The list")]), 6, eos_token_id=eos))) == first + 1
    full = generate_text(rt, tok, "The list", 8)
    if len(full) > 2:
        stop = full[1:3]
        assert generate_text(rt, tok, "The list", 8, stop=(stop,)) == full[: full.index(stop)]
