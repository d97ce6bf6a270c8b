"""The offline tokenizer and the trained Falcon / FalconMamba fixtures (real tokenizers/transformers)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoTokenizer, FalconMambaConfig, FalconMambaForCausalLM, PreTrainedTokenizerFast
from transformers.models.falcon_mamba import modeling_falcon_mamba as hf_mamba

from perch.dev import fixtures, tokenizer
from perch.errors import PerchError

# Few steps and a short held-out slice keep this file fast; the full recipe is the slow test's.
QUICK_STEPS = {"falcon": 8, "falcon_mamba": 3, "falcon_h1": 3}
QUICK_HELDOUT = 512
TEXTS = [
    "The \"if\" statement is used for conditional execution.",
    "def f(x):\n    return x ** 2  # tabs\tand  spaces",
    "ünïcödé, emoji 😀 and CJK 中文 survive byte-level BPE",
    "",
]


def test_tokenizer_loads_with_autotokenizer_and_round_trips(tmp_path):
    tok = tokenizer.build_tokenizer(fixtures.FIXTURE_VOCAB)
    tokenizer.save_tokenizer(tok, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert len(hf_tok) == fixtures.FIXTURE_VOCAB
    assert hf_tok.eos_token == hf_tok.pad_token == tokenizer.EOS_TOKEN
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == tokenizer.EOS_ID == 0
    for text in TEXTS:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text).ids  # no bos/eos added: same ids as the raw tokenizer
        assert hf_tok.decode(ids) == text
    assert hf_tok(tokenizer.EOS_TOKEN)["input_ids"] == [0]


def test_tokenizer_is_deterministic_across_processes():
    here = hashlib.sha256(tokenizer._build_tokenizer_json.__wrapped__(512).encode()).hexdigest()
    code = ("import hashlib; from perch.dev.tokenizer import build_tokenizer; "
            "print(hashlib.sha256(build_tokenizer(512).to_str().encode()).hexdigest())")
    # A fresh process has a different hash seed and thread timing: the vocab must not depend on them.
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here


def test_build_tokenizer_returns_independent_copies():
    a = tokenizer.build_tokenizer(512)
    a.enable_padding(length=64)
    assert len(tokenizer.build_tokenizer(512).encode("x").ids) == 1


def test_split_is_fixed_and_disjoint():
    train, heldout = tokenizer.split_documents()
    train_paras = {p for doc in train for p in doc.split("\n\n")}
    heldout_paras = {p for doc in heldout for p in doc.split("\n\n")}
    assert train_paras and heldout_paras and not train_paras & heldout_paras
    train_text, heldout_text = tokenizer.split_corpus()
    assert 0.05 < len(heldout_text) / (len(train_text) + len(heldout_text)) < 0.2
    assert tokenizer.split_corpus() == (train_text, heldout_text)
    assert tokenizer.corpus_text().startswith(train[0][:200])


def test_tiny_vocab_is_a_perch_error():
    with pytest.raises(PerchError, match="vocab_size"):
        tokenizer.build_tokenizer(100)


def _scan_inputs(b=2, d=8, l=12, n=4):
    g = torch.Generator().manual_seed(0)
    x, dt, z = (torch.randn(b, d, l, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) * 4
    B, C = (torch.randn(b, n, l, generator=g) for _ in range(2))
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, z, bias)]


def _run_scan(fn, tensors):
    x, dt, A, B, C, D, z, bias = tensors
    out, state = fn(x, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    (out.square().sum() + state.sum()).backward()
    return [out, state] + [t.grad for t in tensors]


def test_stepwise_scan_matches_transformers_reference():
    # __wrapped__ is transformers' own torch fallback, even where mamba_ssm is installed.
    reference = getattr(hf_mamba.mamba_selective_scan, "__wrapped__", hf_mamba.mamba_selective_scan)
    got = _run_scan(fixtures._selective_scan_stepwise, _scan_inputs())
    want = _run_scan(reference, _scan_inputs())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_cpu_patch_keeps_falcon_mamba_logits_and_is_undone():
    config = FalconMambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)
    torch.manual_seed(0)
    model = FalconMambaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 20))
    before = hf_mamba.mamba_selective_scan
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        with fixtures.cpu_trainable_falcon_mamba():
            patched = model(input_ids=ids).logits
    assert hf_mamba.mamba_selective_scan is before
    torch.testing.assert_close(patched, stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(fixtures.FIXTURE_CONFIGS))
def test_train_fixture_is_reproducible(arch, tmp_path):
    steps = QUICK_STEPS[arch]
    quick = {"steps": steps, "heldout_tokens": QUICK_HELDOUT}
    first = fixtures.train_fixture(arch, tmp_path / "a", seed=0, **quick)
    again = fixtures.train_fixture(arch, tmp_path / "b", seed=0, **quick)
    other = fixtures.train_fixture(arch, tmp_path / "c", seed=1, **quick)
    assert first["safetensors_sha256"] == again["safetensors_sha256"]
    assert first["safetensors_sha256"] != other["safetensors_sha256"]
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    assert first["steps_done"] == steps and not first["capped"]
    assert first["heldout_perplexity"] < first["uniform_baseline"] == fixtures.FIXTURE_VOCAB
    assert json.loads((tmp_path / "a" / "fixture.json").read_text()) == first
    assert AutoTokenizer.from_pretrained(tmp_path / "a").eos_token_id == 0


def test_minutes_cap_stops_early_and_is_recorded(tmp_path):
    info = fixtures.train_fixture("falcon", tmp_path, steps=50, minutes=0, heldout_tokens=QUICK_HELDOUT)
    assert info["capped"] and info["steps_done"] == 0 and info["heldout_tokens"] == QUICK_HELDOUT


def test_unknown_arch_is_a_perch_error(tmp_path):
    with pytest.raises(PerchError, match="falcon_mamba"):
        fixtures.train_fixture("llama", tmp_path)


def test_fixture_dir_trains_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCH_CACHE", str(tmp_path))
    results, errors = [], []

    def worker():
        try:
            results.append(fixtures.fixture_dir("falcon", steps=2))
        except Exception as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    root = tmp_path / "fixtures"
    assert results[0].parent == root and (results[0] / "model.safetensors").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no half-written temp dirs
    assert fixtures.fixture_key("falcon", steps=2) in results[0].name


# The Falcon and Falcon-Mamba fixtures are trained anyway for the client tests; Falcon-H1's only here and
# in the benchmarks (~4 minutes of training on 2 cores), so its case runs in `make test-extended`.
@pytest.mark.slow
@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.extended] if a == "falcon_h1" else [])
                                  for a in sorted(fixtures.FIXTURE_CONFIGS)])
def test_cached_fixture_is_well_trained(arch):
    path = fixtures.fixture_dir(arch)
    info = json.loads((path / "fixture.json").read_text())
    assert info["steps_done"] == fixtures.DEFAULT_STEPS[arch] and not info["capped"]
    assert info["heldout_perplexity"] < info["uniform_baseline"] / 10
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == info["safetensors_sha256"]
    # The saved checkpoint, reloaded through transformers, scores what training measured.
    model = fixtures.MODEL_CLASSES[arch].from_pretrained(path)
    hf_tok = AutoTokenizer.from_pretrained(path)
    ppl = fixtures.heldout_perplexity(model, hf_tok, tokenizer.split_corpus()[1])
    assert ppl == pytest.approx(info["heldout_perplexity"], rel=1e-3)
