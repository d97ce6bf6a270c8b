"""report.md, the PNG plots (matplotlib Agg) and the report directory; the terminal summary is summary.py."""
from __future__ import annotations

import json
from pathlib import Path

from perch.validate.report import CheckReport, validate_report
from perch.validate.summary import _describe, _metric_rows, _speed_lines, fmt as _fmt


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


def write_report(report: CheckReport, directory: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots into `directory`; returns {kind: path}."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {"errors_png": plot_errors(report, out / "error_per_step.png")}
    if report.speed:
        files["speed_png"] = plot_speed(report.speed, out / "speed.png")
    report.files = {k: str(v) for k, v in files.items()}
    report.files.update(json=str(out / "report.json"), markdown=str(out / "report.md"))
    (out / "report.md").write_text(markdown(report))
    data = report.to_dict()
    validate_report(data)  # never write a report.json that breaks its own contract
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return {**files, "json": out / "report.json", "markdown": out / "report.md"}
