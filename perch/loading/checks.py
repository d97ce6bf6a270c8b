"""One check of a checkpoint's tensors against its config, before any backend (or transformers) runs.

Generic: the model the config describes is built on the `meta` device (no memory, no time) and its
state_dict names and shapes are compared with the checkpoint's; then dtypes and values. Every problem
is reported at once, by tensor name, as a PerchError (exit 2) rather than a traceback from deep inside
a tracer or converter.
"""
from __future__ import annotations

import torch

from perch.errors import PerchError

_SHOW = 3  # names listed per kind of problem


def expected_tensors(config) -> dict[str, torch.Size]:
    """name -> shape of every tensor the config's causal LM holds (transformers' names, as checkpoints use)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state_dict(config, state_dict: dict[str, torch.Tensor], *, where: str = "the checkpoint") -> None:
    """Names, shapes, dtypes and finiteness of `state_dict` against `config`; PerchError listing every problem."""
    expected = expected_tensors(config)
    problems = _structure(expected, state_dict) or _contents(state_dict)
    if problems:
        raise PerchError(f"{where} does not match its config.json: {' | '.join(problems)}")


def _listed(kind: str, items: list[str], fix: str) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {kind}: {'; '.join(items[:_SHOW])}{more}; {fix}"


def _structure(expected: dict[str, torch.Size], got: dict[str, torch.Tensor]) -> list[str]:
    fix = "use the config.json saved with these weights (same sizes, heads, layers and variant)"
    kinds = {
        "tensors with the wrong shape": [f"{k} is {tuple(got[k].shape)}, the config needs {tuple(v)}"
                                         for k, v in expected.items() if k in got and got[k].shape != v],
        "tensors missing from the weights": [k for k in expected if k not in got],
        "tensors the config's model does not have": [k for k in got if k not in expected],
    }
    return [_listed(kind, items, fix) for kind, items in kinds.items() if items]


def _contents(got: dict[str, torch.Tensor]) -> list[str]:
    not_float = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in got.items() if not v.is_floating_point()]
    if not_float:
        return [_listed("non-float tensors", not_float, "Perch reads float checkpoints (fp32/fp16/bf16) and "
                        "bitsandbytes 4/8-bit ones; export from the unquantized model")]
    bad = [f"{k} ({_nonfinite_share(v)})" for k, v in got.items() if not _finite(v)]
    if bad:
        return [_listed("tensors with NaN or infinite values", bad, "the checkpoint is corrupt or training "
                        "diverged; use a healthy checkpoint")]
    return []


def _finite(t: torch.Tensor) -> bool:
    # Chunked: a 7B embedding as one isfinite() would allocate a bool copy of it.
    flat = t.reshape(-1)
    step = 1 << 24
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def _nonfinite_share(t: torch.Tensor) -> str:
    n = int((~torch.isfinite(t)).sum())
    return "all values" if n == t.numel() else f"{n} of {t.numel()} values"
