"""Run coremltools' own torch-frontend tests against Perch's MIL executor, and summarise the outcome.

    python tests/coremltools_suite/ct_suite.py [--selection FILE] [--shards N] [--out results.json]

Each shard is one pytest process over coremltools' test modules (shipped in the wheel) with
`ct_executor_plugin` loaded; shard i runs every N-th selected test, so N shards use N cores. The merged
report maps each test id to {outcome, category, reason}; `summary` counts the categories.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SELECTION = HERE / "selection.txt"
KNOWN_FAILURES = HERE / "known_failures.txt"
MODULES = ("test_torch_ops.py", "test_torch_stateful_model.py")


def suite_dir() -> Path:
    """coremltools' torch-frontend test folder, inside the installed wheel."""
    import coremltools.converters.mil.frontend.torch.test as ct_torch_tests

    return Path(ct_torch_tests.__file__).parent


def _command(selection: Path, report: Path, shard: int, shards: int, log: Path | None) -> list[str]:
    tests = suite_dir()
    extra = [f"--perch-ct-log={log}.{shard}"] if log else []
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
            "-p", "ct_executor_plugin", f"--rootdir={tests}", f"--perch-ct-selection={selection}",
            f"--perch-ct-report={report}", f"--perch-ct-shard={shard}/{shards}", "--tb=line",
            *extra, *(str(tests / m) for m in MODULES)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write bytecode into the installed wheel
    return env


def run(selection: Path = SELECTION, shards: int = 2, timeout: float = 3600, log: Path | None = None) -> dict[str, Any]:
    """Run the selection in `shards` concurrent pytest processes; the merged report (see module doc).
    `log`: each shard appends every test's entry to LOG.<shard> as it ends (readable mid-run)."""
    with tempfile.TemporaryDirectory() as tmp:
        reports = [Path(tmp) / f"shard{i}.json" for i in range(shards)]
        outs = [open(Path(tmp) / f"shard{i}.log", "w+") for i in range(shards)]
        procs = [subprocess.Popen(_command(selection, r, i, shards, log), cwd=tmp, env=_env(), stdout=out,
                                  stderr=subprocess.STDOUT) for i, (r, out) in enumerate(zip(reports, outs))]
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:  # a timed-out run leaves no shard behind
                if p.poll() is None:
                    p.kill()
        merged: dict[str, Any] = {"meta": {}, "tests": {}}
        for p, r, out in zip(procs, reports, outs):
            out.seek(0)
            text = out.read()
            out.close()
            if p.returncode not in (0, 1) or not r.exists():  # pytest: 0 all passed, 1 some failed
                raise RuntimeError(f"a shard did not finish (exit {p.returncode}):\n{text[-4000:]}")
            part = json.loads(r.read_text())
            merged["meta"] = part["meta"]
            merged["tests"].update(part["tests"])
    return merged


def summary(report: dict[str, Any]) -> dict[str, int]:
    """Tests per category: passed, unsupported, xfail (coremltools' own marks), skipped, conversion,
    test (failed before any prediction, outside ct.convert), executor."""
    counts: dict[str, int] = {}
    for entry in report["tests"].values():
        counts[entry["category"]] = counts.get(entry["category"], 0) + 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selection", type=Path, default=SELECTION)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the merged report here (JSON)")
    ap.add_argument("--log", type=Path, help="shards append each test's entry to LOG.<shard> as it ends")
    args = ap.parse_args(argv)
    report = run(args.selection, args.shards, log=args.log)
    counts = summary(report)
    print(f"selected {len(report['tests'])}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for test, entry in sorted(report["tests"].items()):
        if entry["category"] not in ("passed",):
            print(f"  {entry['category']:<12} {test}\n               {entry['reason'][:200]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**report, "summary": counts}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
