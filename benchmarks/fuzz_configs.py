"""Fuzz `perch export` + `perch check` with N seeded random tiny configs (perch.validate.fuzz).

    nice -n 10 python benchmarks/fuzz_configs.py --n 200 --seed 0

Valid configs must export to ONNX and Core ML and pass `perch check`; configs with an unsupported field
must be refused naming it. Prints tried / exported / refused / wrong, lists every wrong case, and writes
benchmarks/results/fuzz_configs.json (rewritten after every case, so a long run can be stopped).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from perch.validate.fuzz import run_case, sample, verdict

OUT = Path(__file__).resolve().parent / "results" / "fuzz_configs.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="onnx,coreml")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--resume", action="store_true", help="keep the cases already in --out (same seed) and go on")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="with --resume: cases done by another run of the same seed (e.g. a --start half run "
                        "beside this one) count as done too")
    p.add_argument("--start", type=int, default=0, help="run only cases from this index on (two halves in "
                                                       "parallel: one run from 0, one from N/2, then --resume --also)")
    a = p.parse_args(argv)
    rng, rows, start = random.Random(a.seed), [], time.time()
    counts = {"tried": 0, "exported": 0, "refused": 0, "wrong": 0}
    done, before = _previous(a, a.out) if a.resume else ({}, 0.0)
    for other in a.also if a.resume else ():
        more, seconds = _previous(a, other)
        done, before = {**more, **done}, before + seconds
    start -= before
    for i in range(a.n):
        case = sample(rng)  # drawn even when resumed: the rng must walk the same sequence
        if i < a.start:
            continue
        if i in done:
            rows.append(done[i])
            counts["tried"] += 1
            counts[done[i]["verdict"]] += 1
            continue
        with tempfile.TemporaryDirectory(prefix="perch-fuzz-") as tmp:
            run_case(case, Path(tmp), backends=tuple(a.backends.split(",")), seed=i)
        v = verdict(case)
        counts["tried"] += 1
        counts[v] += 1
        rows.append({"i": i, "label": case.label, "refuse": case.refuse, "verdict": v, "results": case.results,
                     "config": case.config})
        print(f"{i:4d} {v:9s} {case.label}" + ("" if v != "wrong" else f"  {case.results}"), flush=True)
        _write(a, counts, rows, time.time() - start)
    print("\n| tried | exported | refused | wrong |\n|---|---|---|---|")
    print(f"| {counts['tried']} | {counts['exported']} | {counts['refused']} | {counts['wrong']} |")
    return 1 if counts["wrong"] else 0


def _previous(a, path: Path) -> tuple[dict, float]:
    """The cases of an earlier run of the same seed and backends in `path`, by index, and its seconds."""
    if not path.exists():
        return {}, 0.0
    doc = json.loads(path.read_text())
    if (doc.get("seed"), doc.get("backends")) != (a.seed, a.backends):
        raise SystemExit(f"--resume: {path} holds seed {doc.get('seed')} / {doc.get('backends')}, not "
                         f"{a.seed} / {a.backends}; pass another --out")
    return {r["i"]: r for r in doc["cases"]}, float(doc.get("seconds", 0.0))


def _write(a, counts: dict, rows: list, seconds: float) -> None:
    import torch

    a.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(["python", *sys.argv]), "seed": a.seed, "n_requested": a.n, "backends": a.backends,
           "seconds": round(seconds, 1), "machine": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **counts,
           "wrong_cases": [r for r in rows if r["verdict"] == "wrong"], "cases": rows}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
