"""Small *trained* Falcon and FalconMamba checkpoints, made offline, for fidelity tests.

Random weights give flat logits, so fp16/int8/int4/palettized agreement figures on them mean
nothing. These fixtures are trained for a fixed number of CPU steps on the Python help text (see
`perch.dev.tokenizer`) and cached under `$PERCH_CACHE` (or `~/.cache/perch`); `fixture_dir(arch)`
returns one, training it on first use.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    FalconH1Config,
    FalconH1ForCausalLM,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import ACT2FN

from perch.errors import PerchError
from perch.staging import build_once
from perch.dev.presets import cache_root
from perch.dev.tokenizer import (
    EOS_ID,
    build_tokenizer,
    save_tokenizer,
    split_corpus,
    split_documents,
    tokenizer_settings,
)

FIXTURE_FORMAT = 1  # bump when the training recipe changes, so old caches are not reused
FIXTURE_VOCAB = 4096
BLOCK = 128
BATCH = 8
# Peak AdamW learning rate; measured held-out ppl: falcon 154 at 2e-3 vs 185 at 4e-3,
# falcon_mamba 167 at 4e-3 vs 182 at 2e-3.
LR = {"falcon": 2e-3, "falcon_mamba": 4e-3, "falcon_h1": 2e-3}
MIN_LR_FRACTION = 0.1  # cosine decays to 10% of LR
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
EVAL_BATCH = 16  # held-out windows scored per forward
# Fixed so CPU reductions split the same way on every run (weights depend on the thread count).
# One thread: with 2 threads on 2 shared cores a step ran 10-25x slower (OpenMP barriers).
TRAIN_THREADS = 1
# Chosen so each fixture trains in ~1.5-3 minutes on 2 shared cores (see the report in fixture.json).
DEFAULT_STEPS = {"falcon": 300, "falcon_mamba": 160, "falcon_h1": 160}

# Both untied (tie_word_embeddings=False): exports untie the head anyway (MatMulNBits skips a
# transposed embedding), so the trained head is the one quantization sees.
FIXTURE_CONFIGS: dict[str, PretrainedConfig] = {
    # Falcon-7B layout: one shared K,V head (multi-query), parallel attention+MLP, rotary, no bias.
    "falcon": FalconConfig(
        vocab_size=FIXTURE_VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        alibi=False,
        bias=False,
        max_position_embeddings=2048,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
    ),
    "falcon_mamba": FalconMambaConfig(
        vocab_size=FIXTURE_VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        state_size=16,
        conv_kernel=4,
        expand=2,
        # The 0.1 default (normal std for embeddings and linears) overfit: held-out ppl 343 vs 182
        # with 0.02 after 160 steps.
        initializer_range=0.02,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
    ),
    # Falcon-H1 layout (every layer attention + Mamba-2 in parallel, GQA, SiLU gate) at unit µP multipliers:
    # the multipliers are exercised by the tiny preset; here they would only change the training recipe.
    "falcon_h1": FalconH1Config(
        vocab_size=FIXTURE_VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_d_ssm=256,
        mamba_n_heads=8,
        mamba_d_head=32,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=64,  # transformers' training path pads each sequence to a multiple of this
        max_position_embeddings=2048,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
    ),
}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "falcon": FalconForCausalLM,
    "falcon_mamba": FalconMambaForCausalLM,
    "falcon_h1": FalconH1ForCausalLM,
}


def _check_arch(arch: str) -> None:
    if arch not in FIXTURE_CONFIGS:
        raise PerchError(f"no trained fixture for arch {arch!r}; use one of {sorted(FIXTURE_CONFIGS)}")


def _recipe(arch: str, steps: int, seed: int) -> dict:
    """Everything that determines a fixture's weights (on a given torch build)."""
    # Through JSON so the recipe compares equal to its fixture.json copy (int keys become strings).
    config = json.loads(json.dumps(FIXTURE_CONFIGS[arch].to_dict(), sort_keys=True))
    config.pop("transformers_version", None)
    return {
        "format": FIXTURE_FORMAT,
        "arch": arch,
        "config": config,
        "seed": seed,
        "steps": steps,
        "batch": BATCH,
        "block": BLOCK,
        "lr": LR[arch],
        "min_lr_fraction": MIN_LR_FRACTION,
        "warmup_fraction": WARMUP_FRACTION,
        "weight_decay": WEIGHT_DECAY,
        "grad_clip": GRAD_CLIP,
        "threads": TRAIN_THREADS,
        "tokenizer": tokenizer_settings(FIXTURE_VOCAB),
    }


