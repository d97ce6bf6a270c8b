"""Every path a manifest names must stay inside its artifact directory.

A manifest is data from wherever the artifact came from: a `model_file` of `../../etc/passwd`, an absolute
path or a symlink pointing out of the directory would make a runtime (or `perch check`) read, hash or
load a file the artifact does not own. Paths are resolved (symlinks followed) and must land inside.
"""
from __future__ import annotations

import os
from pathlib import Path

from perch.errors import PerchError


def confined(directory: str | os.PathLike, name: object, field: str) -> Path:
    """`directory / name`, resolved, or PerchError if `name` is not a relative path that stays inside."""
    root = Path(os.path.realpath(directory))
    if not isinstance(name, str) or not name or "\x00" in name:
        raise PerchError(f"{root}/manifest.json: {field} is {name!r}, not a file name; re-export the model")
    target = Path(os.path.realpath(root / name))
    if Path(name).is_absolute() or (target != root and root not in target.parents):
        raise PerchError(f"{root}/manifest.json: {field} {name!r} points outside the artifact directory; "
                         "an artifact only names its own files: re-export it, and do not trust this copy")
    return target


def check_manifest_paths(directory: str | os.PathLike, d: dict) -> None:
    """Check model_file, tokenizer_files and extras.files of a raw manifest dict."""
    if d.get("model_file"):
        confined(directory, d["model_file"], "model_file")
    for field in ("tokenizer_files",):
        for name in d.get(field) or []:
            confined(directory, name, field)
    extras = d.get("extras") or {}
    for name in (extras.get("files") or []) if isinstance(extras, dict) else []:
        confined(directory, name, "extras.files")
