"""The one-screen terminal summary of a CheckReport (plain text; report.md and plots are in render.py)."""
from __future__ import annotations

import math

# (overall key, label, tolerance field, True if the limit is an upper bound)
ROWS = (
    ("max_abs", "max |logit diff|", "max_abs", True),
    ("rel_l2", "relative L2 (worst step)", "rel_l2", True),
    ("cosine", "cosine (worst step)", "min_cosine", False),
    ("max_kl", "KL ref||art (worst step)", "max_kl", True),
    ("mean_kl", "KL ref||art (mean)", "mean_kl", True),
    ("top1", "top-1 agreement", "min_top1", False),
    ("top5", "top-5 overlap", "min_top5", False),
    ("greedy_match", "greedy match (mean)", "min_greedy_match", False),
    ("state_rel_l2", "state relative L2", "state_rel_l2", True),
)
SPEED_ROWS = (("ttft_ms", "time to first token (ms)"), ("prefill_tok_s", "prefill (tok/s)"),
              ("decode_tok_s", "decode (tok/s)"), ("decode_ms_per_token", "decode (ms/token)"),
              ("peak_rss_mb", "peak host RSS (MB)"), ("peak_gpu_mb", "peak GPU memory (MB)"))


def _metric_rows(report) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, label, limit_name, upper in ROWS:
        value, limit = report.overall.get(key), getattr(report.tolerances, limit_name)
        if limit is None:
            verdict = "-"
        else:
            ok = value <= limit if upper else value >= limit
            verdict = "ok" if ok else "FAIL"
        shown = ("<= " if upper else ">= ") + fmt(limit) if limit is not None else "not checked"
        rows.append((label, fmt(value), shown, verdict))
    return rows


def _describe(side: dict) -> str:
    bits = [side.get("runtime", "?")]
    for key in ("format", "precision", "dtype", "device", "model", "path"):
        if side.get(key) and not (key == "path" and side[key] == side.get("model")):
            bits.append(f"{key}={side[key]}")
    return " ".join(str(b) for b in bits)


def _speed_lines(speed: dict) -> list[str]:
    ref, art, ratios = speed["reference"], speed["artifact"], speed["ratios"]
    lines = [f"  {'':<26}{'reference':>12}{'artifact':>12}{'art/ref':>9}"]
    for key, label in SPEED_ROWS:
        if ref.get(key) is None and art.get(key) is None:
            continue
        lines.append(f"  {label:<26}{fmt(ref.get(key)):>12}{fmt(art.get(key)):>12}{fmt(ratios.get(key)):>9}")
    return lines


def _bisect_line(b: dict) -> str:
    return f"bisect: {b.get('message', '')}"


def summary_text(report) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    head = (f"perch check: {verdict}  ({len(report.prompts)} prompt(s), {report.max_new_tokens} new tokens, "
            f"{report.overall['steps']} steps compared, {report.seconds:.1f} s)")
    lines = [head, f"  artifact:  {_describe(report.artifact)}", f"  reference: {_describe(report.reference)}",
             f"  limits:    {report.tolerances.precision}", ""]
    lines += [f"  {label:<26}{value:>11}  {limit:<14}{v}" for label, value, limit, v in _metric_rows(report)]
    if report.overall.get("top1_ties"):
        lines.append(f"  ({report.overall['top1_ties']} top-1 flip(s) inside one step of the reference's own logit "
                     "rounding: ties it cannot order, counted as agreeing)")
    drift = report.first_drift
    if drift:
        lines.append(f"\nfirst drift: prompt {drift['prompt']}, step {drift['step']} ({drift['phase']}): "
                     f"{', '.join(drift['metrics'])}")
    if report.failures:
        lines.append(f"\nfailures ({len(report.failures)}):")
        shown = report.failures[:8]
        lines += [f"  - {f.line()}" for f in shown]
        if len(report.failures) > len(shown):
            lines.append(f"  ... and {len(report.failures) - len(shown)} more in report.json")
    if report.speed:
        lines += ["", "speed (median of repeats):", *_speed_lines(report.speed)]
    if report.bisect:
        lines += ["", _bisect_line(report.bisect)]
    if report.files.get("markdown"):
        lines += ["", f"report: {report.files['markdown']}"]
    return "\n".join(lines)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, float) and 0.999 < x < 1.0:
        return f"1-{1.0 - x:.2g}"  # a cosine or agreement just under 1: ".3g" would print "1"
    return f"{x:.3g}" if isinstance(x, float) else str(x)
