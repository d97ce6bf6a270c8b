"""coremltools' own torch-frontend tests, with Perch's MIL executor standing in for Core ML.

The oracle is coremltools' suite (shipped in its wheel): each test converts a torch module and, on
macOS, compares Core ML's prediction with torch. tests/coremltools_suite/ct_executor_plugin.py makes the
tests take that path here with `MilExecutor` predicting; selection.txt pins the tests (the ops Falcon,
Falcon-Mamba and Falcon-H1 programs hold, fp16 and fp32, and the stateful models). Every failure must be
coremltools' own (listed with its reason in known_failures.txt), never the executor's.
"""
from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest

# ~6.5 CPU-minutes over 2 shards (a third of the suite's CPU time): `make test-extended` runs it, and so does
# tests/coremltools_suite/ct_suite.py; every Core ML parity test in `make test` runs through the executor too.
pytestmark = [pytest.mark.slow, pytest.mark.extended]

sys.path.insert(0, str(Path(__file__).resolve().parent / "coremltools_suite"))
import ct_suite as suite  # noqa: E402  (tests/coremltools_suite/ct_suite.py)


def read_known(path: Path = suite.KNOWN_FAILURES) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(pattern, category, reason substring) rules for coremltools' own failures, and the unsupported
    ops we do not implement: `op NAME | why`."""
    rules, ops = [], {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(" | ")]
        if fields[0].startswith("op "):
            ops[fields[0][3:].strip()] = fields[1]
        else:
            pattern, category, reason = fields
            rules.append((pattern, category, reason))
    return rules, ops


@pytest.fixture(scope="module")
def report() -> dict:
    return suite.run(shards=2)


def _failures(report: dict, *categories: str) -> dict[str, dict]:
    return {t: e for t, e in report["tests"].items() if e["category"] in categories}


def _show(entries: dict[str, dict]) -> str:
    return "\n".join(f"{t}\n    {e['reason']}" for t, e in sorted(entries.items()))


def test_the_executor_agrees_with_every_prediction(report):
    bad = _failures(report, "executor")
    assert not bad, f"{len(bad)} test(s) where Perch's executor disagrees with Core ML's contract:\n{_show(bad)}"


def test_every_other_failure_is_a_known_coremltools_error(report):
    rules, _ = read_known()
    unknown = {t: e for t, e in _failures(report, "conversion", "test").items()
               if not any(fnmatch.fnmatchcase(t, p) and e["category"] == c and r in e["reason"] for p, c, r in rules)}
    assert not unknown, f"failures before any prediction not listed in known_failures.txt:\n{_show(unknown)}"


def test_unsupported_ops_are_the_listed_ones(report):
    _, allowed = read_known()
    skipped = _failures(report, "unsupported")
    ops = {op.strip() for e in skipped.values() for op in e["reason"].removeprefix("unsupported op: ").split(",")}
    assert ops <= set(allowed), f"ops without a kernel, not listed in known_failures.txt: {sorted(ops - set(allowed))}"


def test_the_selection_mostly_predicts(report):
    counts = suite.summary(report)
    assert len(report["tests"]) >= 300, counts  # the selection ran (a broken pattern would stop collection)
    assert counts.get("passed", 0) >= 0.8 * len(report["tests"]), counts
