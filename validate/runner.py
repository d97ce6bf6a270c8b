"""`check()`: run the same prompts through an artifact and the reference, and judge every step.

Teacher-forced: both see the prompt, then the reference's own greedy tokens, so every prompt position
and every decode step can be compared (prefill and step paths, state carried between calls). Free-running:
each side continues with its own greedy tokens; the shared prefix is the greedy match length. Every limit
is checked and every failure kept: the report lists them all, and names the first step that drifts.
`check_artifact()` is what `perch check` calls: it opens the artifact, the reference and the prompts.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from perch.validate import metrics
from perch.validate.render import write_report
from perch.validate.report import CheckReport, Failure, PromptResult
from perch.validate.tolerances import Tolerances, kl_floor, max_abs_floor

# per-step metric -> (row function, True if the limit is an upper bound), in report order
STEP_METRICS = {
    "max_abs": (metrics.row_max_abs, True),
    "rel_l2": (metrics.row_rel_l2, True),
    "cosine": (metrics.row_cosine, False),
    "kl": (metrics.row_kl, True),
}
STEP_LIMITS = {"max_abs": "max_abs", "rel_l2": "rel_l2", "cosine": "min_cosine", "kl": "max_kl"}
# whole-run metric -> tolerance field, True if the limit is an upper bound
RUN_LIMITS = (("mean_kl", "mean_kl", True), ("top1", "min_top1", False), ("top5", "min_top5", False))


def Progress(total: int, label: str, enabled: bool | None = None):
    """perch.progress's bar (ETA on a terminal, log lines in CI); `enabled=False` (quiet) silences it."""
    from perch.progress import Progress as Bar

    bar = Bar(total, label, unit="step")
    if enabled is False:
        bar.enabled = False
    return bar


def _teacher_forced(art, ref, ids: np.ndarray, n: int, progress: Progress):
    """Prompt, then n reference-greedy tokens fed to both. -> (ref logits, art logits, ref tokens)."""
    ref.reset(1)
    art.reset(1)
    r_rows, a_rows = [ref.prefill(ids[None])[0]], [art.prefill(ids[None])[0]]
    progress.advance()
    tokens: list[int] = []
    for _ in range(n):
        tok = int(r_rows[-1][-1].argmax())
        tokens.append(tok)
        r_rows.append(ref.step(np.array([tok]))[None, 0])
        a_rows.append(art.step(np.array([tok]))[None, 0])
        progress.advance()
    return np.concatenate(r_rows), np.concatenate(a_rows), tokens


def _free_run(runtime, ids: np.ndarray, n: int) -> list[int]:
    """The runtime's own greedy continuation of `ids` (n tokens)."""
    runtime.reset(1)
    logits = runtime.prefill(ids[None], last_only=True)[0, -1]
    tokens = []
    for i in range(n):
        tokens.append(int(logits.argmax()))
        if i < n - 1:
            logits = runtime.step(np.array([tokens[-1]]))[0]
    return tokens


def _outside(value, limit: float, upper: bool):
    """True where `value` breaks the limit; NaN always does (an artifact that returns NaN must fail)."""
    value = np.asarray(value, dtype=np.float64)
    return ~(value <= limit) if upper else ~(value >= limit)


def _step_failures(pr: PromptResult, tol: Tolerances) -> list[Failure]:
    """One failure per per-step metric that leaves its limit: first offending step, worst value, count."""
    out = []
    for name, (_, upper) in STEP_METRICS.items():
        limit = getattr(tol, STEP_LIMITS[name])
        if limit is None:
            continue
        values = np.asarray(pr.steps[name])
        if f"{name}_floor" in pr.steps:
            limit = np.maximum(limit, np.asarray(pr.steps[f"{name}_floor"]))
        bad = _outside(values, limit, upper)
        if bad.any():
            first = int(np.argmax(bad))
            worst = float("nan") if np.isnan(values).any() else float(values.max() if upper else values.min())
            limit = float(np.max(limit))  # the loosest per-step limit, for the report
            out.append(Failure("teacher_forced", name, worst, limit, prompt=pr.index, step=first,
                               phase=pr.phase(first), count=int(bad.sum()), first_value=float(values[first])))
    return out


