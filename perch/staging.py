"""Write a directory safely: every directory Perch creates (artifacts, presets, fixtures) goes through here.

`staged_dir(out)` is a context manager that yields a fresh temporary directory beside `out`
(`.NAME.partial-PID-XXXX`) and moves it into place only when the block completes. Around that it:
- refuses, before any slow work, a destination it must not touch: an existing path without `overwrite`,
  and with `overwrite` anything that is not a directory Perch wrote (a non-empty directory without a Perch
  manifest, a file, a symlink, the home directory, the working directory or one of its parents);
- locks the destination (`.NAME.lock` beside it, `fcntl.flock`), so a second writer to the same `out` fails
  at once with a clear message (or, with `wait=True`, as caches want, waits for the first and reuses it);
- replaces an old artifact by moving it aside, moving the new one in, then deleting the old one, so at
  every instant `out` is either the old complete artifact or the new one;
- removes its own leftovers (partials and moved-aside artifacts of a killed run) on the next run;
- turns SIGTERM into an ordinary exit, so `timeout`, a cancelled CI job or `kill` cleans up like Ctrl-C.
A SIGKILL cannot be caught; the next run to the same destination removes what it left.

Core level: imports only perch.errors and the standard library.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from perch.errors import PerchError

MANIFEST = "manifest.json"  # perch.spec.MANIFEST_NAME; repeated here so this module stays import-light


def is_perch_artifact(path: Path) -> bool:
    """True for a directory holding a manifest.json that `perch export` wrote (format, arch, perch_version)."""
    try:
        d = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and {"format", "arch", "perch_version"} <= d.keys()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_destination(out: str | os.PathLike, overwrite: bool = False, *, owned: Callable[[Path], bool] = is_perch_artifact,
                      what: str = "a Perch artifact", flag: str = "--out") -> None:
    """Refuse a destination Perch must not write, before anything slow or anything on disk happens."""
    out = Path(out).expanduser()
    _refuse_special(out, flag)
    if out.is_symlink():
        raise PerchError(f"{flag} {out} is a symbolic link; Perch does not write through links: choose a plain path")
    if out.exists():
        if not overwrite:
            raise PerchError(f"output directory {out} already exists; choose a new {flag}, or pass --overwrite "
                             f"to replace it if it is {what}")
        if not out.is_dir():
            raise PerchError(f"{flag} {out} is a file, not {what}; Perch will not replace it: choose another {flag}")
        if not owned(out) and not _is_empty_dir(out):
            raise PerchError(f"{flag} {out} is not {what} (no manifest.json written by perch), so --overwrite "
                             f"will not delete it; choose another {flag}, or remove it yourself if you mean to")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise PerchError(f"{flag} {out}: {parent} is not a directory; choose a {flag} inside a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PerchError(f"{flag} {out}: cannot write in {parent} (permission denied); choose a writable {flag}")


def _refuse_special(out: Path, flag: str) -> None:
    # Directories whose loss would be a disaster, whatever they contain: never a destination.
    real = Path(os.path.realpath(out))
    home, cwd = Path(os.path.realpath(Path.home())), Path(os.path.realpath(Path.cwd()))
    if real == home or real == Path(real.anchor) or real == cwd or real in cwd.parents:
        raise PerchError(f"{flag} {out} is {real}, the home, root or current directory (or one of its parents); "
                         f"Perch writes an artifact into a new directory: choose e.g. {flag} {out / 'artifact'}")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failure can remove them."""
    created, p = [], Path(os.path.abspath(parent))
    while not p.exists():
        created.append(p)
        p = p.parent
    for d in reversed(created):
        d.mkdir(exist_ok=True)
    return created


def _remove_created(created: list[Path]) -> None:
    for d in created:  # deepest first; only if still empty (never anything another process put there)
        try:
            d.rmdir()
        except OSError:
            break


