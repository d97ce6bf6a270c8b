"""Full-width parity at reduced depth (slow): the public shapes where our own code could differ from
transformers only at real sizes (Falcon-7B's 71 query heads sharing one K,V head at hidden 4544 and vocab
65024; Falcon-Mamba-7B's 8192-wide inner state and 256-rank dt; Falcon-40B's 8 K,V groups of 16 heads at
hidden 8192), two layers deep, random weights, exported in fp32 and fp16 and checked with `perch check`
against transformers. int4 is left out: the trained-fixture int4 limits do not describe random weights.

    python -m pytest -q -m slow tests/test_full_width.py
"""
from __future__ import annotations

import pytest

import perch
from perch.dev.presets import make_config, write_preset

LAYERS = 2
MODELS = ["falcon-7b", "falcon-mamba-7b", "falcon-40b"]
ROWS = [(m, b, p) for m in MODELS for b in ("onnx", "coreml") for p in ("fp32", "fp16")]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            config = make_config(name)
            config.num_hidden_layers = LAYERS
            made[name] = write_preset(name, tmp_path_factory.mktemp(name), config=config)
        return made[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model,backend,precision", ROWS)
def test_full_width_two_layers_pass_perch_check(model, backend, precision, reduced, tmp_path):
    options = perch.options_for(backend, precision=precision, max_context=128)
    perch.export(str(reduced(model)), tmp_path / "a", options)
    report = perch.check(tmp_path / "a", max_new_tokens=8, quiet=True)
    assert report.passed, report.summary()