def _state_failures(pr: PromptResult, tol: Tolerances) -> list[Failure]:
    limit = tol.state_rel_l2
    bad = [(k, v) for k, v in pr.state.items()
           if "error" in v or (limit is not None and _outside(v["rel_l2"], limit, True))]
    if not bad:
        return []
    name, first = bad[0]  # layer-major order: the first bad one is the lowest layer
    value = float("inf") if "error" in first else first["rel_l2"]
    return [Failure("state", "state_rel_l2", value, tol.state_rel_l2, prompt=pr.index, step=pr.num_steps - 1,
                    phase="decode", count=len(bad), where=name, detail=first.get("error"))]


def _run_failures(prompts: list[PromptResult], overall: dict, tol: Tolerances, n: int) -> list[Failure]:
    out = []
    floor = float(np.mean(np.concatenate([np.asarray(p.steps.get("kl_floor", [0.0])) for p in prompts])))
    for key, limit_name, upper in RUN_LIMITS:
        limit, value = getattr(tol, limit_name), overall[key]
        if key == "mean_kl" and limit is not None:
            limit = max(limit, floor)
        if limit is not None and _outside(value, limit, upper):
            out.append(Failure("teacher_forced", key, value, limit))
    if tol.min_greedy_match is not None and n > 0:
        for pr in prompts:
            frac = pr.greedy_match / n
            step = pr.prompt_len - 1 + pr.greedy_match  # the step whose argmax the two runs disagree on
            if _outside(frac, tol.min_greedy_match, False):
                out.append(Failure("free_running", "greedy_match", frac, tol.min_greedy_match, prompt=pr.index,
                                   step=step, phase=pr.phase(step)))
    return out


def _overall(prompts: list[PromptResult], n: int) -> dict:
    cat = {k: np.concatenate([np.asarray(p.steps[k]) for p in prompts]) for k in (*STEP_METRICS, "top1", "top5")}
    return {
        "steps": int(cat["kl"].size),
        "max_abs": float(cat["max_abs"].max()), "rel_l2": float(cat["rel_l2"].max()),
        "cosine": float(cat["cosine"].min()), "max_kl": float(cat["kl"].max()), "mean_kl": float(cat["kl"].mean()),
        "top1": float(cat["top1"].mean()), "top5": float(cat["top5"].mean()),
        "top1_ties": int(sum(sum(p.steps.get("top1_tie", [])) for p in prompts)),
        "greedy_match": float(np.mean([p.greedy_match / n for p in prompts])) if n else 1.0,
        "state_rel_l2": max((v.get("rel_l2", float("inf")) for p in prompts for v in p.state.values()), default=0.0),
    }


def _check_prompt(art, ref, index: int, ids: np.ndarray, text: str | None, n: int, tol: Tolerances,
                  progress: Progress) -> PromptResult:
    r, a, ref_tokens = _teacher_forced(art, ref, ids, n, progress)
    state = metrics.state_divergence(ref.state(), art.state())
    steps = {name: fn(r, a).tolist() for name, (fn, _) in STEP_METRICS.items()}
    # a flip the reference's own logit rounding cannot order is a tie, not a disagreement (metrics.row_top1)
    exact, top1 = metrics.row_top1(r, a), metrics.row_top1(r, a, getattr(ref, "logit_bits", None))
    steps["top1"], steps["top1_tie"] = top1.tolist(), (top1 - exact).tolist()
    steps["top5"], steps["top1_gap"] = metrics.row_topk(r, a, 5).tolist(), metrics.row_top1_gap(r, a).tolist()
    # The scale-bound limits never sit below what rounding noise within the rel_l2 limit gives.
    steps["kl_floor"], steps["max_abs_floor"] = kl_floor(r, tol).tolist(), max_abs_floor(r, tol).tolist()
    # Up to the first argmax disagreement the free run equals the teacher-forced one; run it only after.
    agree = metrics.greedy_match_length(ref_tokens, [int(x) for x in a[len(ids) - 1 : -1].argmax(-1)])
    art_tokens = ref_tokens if agree == n else _free_run(art, ids, n)
    pr = PromptResult(index=index, text=text, prompt_ids=[int(x) for x in ids], reference_tokens=ref_tokens,
                      artifact_tokens=art_tokens, greedy_match=metrics.greedy_match_length(ref_tokens, art_tokens),
                      steps=steps, state=state)
    pr.first_drift = _first_drift(pr, tol)
    return pr


def _first_drift(pr: PromptResult, tol: Tolerances) -> dict | None:
    """The earliest step any per-step limit fails, and which metrics fail there."""
    fails = _step_failures(pr, tol)
    if not fails:
        return None
    step = min(f.step for f in fails)
    return {"prompt": pr.index, "step": step, "phase": pr.phase(step), "position": step,
            "metrics": [f.metric for f in fails if f.step == step]}