def fixture_key(arch: str, *, steps: int | None = None, seed: int = 0) -> str:
    """A short hash of the recipe (config, seed, steps, tokenizer settings): the cache key."""
    _check_arch(arch)
    recipe = _recipe(arch, steps or DEFAULT_STEPS[arch], seed)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seed, fix the thread count and force deterministic kernels; restore the caller's state after."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        # Deterministic mode NaN-fills every torch.empty (~30% of a Mamba step); no kernel we use
        # reads uninitialised memory, so the fill buys nothing here.
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = prev_fill
            torch.use_deterministic_algorithms(prev_det)
            torch.set_num_threads(prev_threads)


def _selective_scan_stepwise(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, **kwargs):
    """HF FalconMamba's recurrent reference scan, discretised one step at a time.

    The same recurrence as transformers' torch fallback (outputs agree to ~1e-5). Theirs indexes
    `x[:, :, t]` into (b, d, l, n) tensors, so backward scatters every step into a full zero tensor,
    O(l^2): 18 s per training step here. Stepping over `unbind` slices and building each step's
    (b, d, n) terms in the loop made a layer's forward+backward ~3x faster than even an unbind
    version of theirs. Shapes: hidden_states, dt, z (b, d, l); A (d, n); B, C (b, n, l).
    """
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt_x = dt * hidden_states  # (b, d, l)
    state = hidden_states.new_zeros(hidden_states.shape[0], A.shape[0], A.shape[1])  # (b, d, n)
    outs = []
    for dt_t, dt_x_t, b_t, c_t in zip(dt.unbind(2), dt_x.unbind(2), B.unbind(2), C.unbind(2)):
        state = torch.exp(A * dt_t[..., None]) * state + dt_x_t[..., None] * b_t[:, None, :]
        outs.append(torch.matmul(state, c_t[..., None])[..., 0])  # (b, d)
    out = torch.stack(outs, dim=-1)  # (b, d, l)
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    return (out, state) if return_last_state else out


def _causal_conv1d_torch(hidden_states, weight, bias=None, activation=None, **kwargs):
    """Depthwise causal conv (b, d, l), as transformers' torch fallback: never a CUDA-only kernel."""
    out = F.conv1d(hidden_states.to(weight.dtype), weight.unsqueeze(1), bias,
                   padding=weight.shape[-1] - 1, groups=hidden_states.shape[1])
    out = out[..., : hidden_states.shape[-1]]
    return (ACT2FN[activation](out) if activation is not None else out).to(hidden_states.dtype)


