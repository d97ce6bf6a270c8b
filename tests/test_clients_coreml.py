"""swift-transformers runs `perch export --to coreml --for swift-transformers` packages unchanged.

swift-transformers needs Core ML (Apple platforms only), so tests/clients/swift_feed.py replays its
`LanguageModel` feed call by call (pinned commit, Swift lines cited there) through Perch's Core ML executor.
Falcon: 7B-style multi-query (trained fixture) and 40B-style grouped (preset); Falcon-Mamba: trained fixture,
through swift-transformers' stateful path (prompt once, then one token per call).
"""
from __future__ import annotations

import numpy as np
import pytest

from perch.dev.fixtures import fixture_dir
from perch.dev.presets import preset_dir
from perch.exporter.export import export
from perch.exporter.options import CoreMLOptions
from perch.spec import Manifest
from perch.validate.tolerances import precision_of, tolerance_for_precision
from tests.clients import harness

NEW_TOKENS = 16
PROMPTS = ([472, 499, 442], [413, 391, 88, 9, 199])
MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("clients-coreml"), {}
    sources = {"falcon": lambda: fixture_dir("falcon"), "falcon40b": lambda: preset_dir("falcon40b-tiny"),
               "falcon_mamba": lambda: fixture_dir("falcon_mamba")}

    def get(model: str, profile: str = "swift-transformers"):
        key = (model, profile)
        if key not in made:
            out = root / f"{model}-{profile}"
            export(sources[model](), out, CoreMLOptions(max_context=MAX_CONTEXT, profile=profile))
            made[key] = (out, sources[model]())
        return made[key]

    return get


def limits(artifact):
    return tolerance_for_precision(precision_of(Manifest.load(artifact)))


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    n = min(len(ref), len(got))
    return float((np.linalg.norm(got[:n] - ref[:n], axis=-1) / np.linalg.norm(ref[:n], axis=-1)).max())


@pytest.mark.parametrize("model", ["falcon", "falcon40b", "falcon_mamba"])
def test_swift_transformers_feed_gives_transformers_tokens(model, package):
    artifact, source = package(model)
    eos = Manifest.load(artifact).hf_config.get("eos_token_id")
    for ids in PROMPTS:
        ref_tokens, ref_logits = harness.reference(source, ids, NEW_TOKENS)
        tokens, scores, lm = harness.swift(artifact / "model.mlpackage", ids, NEW_TOKENS, eos_token_id=eos)
        assert lm.stateful, "swift-transformers would take its stateless path (no keyCache/valueCache states)"
        assert len(tokens) == NEW_TOKENS and tokens == ref_tokens
        assert rel_l2(ref_logits, scores) <= limits(artifact).rel_l2
        # Its feed: the whole prompt once, then one token per call (and Falcon's mask, zeros, tokens + 1 long).
        assert [c["inputIds"] for c in lm.calls[:2]] == [(1, len(ids)), (1, 1)]
        if model != "falcon_mamba":
            assert [c["causalMask"] for c in lm.calls[:2]] == [(1, 1, 1, len(ids) + 1), (1, 1, 1, len(ids) + 2)]
        # Our own runtime drives the same package (perch check / perch generate use it).
        assert harness.perch_tokens(artifact, ids, NEW_TOKENS) == ref_tokens


def test_default_package_is_wrong_under_swift_feed(package):
    """Why the profile exists: the default package reads the mask's length as the key count, and values as
    the causal mask, so swift-transformers' zeros make the prompt non-causal and shift every position."""
    artifact, source = package("falcon40b", "default")
    ids = PROMPTS[1]
    _, ref_logits = harness.reference(source, ids, NEW_TOKENS)
    _, scores, _ = harness.swift(artifact / "model.mlpackage", ids, NEW_TOKENS)
    assert rel_l2(ref_logits, scores) > 10 * limits(artifact).rel_l2
    assert Manifest.load(artifact).extras["clients"] == {"swift-transformers": "export with --for swift-transformers"}


def test_swift_profile_manifest_and_metadata(package):
    """State names swift-transformers detects, what each holds, and the metadata it reads."""
    from perch.runtimes.mil.program import MilProgram

    for model, kinds in (("falcon", ("key", "value")), ("falcon_mamba", ("conv", "ssm"))):
        artifact, source = package(model)
        m = Manifest.load(artifact)
        assert m.profile == "swift-transformers"
        assert m.names("state") == dict(zip(kinds, ("keyCache", "valueCache")))
        assert all(s.holds for s in m.io.states)
        assert m.io.mask == ("additive_plus_one" if model == "falcon" else "none")
        meta = dict(MilProgram.load(artifact / "model.mlpackage").spec.description.metadata.userDefined)
        assert meta["co.huggingface.exporters.name"] == source.name
        assert meta["co.huggingface.exporters.task"] == "text-generation"
        assert meta["co.huggingface.exporters.architecture"] == m.hf_config["architectures"][0]
