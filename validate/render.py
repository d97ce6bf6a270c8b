"""How a CheckReport looks to a person: the terminal summary, report.md and the PNG plots (matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path

from perch.validate.report import CheckReport, _fmt

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


def _metric_rows(report: CheckReport) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, label, limit_name, upper in ROWS:
        value, limit = report.overall.get(key), getattr(report.tolerances, limit_name)
        if limit is None:
            verdict = "-"
        else:
            ok = value <= limit if upper else value >= limit
            verdict = "ok" if ok else "FAIL"
        shown = ("<= " if upper else ">= ") + _fmt(limit) if limit is not None else "not checked"
        rows.append((label, _fmt(value), shown, verdict))
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
        lines.append(f"  {label:<26}{_fmt(ref.get(key)):>12}{_fmt(art.get(key)):>12}{_fmt(ratios.get(key)):>9}")
    return lines


def _bisect_line(b: dict) -> str:
    return f"bisect: {b.get('message', '')}"


def summary_text(report: CheckReport) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    head = (f"perch check: {verdict}  ({len(report.prompts)} prompt(s), {report.max_new_tokens} new tokens, "
            f"{report.overall['steps']} steps compared, {report.seconds:.1f} s)")
    lines = [head, f"  artifact:  {_describe(report.artifact)}", f"  reference: {_describe(report.reference)}",
             f"  limits:    {report.tolerances.precision}", ""]
    lines += [f"  {label:<26}{value:>11}  {limit:<14}{v}" for label, value, limit, v in _metric_rows(report)]
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


def _md_table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(report: CheckReport) -> str:
    """report.md: the same facts as the summary, plus per-prompt continuations and links to the plots."""
    lines = [f"# perch check: {'PASS' if report.passed else 'FAIL'}", "",
             f"- artifact: `{_describe(report.artifact)}`", f"- reference: `{_describe(report.reference)}`",
             f"- limits: {report.tolerances.precision} ({report.tolerances.basis or 'defaults'})",
             f"- {len(report.prompts)} prompt(s), {report.max_new_tokens} new tokens, {report.seconds:.1f} s", "",
             "## Fidelity", ""]
    lines += _md_table(("metric", "value", "limit", "verdict"), _metric_rows(report))
    if report.first_drift:
        d = report.first_drift
        lines += ["", f"First drift: prompt {d['prompt']}, step {d['step']} ({d['phase']}): {', '.join(d['metrics'])}."]
    lines += ["", "## Failures", ""] + ([f"- {f.line()}" for f in report.failures] or ["None."])
    lines += ["", "## Prompts", ""]
    rows = [(p.index, p.prompt_len, p.greedy_match, " ".join(map(str, p.reference_tokens)),
             " ".join(map(str, p.artifact_tokens))) for p in report.prompts]
    lines += _md_table(("prompt", "tokens", "greedy match", "reference greedy ids", "artifact greedy ids"), rows)
    if report.speed:
        lines += ["", "## Speed", "", "```", *_speed_lines(report.speed), "```"]
    if report.bisect:
        lines += ["", "## Bisect", "", report.bisect.get("message", "")]
        if report.bisect.get("layer_errors"):
            errors = list(enumerate(map(_fmt, report.bisect["layer_errors"])))
            lines += [""] + _md_table(("layer", "hidden rel L2"), errors)
    plots = [(k, Path(v).name) for k, v in report.files.items() if v.endswith(".png")]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({name})" for k, name in plots]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_errors(report: CheckReport, path: Path) -> Path:
    """Per-step max abs, relative L2 and KL (log scale) for each prompt, with the limits as dashed lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    panels = (("max_abs", "max_abs", "max |logit diff|"), ("rel_l2", "rel_l2", "relative L2"),
              ("kl", "max_kl", "KL(ref||art)"))
    for ax, (key, limit_name, title) in zip(axes, panels):
        for p in report.prompts:
            values = [max(v, 1e-18) for v in p.steps[key]]  # log scale: exact zeros drawn at the floor
            ax.plot(range(len(values)), values, lw=1.2, label=f"prompt {p.index}")
            ax.axvline(p.prompt_len - 0.5, color="grey", lw=0.6, ls=":")
        limit = getattr(report.tolerances, limit_name)
        if limit is not None:
            ax.axhline(limit, color="red", ls="--", lw=1, label="limit")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step (prompt positions, then decode)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"perch check: {'PASS' if report.passed else 'FAIL'} ({report.tolerances.precision})")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_speed(speed: dict, path: Path) -> Path:
    """Side-by-side bars, reference vs artifact: time to first token, prefill and decode throughput."""
    plt = _pyplot()
    keys = (("ttft_ms", "time to first token (ms)"), ("prefill_tok_s", "prefill tok/s"),
            ("decode_tok_s", "decode tok/s"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, keys):
        values = [speed["reference"][key], speed["artifact"][key]]
        bars = ax.bar(["reference", "artifact"], values, color=["#7f7f7f", "#1f77b4"])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