@contextlib.contextmanager
def cpu_trainable_falcon_mamba() -> Iterator[None]:
    """Route HF FalconMamba's full-sequence path through torch functions that train fast on CPU.

    Patches module-level functions of `modeling_falcon_mamba` and restores them on exit. Before
    transformers 5.25 the model also had a fused `mamba_inner_fn` path (mamba_ssm's, CUDA-only): where it
    exists it is made to return None, so HF takes its unfused path; 5.25 dropped it.
    """
    from transformers.models.falcon_mamba import modeling_falcon_mamba as hf

    patches = {"causal_conv1d_fn": _causal_conv1d_torch, "mamba_selective_scan": _selective_scan_stepwise}
    missing = [name for name in patches if not hasattr(hf, name)]
    if missing:
        raise PerchError(f"transformers {hf.__name__} lacks {missing}: update perch.dev.fixtures for this "
                         "transformers version")
    if hasattr(hf, "mamba_inner_fn"):
        patches["mamba_inner_fn"] = lambda *a, **k: None
    saved = {name: getattr(hf, name) for name in patches}
    try:
        for name, fn in patches.items():
            setattr(hf, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(hf, name, fn)


@functools.lru_cache(maxsize=1)
def _encoded_splits() -> tuple[torch.Tensor, torch.Tensor]:
    """(train stream, held-out ids). The train documents are joined with eos after each one;
    the held-out ids are `split_corpus()[1]` encoded whole, as `heldout_perplexity` sees it."""
    tokenizer = build_tokenizer(FIXTURE_VOCAB)
    train_docs, _ = split_documents()
    stream: list[int] = []
    for doc in train_docs:
        stream.extend(tokenizer.encode(doc).ids)
        stream.append(EOS_ID)
    heldout = tokenizer.encode(split_corpus()[1]).ids
    return torch.tensor(stream, dtype=torch.long), torch.tensor(heldout, dtype=torch.long)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_FRACTION."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def _train_loop(model: PreTrainedModel, stream: torch.Tensor, steps: int, seed: int, lr: float,
                deadline: float | None) -> tuple[int, float]:
    """Train in place; returns (steps done, last loss). Batches come from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            return step, loss.item()
        starts = torch.randint(0, len(stream) - BLOCK, (BATCH,), generator=gen)
        batch = torch.stack([stream[s : s + BLOCK] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
    return steps, loss.item()


def heldout_perplexity(model: PreTrainedModel, tokenizer: Tokenizer | PreTrainedTokenizerBase, text: str,
                       block: int = 128) -> float:
    """exp(mean next-token NLL) of `text`, scored in non-overlapping windows of `block` tokens.

    `tokenizer` is a `tokenizers.Tokenizer` or a transformers tokenizer. Each window starts with no
    context, so this is a little pessimistic next to a sliding-window figure.
    """
    ids = tokenizer.encode(text)
    return _perplexity_of_ids(model, torch.tensor(getattr(ids, "ids", ids), dtype=torch.long), block)


@torch.no_grad()
def _perplexity_of_ids(model: PreTrainedModel, ids: torch.Tensor, block: int) -> float:
    if len(ids) < 2:
        raise PerchError("held-out text is shorter than two tokens; pass a longer text")
    windows = [ids[s : s + block + 1] for s in range(0, len(ids) - 1, block)]  # overlap by one token
    full = [w for w in windows if len(w) == block + 1]
    batches = [torch.stack(full[i : i + EVAL_BATCH]) for i in range(0, len(full), EVAL_BATCH)]
    batches += [w[None] for w in windows if len(w) < block + 1]  # the short tail window
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:  # (b, T + 1)
        logits = model(input_ids=batch[:, :-1]).logits.float()  # (b, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_fixture(arch: str, out_dir: str | Path, *, steps: int | None = None, seed: int = 0,
                  minutes: float | None = None, heldout_tokens: int | None = None) -> dict:
    """Train a fixture from scratch on CPU and save it to `out_dir`; returns its fixture.json dict.

    The result is defined by (arch, steps, seed) and the torch build: training is seeded, uses a
    fixed batch order, TRAIN_THREADS threads and deterministic algorithms, so two runs give
    byte-identical safetensors. `minutes` caps wall time and stops early; a capped run depends on
    machine speed and is NOT reproducible (fixture.json records `capped`). `heldout_tokens` scores
    only the first N held-out tokens (quick tests); None scores all. `out_dir` gets
    model.safetensors + config.json (save_pretrained), the tokenizer files and fixture.json.
    """
    _check_arch(arch)
    steps = steps or DEFAULT_STEPS[arch]
    if steps < 1:
        raise PerchError(f"steps must be at least 1, got {steps}")
    stream, heldout = _encoded_splits()
    heldout = heldout[:heldout_tokens]
    with _deterministic_torch(seed, TRAIN_THREADS), cpu_trainable_falcon_mamba():
        model = MODEL_CLASSES[arch](copy.deepcopy(FIXTURE_CONFIGS[arch]))  # seeded init
        start, cpu_start = time.monotonic(), time.process_time()
        deadline = start + minutes * 60 if minutes is not None else None
        done, last_loss = _train_loop(model, stream, steps, seed, LR[arch], deadline)
        seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu_start
        ppl = _perplexity_of_ids(model, heldout, BLOCK)
    out = Path(out_dir)
    model.save_pretrained(out)
    save_tokenizer(build_tokenizer(FIXTURE_VOCAB), out)
    info = {
        "arch": arch,
        "key": fixture_key(arch, steps=steps, seed=seed),
        "seed": seed,
        "steps": steps,
        "steps_done": done,
        "capped": done < steps,
        "threads": TRAIN_THREADS,
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),  # ~ wall time on an idle core
        "final_train_loss": round(last_loss, 4),
        "heldout_perplexity": round(ppl, 3),
        "heldout_tokens": len(heldout),
        "uniform_baseline": model.config.vocab_size,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "safetensors_sha256": _sha256_file(out / "model.safetensors"),
        "torch_version": torch.__version__,
        "recipe": _recipe(arch, steps, seed),
    }
    (out / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def fixture_dir(arch: str, *, steps: int | None = None, seed: int = 0) -> Path:
    """The directory of a cached trained fixture for `arch`, training it first if missing.

    Trains through perch.staging.build_once: under a waiting lock, into a temp dir renamed into place
    when complete, so concurrent pytest workers train once and never see half a fixture.
    """
    key = fixture_key(arch, steps=steps, seed=seed)
    final = cache_root() / "fixtures" / f"{arch}-{key}"
    return build_once(final, lambda tmp: train_fixture(arch, tmp, steps=steps, seed=seed),
                      lambda d: (d / "fixture.json").is_file())