def check(artifact_runtime, reference_runtime, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 8,
          tolerances: Tolerances, speed: bool = False, prompt_texts: Sequence[str] | None = None,
          speed_options: dict | None = None, progress: bool | None = None) -> CheckReport:
    """Compare `artifact_runtime` with `reference_runtime` on `prompts` (token id lists), batch 1 each.

    Returns a CheckReport holding per-step metrics for every prompt, the state divergence after the run,
    the greedy continuations, every failure (`report.failures`) and the first drifting step. With
    `speed`, both runtimes are also timed on the first prompt (`perch.validate.speed.measure`).
    """
    if not prompts:
        raise ValueError("check() needs at least one prompt")
    start = time.monotonic()
    bar = Progress(len(prompts) * (max_new_tokens + 1), "perch check", progress)
    results = []
    try:
        for i, ids in enumerate(prompts):
            text = prompt_texts[i] if prompt_texts is not None else None
            results.append(_check_prompt(artifact_runtime, reference_runtime, i, np.asarray(ids, dtype=np.int64),
                                         text, max_new_tokens, tolerances, bar))
    finally:
        bar.close()
    overall = _overall(results, max_new_tokens)
    failures = [f for pr in results for f in _step_failures(pr, tolerances) + _state_failures(pr, tolerances)]
    failures += _run_failures(results, overall, tolerances, max_new_tokens)
    # Read in order: by prompt, then by the step where each limit first broke; run-wide ones last.
    failures.sort(key=lambda f: (f.prompt is None, f.prompt or 0, f.step if f.step is not None else 1 << 30))
    report = CheckReport(artifact={"runtime": getattr(artifact_runtime, "name", "artifact")},
                         reference={"runtime": getattr(reference_runtime, "name", "reference")},
                         tolerances=tolerances, max_new_tokens=max_new_tokens, prompts=results, overall=overall,
                         failures=failures)
    if speed:
        _add_speed(report, artifact_runtime, reference_runtime, np.asarray(prompts[0]), tolerances, speed_options or {})
    report.seconds = round(time.monotonic() - start, 3)
    return report


def _add_speed(report: CheckReport, art, ref, ids: np.ndarray, tol: Tolerances, options: dict) -> None:
    from perch.validate.speed import compare, measure

    room = min(art.max_context, ref.max_context) - len(ids)  # decode as far as both contexts allow, up to 32
    options = {"decode_tokens": max(1, min(32, room)), **options}
    ref_speed, art_speed = measure(ref, ids, **options), measure(art, ids, **options)
    report.speed = compare(art_speed, ref_speed)
    ratio, limit = report.speed["ratios"]["decode_tok_s"], tol.min_decode_speed_ratio
    if limit is not None and _outside(ratio, limit, False):
        report.failures.append(Failure("speed", "decode_speed_ratio", ratio, limit))


def check_artifact(path: str | Path, *, reference: str | None = None, prompts: str | Path | None = None,
                   max_new_tokens: int = 8, device: str = "cpu", reference_dtype: str = "float32",
                   speed: bool = False, report_dir: str | Path | None = None, bisect: bool = False,
                   quiet: bool = False, tolerances: Tolerances | None = None) -> CheckReport:
    """`perch check`: the artifact at `path` against its reference (default: the manifest's source model).

    Raises PerchError for bad input (missing artifact, reference or prompts file; exit 2). A fidelity or
    speed failure does not raise: the CLI reads `report.passed` and raises CheckFailed (exit 1).
    """
    from perch.validate.artifact import open_check

    session = open_check(path, reference=reference, prompts=prompts, max_new_tokens=max_new_tokens, device=device,
                         reference_dtype=reference_dtype, tolerances=tolerances)
    try:
        report = check(session.artifact, session.reference, session.prompt_ids, max_new_tokens=max_new_tokens,
                       tolerances=session.tolerances, speed=speed, prompt_texts=session.prompt_texts,
                       progress=None if not quiet else False)
        report.artifact.update(session.artifact_info)
        report.reference.update(session.reference_info)
        if bisect and not report.passed:
            from perch.validate.bisect import bisect_report

            report.bisect = bisect_report(report, session)
    finally:
        session.close()
    if report_dir is not None:
        write_report(report, report_dir)
    return report
