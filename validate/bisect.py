"""`--bisect`: where a failed check goes wrong: the first drifting step, then the first layer whose hidden state
departs from transformers' at that step.

The hidden states come from Perch's own export-ready module (`core.run(..., hidden_out=list)`), driven
through the runtime's real call pattern (prefill, then one step per token, state carried between calls),
so a bug in the step path (a wrong position, a dropped state write) shows up at the layer it hits. The
reference is one full transformers forward, each decoder layer's output (never its chunked path:
FalconMamba's restarts the SSM, see docs/traps.md). An ONNX or Core ML artifact exposes only logits: its
bisect rebuilds Perch's module from the source checkpoint, which tells "our model code" from "the
conversion or its runtime".
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from perch.validate.tolerances import tolerance_for_precision

_TINY = 1e-30


@contextlib.contextmanager
def capture_hidden(core) -> Iterator[list[list[torch.Tensor]]]:
    """While active, every `core.run` call appends its per-layer hidden states (B, T, H) to the yielded list."""
    calls: list[list[torch.Tensor]] = []
    original = core.run

    def run(*args, **kwargs):
        kwargs["hidden_out"] = layers = []
        out = original(*args, **kwargs)
        calls.append(layers)
        return out

    core.run = run  # an instance attribute shadows the method; deleted again below
    try:
        yield calls
    finally:
        del core.run


@torch.inference_mode()
def perch_hidden(runtime, ids: np.ndarray, prompt_len: int) -> list[np.ndarray]:
    """Per layer (T, H) float64 hidden states (the residual stream after each layer) of `runtime`, an
    EagerRuntime, fed as a check feeds it: prefill the first `prompt_len` tokens, then one step per token."""
    runtime.reset(1)
    with capture_hidden(runtime.core) as calls:
        runtime.prefill(ids[None, :prompt_len])
        for tok in ids[prompt_len:]:
            runtime.step(np.array([tok]))
    return [torch.cat([c[i] for c in calls], dim=1)[0].double().numpy() for i in range(len(calls[0]))]


def _decoder_layers(hf_model) -> torch.nn.ModuleList:
    """transformers' decoder layers: `transformer.h` (Falcon) or `backbone.layers` (FalconMamba)."""
    base = getattr(hf_model, hf_model.base_model_prefix)
    return next(m for m in base.children() if isinstance(m, torch.nn.ModuleList))


