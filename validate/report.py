"""The check report: its data, `report.json` (versioned schema), `report.md`, PNG plots, terminal summary.

`report_schema.json` beside this file is the contract for `report.json` and `perch check --json`; bump
REPORT_SCHEMA_VERSION (and the schema's `const`) whenever a field changes meaning or disappears.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from perch import __version__
from perch.validate.summary import fmt as _fmt, summary_text

REPORT_SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
_WORDS = {"max_abs": "max |logit diff|", "rel_l2": "relative L2", "cosine": "cosine", "kl": "KL(ref||art)",
          "mean_kl": "mean KL", "top1": "top-1 agreement", "top5": "top-5 overlap", "greedy_match": "greedy match",
          "state_rel_l2": "state relative L2", "decode_speed_ratio": "decode speed ratio"}


@dataclass
class Failure:
    """One limit left: which check and metric, the worst value and the limit, and where it first happened."""

    check: str  # "teacher_forced" | "free_running" | "state" | "speed"
    metric: str
    value: float  # the worst value seen
    limit: float | None
    prompt: int | None = None
    step: int | None = None  # first offending step (token position in prompt + continuation)
    phase: str | None = None  # "prefill" | "decode"
    count: int = 1  # how many steps (or state tensors) leave the limit
    where: str | None = None  # a state tensor ("ssm.1") or a layer
    first_value: float | None = None
    detail: str | None = None

    def line(self) -> str:
        bound = "<" if self.metric in ("cosine", "top1", "top5", "greedy_match", "decode_speed_ratio") else ">"
        at = []
        if self.prompt is not None:
            at.append(f"prompt {self.prompt}")
        if self.step is not None:
            at.append(f"step {self.step} ({self.phase})" if self.phase else f"step {self.step}")
        if self.where:
            at.append(self.where)
        what = f"{_WORDS.get(self.metric, self.metric)} {_fmt(self.value)} {bound} limit {_fmt(self.limit)}"
        tail = f", {self.count} step(s)" if self.check == "teacher_forced" and self.step is not None else ""
        tail = f", {self.count} tensor(s)" if self.check == "state" else tail
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.check}: {what}" + (f" at {', '.join(at)}" if at else "") + tail + extra

    def to_dict(self) -> dict:
        return {k: _json_num(v) for k, v in self.__dict__.items()}


@dataclass
class PromptResult:
    """One prompt's run: ids, both continuations, per-step metrics (one entry per position), final state."""

    index: int
    text: str | None
    prompt_ids: list[int]
    reference_tokens: list[int]
    artifact_tokens: list[int]
    greedy_match: int
    steps: dict[str, list[float]]  # metric -> value per step; steps 0..prompt_len-1 are prefill rows
    state: dict[str, dict]
    first_drift: dict | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_steps(self) -> int:
        return len(self.steps["kl"])

    def phase(self, step: int) -> str:
        return "prefill" if step < self.prompt_len else "decode"

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["prompt_len"] = self.prompt_len
        d["steps"] = {k: [_json_num(x) for x in v] for k, v in self.steps.items()}
        d["state"] = {k: {m: _json_num(x) for m, x in v.items()} for k, v in self.state.items()}
        return d


@dataclass
class CheckReport:
    """Everything `perch check` found. `passed` is true exactly when `failures` is empty."""

    artifact: dict
    reference: dict
    tolerances: object  # perch.validate.tolerances.Tolerances
    max_new_tokens: int
    prompts: list[PromptResult]
    overall: dict
    failures: list[Failure]
    speed: dict | None = None
    bisect: dict | None = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def first_drift(self) -> dict | None:
        """The earliest drifting step over all prompts (lowest prompt index first)."""
        return next((p.first_drift for p in self.prompts if p.first_drift), None)

    def failure_line(self) -> str:
        """One line for the CLI's error message: how many limits failed and the first of them."""
        if self.passed:
            return "passed"
        n, drift = len(self.failures), self.first_drift
        if drift:
            return (f"{n} check(s) failed; first drift at prompt {drift['prompt']}, step {drift['step']} "
                    f"({drift['phase']}): {', '.join(drift['metrics'])}")
        more = f" (and {n - 1} more; see the report)" if n > 1 else ""
        return f"{n} check(s) failed: {self.failures[0].line()}{more}"

    def to_dict(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "perch_version": __version__,
            "passed": self.passed,
            "artifact": self.artifact,
            "reference": self.reference,
            "tolerances": {k: _json_num(v) for k, v in self.tolerances.to_dict().items()},
            "max_new_tokens": self.max_new_tokens,
            "overall": {k: _json_num(v) for k, v in self.overall.items()},
            "failures": [f.to_dict() for f in self.failures],
            "first_drift": self.first_drift,
            "prompts": [p.to_dict() for p in self.prompts],
            "speed": _json_tree(self.speed),
            "bisect": _json_tree(self.bisect),
            "seconds": self.seconds,
            "files": self.files,
        }

    def summary(self) -> str:
        """A one-screen terminal summary: verdict, worst values against limits, failures, speed, bisect."""
        return summary_text(self)


def _json_num(v):
    """JSON has no inf/nan: write them as strings ("inf"), which the schema allows for numbers."""
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return v


def _json_tree(v):
    if isinstance(v, dict):
        return {k: _json_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_tree(x) for x in v]
    return _json_num(v)


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(data: dict) -> None:
    """Raise jsonschema.ValidationError if `data` (a report dict or parsed report.json) breaks the schema."""
    import jsonschema

    jsonschema.validate(data, load_schema(), cls=jsonschema.Draft202012Validator)
