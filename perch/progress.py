"""Progress for long work: a bar with an ETA on a terminal, plain log lines elsewhere (CI, pipes, files).

Exports and checks call `progress(total, label)` and `advance(n, what)` per layer, piece or tensor written.
On a TTY the bar redraws in place on stderr; otherwise a line is printed at most every `LOG_EVERY` seconds
(and at the end), so CI logs show that work goes on without a line per tensor. PERCH_PROGRESS=0 silences it,
=1 forces log lines even for short work.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

LOG_EVERY = 10.0  # seconds between plain log lines
QUIET_UNDER = 2.0  # work that finishes sooner prints nothing


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Counts `total` steps; draws a bar (TTY) or logs lines (not a TTY) on `stream`."""

    def __init__(self, total: int, label: str, unit: str = "step", stream=None, tty: bool | None = None):
        self.total, self.label, self.unit = max(1, int(total)), label, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        mode = os.environ.get("PERCH_PROGRESS", "")
        self.enabled, self.always = mode != "0", mode == "1"
        self.done, self.t0, self.last_log, self.what = 0, time.perf_counter(), 0.0, ""
        self.lines = 0  # log lines written (tests read it)

    def eta(self) -> float | None:
        elapsed = time.perf_counter() - self.t0
        return None if not self.done else elapsed / self.done * (self.total - self.done)

    def text(self) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = self.eta()
        pct = 100 * self.done / self.total
        rest = f"ETA {_fmt(eta)}" if eta is not None else "ETA ?"
        return f"{self.label}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%) {_fmt(elapsed)} elapsed, {rest}" + \
            (f" - {self.what}" if self.what else "")

    def advance(self, n: int = 1, what: str = "") -> None:
        self.done = min(self.total, self.done + n)
        self.what = what
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            width = 24
            fill = int(width * self.done / self.total)
            self.stream.write("\r" + "#" * fill + "-" * (width - fill) + " " + self.text()[:110] + "\x1b[K")
            self.stream.flush()
        elif (now - self.last_log >= LOG_EVERY and (self.always or now - self.t0 >= QUIET_UNDER)) or \
                (self.done == self.total and (self.always or self.lines)):
            self.last_log = now
            self.lines += 1
            print(self.text(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and time.perf_counter() - self.t0 >= 0:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def progress(total: int, label: str, unit: str = "step", stream=None, tty: bool | None = None):
    """`with progress(n, "ONNX int4", unit="tensor") as bar: ... bar.advance(1, name)`."""
    bar = Progress(total, label, unit, stream, tty)
    try:
        yield bar
    finally:
        bar.close()