# ---------------------------------------------------------------- the lock
@contextmanager
def locked(out: str | os.PathLike, *, wait: bool = False, flag: str = "--out") -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` (the parent must exist). Removed on release, so nothing is left."""
    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = _writable(lambda: os.open(lock, os.O_RDWR | os.O_CREAT, 0o644), out, flag)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise PerchError(f"another perch process is writing {out} ({_owner(lock)}); wait for it to "
                                 f"finish or choose another {flag}") from None
            raise
        # The previous holder may have unlinked the file between our open and our flock: retry on a fresh one.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock)  # while still holding it: a waiter re-checks the inode and retries
        except FileNotFoundError:
            pass
        os.close(fd)


def _owner(lock: Path) -> str:
    try:
        return f"pid {int(lock.read_text().split()[0])}"
    except (OSError, ValueError, IndexError):
        return "pid unknown"


# ---------------------------------------------------------------- leftovers of killed runs
def _leftovers(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"))


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed run to `out` left. Call only while holding `locked(out)`: every writer holds
    that lock, so no live process owns a partial of `out` now.

    A moved-aside old artifact with no `out` (killed between the two moves) is moved back, not deleted.
    """
    out, removed = Path(out), []
    olds = _leftovers(out, "old")
    if olds and not out.exists():
        os.rename(olds.pop(), out)
    for p in _leftovers(out, "partial") + olds:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------- signals
class _Terminated(SystemExit):
    """SIGTERM as an exception, so `finally` and `except BaseException` clean-ups run."""


_received: list[int] = []  # signals seen while staging, kept in case the exception was swallowed


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While active, SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt, and both are remembered.

    Remembered because Python raises a signal's exception in whatever runs at that instant: in a `__del__`
    (seen: regex's, during garbage collection) it is printed and dropped, and the export would go on and
    commit after a Ctrl-C. `raise_if_interrupted()` before the commit turns such a lost signal back into
    the exit the user asked for.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        _received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(128 + signum)

    seen_before = len(_received)  # nested blocks (a cache entry built while staging) keep the outer's record
    # A signal found ignored stays ignored: nohup, and a script's background jobs, which the shell starts with
    # SIGINT ignored so that a Ctrl-C meant for the foreground does not stop them.
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        del _received[seen_before:]


def raise_if_interrupted() -> None:
    """Re-raise a SIGINT or SIGTERM that arrived while staging but whose exception was lost."""
    if signal.SIGINT in _received:
        raise KeyboardInterrupt
    if _received:
        raise _Terminated(128 + _received[0])


# ---------------------------------------------------------------- all together
def _partial(out: Path) -> Path:
    """A fresh `.NAME.partial-PID-XXXX` beside `out`, with the permissions a plain mkdir would give."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact is meant to be shared like any dir
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is moved aside first and deleted only after the move."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _is_empty_dir(out):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, old / "x")  # the aside name is unique; `old` itself is what a clean-up removes
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "x", out)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out: str | os.PathLike, *, overwrite: bool = False, owned: Callable[[Path], bool] = is_perch_artifact,
               what: str = "a Perch artifact", wait: bool = False, flag: str = "--out") -> Iterator[Path]:
    """A temporary directory beside `out` that becomes `out` only when the block completes (see module doc).

    On any exception, SIGINT or SIGTERM the temporary directory, the lock and any parent directories this
    call created are removed, and `out` is left exactly as it was.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    check_destination(out, overwrite, owned=owned, what=what, flag=flag)
    with terminate_as_exit():
        created = _writable(lambda: _make_parents(out.parent), out, flag)
        try:
            with locked(out, wait=wait, flag=flag):
                clean_stale(out)
                check_destination(out, overwrite, owned=owned, what=what, flag=flag)  # again, under the lock
                tmp = _writable(lambda: _partial(out), out, flag)
                try:
                    yield tmp
                    raise_if_interrupted()
                    _commit(tmp, out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful commit
        except BaseException:
            _remove_created(created)
            raise


def _writable(make: Callable, out: Path, flag: str):
    """Run a directory-creating step; an OSError (read-only file system, permissions) becomes a PerchError."""
    try:
        return make()
    except OSError as e:
        raise PerchError(f"cannot write {flag} {out}: {e.strerror or e} ({e.filename or out}); choose a "
                         f"writable {flag}") from None


def build_once(final: str | os.PathLike, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """A cache entry (preset, fixture): built by `build(tmp)` once, under a waiting lock, then reused.

    Concurrent callers wait for the first and reuse its result; an incomplete entry (no `complete`) is
    Perch's own cache, so it is replaced.
    """
    final = Path(os.path.abspath(final))
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with terminate_as_exit(), locked(final, wait=True, flag="cache entry"):
        if complete(final):  # another process finished while we waited
            return final
        clean_stale(final)
        tmp = _partial(final)
        try:
            build(tmp)
            raise_if_interrupted()
            _commit(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
