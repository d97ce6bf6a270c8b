"""Shared fixtures: tiny presets materialised once per cache (PERCH_CACHE, default .cache/perch in the repo)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PERCH_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "perch"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")



@pytest.fixture(scope="session")
def load_preset():
    """name -> Checkpoint, loaded through the real loader from the preset's save_pretrained directory."""
    from perch.loading import load_checkpoint
    from perch.dev.presets import preset_dir

    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = load_checkpoint(preset_dir(name))
        return cache[name]

    return load


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """name -> (model, directory it was saved to with save_pretrained), for every tiny model in TINY."""
    from tests.tiny_models import TINY, make_model

    root, out = tmp_path_factory.mktemp("models"), {}
    for name in TINY:
        model = make_model(name)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out
