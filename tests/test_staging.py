"""perch.staging on plain directories: refusals, atomic replace, the lock, and clean-up of killed runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perch.errors import PerchError
from perch.staging import build_once, check_destination, clean_stale, is_perch_artifact, locked, staged_dir


def fake_artifact(d: Path, tag: str) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"format": "onnx", "arch": "falcon", "perch_version": "0", "tag": tag}))
    return d


def test_a_perch_artifact_is_recognised_by_its_manifest(tmp_path):
    assert is_perch_artifact(fake_artifact(tmp_path / "a", "x"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text('{"name": "some other tool"}')
    assert not is_perch_artifact(tmp_path / "b") and not is_perch_artifact(tmp_path / "missing")


def test_replace_is_complete_and_leaves_nothing_beside(tmp_path):
    out = fake_artifact(tmp_path / "out", "old")
    (out / "old-only.bin").write_text("x")
    with staged_dir(out, overwrite=True) as tmp:
        fake_artifact(tmp / "inner", "unused")
        (tmp / "manifest.json").write_text((tmp / "inner" / "manifest.json").read_text().replace("unused", "new"))
        assert json.loads((out / "manifest.json").read_text())["tag"] == "old"  # untouched until the end
    assert json.loads((out / "manifest.json").read_text())["tag"] == "new" and not (out / "old-only.bin").exists()
    assert os.listdir(tmp_path) == ["out"]


def test_a_failure_inside_leaves_the_old_artifact_and_no_new_parents(tmp_path):
    out = fake_artifact(tmp_path / "out", "old")
    with pytest.raises(RuntimeError), staged_dir(out, overwrite=True) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("converter crashed")
    assert json.loads((out / "manifest.json").read_text())["tag"] == "old" and os.listdir(tmp_path) == ["out"]
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "new" / "deep" / "out"):
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["out"]  # the parents it created are gone again


class _SwallowsSignals:
    """Garbage that raises a signal in its own __del__, where Python prints the exception and drops it."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        signal.raise_signal(self.sig)


@pytest.fixture
def interactive_sigint():
    """SIGINT as an interactive shell leaves it (a script's background job starts with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost exception, on purpose
@pytest.mark.parametrize("sig,exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_lost_in_a_destructor_still_stops_the_commit(tmp_path, sig, exc, interactive_sigint):
    out = fake_artifact(tmp_path / "out", "old")
    with pytest.raises(exc), staged_dir(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text((out / "manifest.json").read_text().replace("old", "new"))
        _SwallowsSignals(sig)  # collected at once: the signal's exception is lost inside __del__
    assert json.loads((out / "manifest.json").read_text())["tag"] == "old" and os.listdir(tmp_path) == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are restored after


def test_an_ignored_sigint_stays_ignored_while_staging(tmp_path):
    """Under nohup or as a script's background job SIGINT is ignored: staging neither catches nor restores it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = tmp_path / "out"
        with staged_dir(out) as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"tag": "new"}))
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # ignored: the export goes on and commits
        assert json.loads((out / "manifest.json").read_text())["tag"] == "new"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("make,needle", [
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "not a Perch artifact"),
    (lambda p: p.write_text("a file"), "is a file"),
])
def test_overwrite_refuses_what_perch_did_not_write(tmp_path, make, needle):
    out = tmp_path / "out"
    make(out)
    before = sorted(os.walk(tmp_path))
    with pytest.raises(PerchError, match=needle):
        check_destination(out, overwrite=True)
    assert sorted(os.walk(tmp_path)) == before


def test_an_empty_directory_may_be_filled_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with staged_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_leftovers_of_a_killed_run_are_removed_and_a_moved_aside_artifact_restored(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.partial-999999-abc").mkdir()
    aside = tmp_path / ".out.old-999999-def"
    fake_artifact(aside, "old")  # killed between "move old aside" and "move new in"
    with locked(out):
        clean_stale(out)
    assert json.loads((out / "manifest.json").read_text())["tag"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_the_lock_refuses_a_second_writer_and_is_removed_after(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from perch.staging import locked
        with locked({str(out)!r}):
            print("held", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PerchError, match=rf"another perch process is writing .*pid {holder.pid}"):
            with staged_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(out):  # a dead holder's lock file is no obstacle
        pass
    assert os.listdir(tmp_path) == []


def test_a_cache_entry_is_built_once(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(1)
        (tmp / "done").write_text("x")

    for _ in range(2):
        assert build_once(tmp_path / "entry", build, lambda d: (d / "done").is_file()) == tmp_path / "entry"
    assert calls == [1] and os.listdir(tmp_path) == ["entry"]
