"""Measure the fidelity of correct exports at each precision, to set validate/tolerances.py defaults.

Trained fixtures (perch.dev.fixtures, flat random logits say nothing about quantization): Perch's own eager
module at fp32/fp16/fp16-state, and real exports through the exporters' own quantizers, against
transformers fp32. Prints one row per (arch, precision) and, for comparison, the same numbers for
deliberately broken models. Usage: OMP_NUM_THREADS=1 python benchmarks/measure_tolerances.py [--json OUT]
(trains the fixtures on first use, a few minutes each; the exports take several minutes more).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from perch.runtimes.pytorch.eager import EagerRuntime  # noqa: E402
from perch.archs import ARCH_MODULES  # noqa: E402
from perch.dev.fixtures import fixture_dir  # noqa: E402
from perch.loading import Checkpoint, load_checkpoint  # noqa: E402
from perch.runtimes.pytorch.reference import ReferenceRuntime  # noqa: E402
from perch.validate.artifact import DEFAULT_PROMPTS, tokenize  # noqa: E402
from perch.validate.controls import DroppedStateWrite, Fp16State, ShiftedDecode, has_positions, perturbed  # noqa: E402
from perch.validate.runner import check  # noqa: E402
from perch.validate.tolerances import Tolerances, tolerance_for_precision  # noqa: E402

EXTRA_PROMPTS = (
    "The import statement is used to",
    "Exceptions are raised when an error is detected during execution, and",
    "A class definition is an executable statement. The inheritance list usually gives",
    "The while statement is used for repeated execution as long as an expression is true:",
    "Names refer to objects. Names are introduced by name binding operations.",
)
NO_LIMITS = Tolerances("measure", *([None] * 9))


def variants(ckpt: Checkpoint, ctx: int) -> dict:
    """Eager precisions and the negative controls; quantized rows come from the real exporters (artifacts)."""
    shifted = ShiftedDecode(ckpt, max_context=ctx)
    return {
        "fp32": lambda: EagerRuntime(ckpt, max_context=ctx),
        "fp16": lambda: EagerRuntime(ckpt, max_context=ctx, dtype=torch.float16),
        "bf16 (transformers)": lambda: ReferenceRuntime(ckpt, max_context=ctx, dtype=torch.bfloat16),
        "fp32+fp16state": lambda: Fp16State(ckpt, max_context=ctx),
        "BROKEN shift-decode-position": lambda: shifted if has_positions(shifted) else None,
        "BROKEN dropped-state-write-L1": lambda: DroppedStateWrite(ckpt, max_context=ctx),
        "BROKEN weight*1.02-L1": lambda: EagerRuntime(perturbed(ckpt, scale=1.02), max_context=ctx),
    }


# Real exports of the fixtures: (format, --precision, --quantize).
ARTIFACTS = (("onnx", "fp32", "none"), ("onnx", "fp16", "none"), ("onnx", "fp32", "int8"), ("onnx", "fp32", "int4"),
             ("onnx", "fp32", "int4-rtn"), ("coreml", "fp32", "none"), ("coreml", "fp16", "none"),
             ("coreml", "fp16", "int8"), ("coreml", "fp16", "int4"), ("coreml", "fp16", "int4-rtn"),
             ("coreml", "fp16", "palettize4"))


def artifacts(ckpt: Checkpoint, ctx: int, tmp: Path) -> dict:
    """name -> factory exporting the fixture with the real exporter and opening it with its runtime."""
    from unittest import mock

    from perch.exporter import calibration
    from perch.exporter.export import export, options_for
    from perch.exporter.quant_recipes import RECIPES
    from perch.runtimes import open_artifact

    real, cache = calibration.calibration_for, {}

    def shared(ck, options):  # one calibration per fixture: export() would rerun it for every artifact
        if not getattr(RECIPES.get(options.quantize), "calibration", False):
            return None
        if "cal" not in cache:
            cache["cal"] = real(ck, options)
        return cache["cal"]

    def make(fmt, dtype, quant):
        out = tmp / f"{ckpt.arch}-{fmt}-{dtype}-{quant}"
        with mock.patch("perch.exporter.calibration.calibration_for", shared):
            export(ckpt, out, options_for(fmt, precision=dtype, quantize=quant, max_context=ctx))
        return open_artifact(out)

    return {f"{fmt} {dtype} {quant}": (lambda f=fmt, d=dtype, q=quant: make(f, d, q))
            for fmt, dtype, quant in ARTIFACTS}


LIMITS = (("max_abs", "max_abs", True), ("rel_l2", "rel_l2", True), ("cosine", "min_cosine", False),
          ("max_kl", "max_kl", True), ("mean_kl", "mean_kl", True), ("top1", "min_top1", False),
          ("top5", "min_top5", False), ("state_rel_l2", "state_rel_l2", True))


def precision_key(variant: str) -> str | None:
    """The tolerance key a measured variant is judged by; None for the deliberately broken ones."""
    if variant.startswith("BROKEN"):
        return None
    if "bf16" in variant:
        return "bf16"
    if variant in ("fp32+fp16state", "coreml fp32 none"):
        return "fp32+fp16state"
    return next((q for q in ("palettize4", "int8", "int4-rtn", "int4") if q in variant),
                "fp16" if "fp16" in variant else "fp32")


def broken_limits(overall: dict, tol: Tolerances) -> list[str]:
    out = []
    for key, limit_name, upper in LIMITS:
        limit, value = getattr(tol, limit_name), overall[key]
        if limit is not None and (value > limit if upper else value < limit):
            out.append(f"{key} {value:.3g} vs {limit:.3g}")
    return out


def verdicts(rows: dict) -> None:
    """Correct exports must pass their precision's defaults; broken ones should fail as many as possible."""
    print("\nagainst validate/tolerances.py defaults:")
    for name, overall in rows.items():
        arch, variant = name.split("/", 1)
        key = precision_key(variant)
        if key is not None:
            bad = broken_limits(overall, tolerance_for_precision(key, arch))
            print(f"  {name:<44} {key:<15} {'pass' if not bad else 'FAIL: ' + '; '.join(bad)}")
        else:
            caught = {p: bool(broken_limits(overall, tolerance_for_precision(p, arch)))
                      for p in ("fp32", "fp16", "int8", "int4", "int4-rtn", "palettize4")}
            print(f"  {name:<44} caught at: {', '.join(p for p, c in caught.items() if c) or 'none'}")


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--eager-only", action="store_true", help="skip the real exports (quantized rows need them)")
    ap.add_argument("--archs", nargs="+", default=list(ARCH_MODULES))
    ap.add_argument("--only", nargs="+", help="variants by name (e.g. 'onnx fp32 int4-rtn'); the BROKEN "
                                               "controls always run, so the verdicts still show what is caught")
    a = ap.parse_args()
    rows = {}
    keys = ("max_abs", "rel_l2", "cosine", "max_kl", "mean_kl", "top1", "top5", "greedy_match", "state_rel_l2")
    print(f"{'arch':<13}{'variant':<30}" + "".join(f"{k:>13}" for k in keys))
    tmp = Path(tempfile.mkdtemp(prefix="perch-tol-"))
    for arch in a.archs:
        ckpt = load_checkpoint(fixture_dir(arch))
        ref = ReferenceRuntime(ckpt, max_context=256)
        ids = tokenize(list(DEFAULT_PROMPTS + EXTRA_PROMPTS), [ckpt.model_dir], ckpt.config.vocab_size, 200)
        todo = {**variants(ckpt, 256), **({} if a.eager_only else artifacts(ckpt, 256, tmp))}
        todo = {n: f for n, f in todo.items() if not a.only or n.startswith("BROKEN") or n in a.only}
        for name, make in todo.items():
            art = make()
            if art is None:
                continue
            r = check(art, ref, ids, max_new_tokens=a.max_new_tokens, tolerances=NO_LIMITS)
            rows[f"{arch}/{name}"] = r.overall
            print(f"{arch:<13}{name:<30}" + "".join(f"{r.overall[k]:>13.3g}" for k in keys), flush=True)
            art.close()
    verdicts(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
