"""A few seeded random configs per run (benchmarks/fuzz_configs.py runs hundreds): a valid one exports to
both backends and passes `perch check`; ones with an unsupported field are refused, naming the field.

PERCH_FUZZ_SEED picks another draw (the default keeps CI reproducible).
"""
from __future__ import annotations

import os
import random

import pytest

from perch.validate.fuzz import BAD, SAMPLERS, run_case, sample, verdict

SEED = int(os.environ.get("PERCH_FUZZ_SEED", "0"))


def _draw(want_bad: bool, arch: str | None, n: int) -> list:
    rng, out = random.Random(SEED), []
    while len(out) < n:
        case = sample(rng, bad_share=1.0 if want_bad else 0.0)
        if arch is None or case.arch == arch:
            out.append(case)
    return out


@pytest.mark.slow  # ~1 min each on 2 cores; benchmarks/fuzz_configs.py runs the same path at scale
@pytest.mark.parametrize("arch", sorted(SAMPLERS))
def test_a_random_valid_config_exports_and_passes_check_on_both_backends(tmp_path, arch):
    (case,) = _draw(False, arch, 1)
    run_case(case, tmp_path)
    assert verdict(case) == "exported", (case.label, case.config, case.results)


def test_random_unsupported_configs_are_refused_by_name(tmp_path):
    for i, case in enumerate(_draw(True, None, 3)):
        run_case(case, tmp_path / str(i))
        assert verdict(case) == "refused", (case.label, case.results)
        assert not (tmp_path / str(i) / "onnx").exists() and not (tmp_path / str(i) / "coreml").exists()


def test_every_bad_field_is_refused(tmp_path):
    """The table itself, once each, ONNX only (the refusal happens before any backend runs)."""
    rng = random.Random(SEED)
    for i, (arch, key, value) in enumerate(BAD):
        case = sample(rng, bad_share=0.0)
        while case.arch != arch:
            case = sample(rng, bad_share=0.0)
        if value is None:
            case.config.pop(key, None)
        else:
            case.config[key] = value
        case.refuse, case.label = key, f"{arch} {key}={value!r}"
        run_case(case, tmp_path / str(i), backends=("onnx",))
        assert verdict(case) == "refused", (case.label, case.results)