@torch.inference_mode()
def transformers_hidden(hf_model, ids: np.ndarray) -> list[np.ndarray]:
    """Per layer (T, H) hidden states from one full forward, taken from each decoder layer's output.

    A forward hook rather than `output_hidden_states=True`: that tuple's layout differs by model in
    transformers 5.23 (Falcon's starts with the embeddings, FalconMamba's does not; both end with the final
    norm applied), a hook gets the same tensor our `hidden_out` holds in every version.
    """
    layers: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        layers.append(out[0] if isinstance(out, tuple) else out)

    hooks = [block.register_forward_hook(keep) for block in _decoder_layers(hf_model)]
    device = next(hf_model.parameters()).device
    try:
        hf_model(input_ids=torch.from_numpy(ids[None]).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [h[0].double().cpu().numpy() for h in layers]


def layer_errors(ours: list[np.ndarray], ref: list[np.ndarray]) -> np.ndarray:
    """(layers, T) relative L2 error of each layer's hidden state at each position."""
    if len(ours) != len(ref):
        raise ValueError(f"{len(ours)} layers captured but transformers returned {len(ref)} hidden states")
    return np.stack([np.linalg.norm(o - r, axis=-1) / np.maximum(np.linalg.norm(r, axis=-1), _TINY)
                     for o, r in zip(ours, ref)])


def locate(errors: np.ndarray, threshold: float) -> tuple[int | None, int | None]:
    """(first position where any layer departs, the lowest layer departing there); (None, None) if none."""
    bad = errors > threshold
    if not bad.any():
        return None, None
    position = int(np.argmax(bad.any(axis=0)))
    return position, int(np.argmax(bad[:, position]))


def bisect_layers(runtime, hf_model, ids, prompt_len: int, *, threshold: float = 1e-3) -> dict:
    """Compare `runtime`'s module with transformers layer by layer over `ids` (prompt + continuation).

    Returns {"position", "layer", "layer_errors", "threshold"}: the first departing position and layer
    (None when every layer agrees), with each layer's error at that position (or its worst, if none departs).
    """
    ids = np.asarray(ids, dtype=np.int64)
    errors = layer_errors(perch_hidden(runtime, ids, min(prompt_len, len(ids))), transformers_hidden(hf_model, ids))
    position, layer = locate(errors, threshold)
    per_layer = errors[:, position] if position is not None else errors.max(axis=1)
    return {"position": position, "layer": layer, "layer_errors": [float(x) for x in per_layer],
            "threshold": threshold}


def _target(report) -> tuple[int, int] | None:
    """(prompt, step) to examine: the first drifting step, else the first failure's place, else the run's end."""
    drift = report.first_drift
    if drift:
        return drift["prompt"], drift["step"]
    for f in report.failures:
        if f.prompt is not None:
            pr = report.prompts[f.prompt]
            return f.prompt, pr.num_steps - 1 if f.step is None else min(f.step, pr.num_steps - 1)
    return None if report.passed else (0, report.prompts[0].num_steps - 1)


def bisect(report, artifact_runtime, reference_runtime, *, checkpoint=None, artifact_format: str | None = None,
           threshold: float | None = None) -> dict | None:
    """Localize a failed check. Uses the artifact's own module when it has one (an EagerRuntime or subclass),
    else Perch's module rebuilt from `checkpoint`; the reference is `reference_runtime.model` (transformers)
    or a CPU fp32 transformers model built from `checkpoint`. Returns a JSON-ready dict, None if it passed."""
    target = _target(report)
    if target is None:
        return None
    prompt, step = target
    pr = report.prompts[prompt]
    ids = np.array(pr.prompt_ids + pr.reference_tokens, dtype=np.int64)[: step + 1]
    own = hasattr(artifact_runtime, "core")
    runtime = artifact_runtime if own else _rebuild(checkpoint, report.artifact.get("max_context", len(ids)))
    hf_model = getattr(reference_runtime, "model", None)
    if hf_model is None or getattr(reference_runtime, "dtype", torch.float32) != torch.float32:
        hf_model = _hf_model(checkpoint)
    if threshold is None:  # a rebuilt module runs in fp32 whatever the artifact's precision: fp32's limit
        threshold = report.tolerances.hidden_rel_l2 if own else tolerance_for_precision("fp32").hidden_rel_l2
    found = bisect_layers(runtime, hf_model, ids, pr.prompt_len, threshold=threshold)
    subject = getattr(artifact_runtime, "name", "artifact") if own else "Perch's module, rebuilt from the source"
    found.update(prompt=prompt, step=step, phase=pr.phase(step), prompt_len=pr.prompt_len, subject=subject)
    if found["position"] is not None:
        found["position_phase"] = pr.phase(found["position"])
    found["message"] = _message(found, own, artifact_format or report.artifact.get("format", "the artifact"))
    return found


def _message(found: dict, own: bool, fmt: str) -> str:
    where = f"prompt {found['prompt']}, step {found['step']} ({found['phase']})"
    if found["layer"] is not None:
        pos = found["position"]
        return (f"layer {found['layer']} is the first whose hidden state departs from transformers: relative L2 "
                f"{found['layer_errors'][found['layer']]:.3g} > {found['threshold']:.3g} at position {pos} "
                f"({found['position_phase']}); first logit drift at {where}")
    worst = max(found["layer_errors"])
    if own:
        return (f"every layer agrees with transformers through {where} (worst relative L2 {worst:.3g}): the drift "
                "comes after the last layer (final norm, lm_head) or outside the module")
    return (f"Perch's module matches transformers at every layer through {where} (worst relative L2 {worst:.3g}): "
            f"the drift comes from the conversion to {fmt} or its runtime, not from the model code")


def _rebuild(checkpoint, max_context: int):
    from perch.runtimes.pytorch.eager import EagerRuntime

    if checkpoint is None:
        raise ValueError("bisect of an artifact without its own module needs the source checkpoint")
    return EagerRuntime(checkpoint, max_context=max_context, dtype=torch.float32)


def _hf_model(checkpoint):
    from perch.loading import build_hf_model

    if checkpoint is None:
        raise ValueError("bisect needs a transformers reference model or the source checkpoint")
    return build_hf_model(checkpoint.config, checkpoint.state_dict, device="cpu", dtype=torch.float32)


def bisect_report(report, session) -> dict | None:
    """`check_artifact(..., bisect=True)`: bisect with the pieces its session opened."""
    return bisect(report, session.artifact, session.reference, checkpoint=session.checkpoint,
                  artifact_format=session.manifest.format)
