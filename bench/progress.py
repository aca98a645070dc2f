"""The live progress line on stderr, so a minute-long load never looks hung.

On a terminal the line is redrawn in place (``\\r``) a few times a second; when stderr is
a file or a pipe (CI, ``2>log``) a plain line is written every ``PLAIN_EVERY_S`` instead.
"""

from __future__ import annotations

import sys
import time
from collections import deque

PLAIN_EVERY_S = 5.0
RATE_WINDOW_S = 1.0  # the rate shown is over about the last second (records arrive in 0.2 s flushes)
QUIET = False  # tests and nested runs can silence it


class Progress:
    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last_plain = 0.0
        self._recent: deque[tuple[float, int]] = deque([(self.start, 0)])
        self._width = 0

    def show(self, published: int, target: int, done: int, note: str = "") -> None:
        now = time.monotonic()
        self._recent.append((now, done))
        while len(self._recent) > 2 and now - self._recent[1][0] >= RATE_WINDOW_S:
            self._recent.popleft()
        t0, d0 = self._recent[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        line = (f"[{self.label}] published {published:,}/{target:,}  reconciled {done:,}  "
                f"{rate / 1000:5.1f}k ev/s  {now - self.start:5.1f}s {note}").rstrip()
        if QUIET:
            return
        if self._tty:
            sys.stderr.write("\r" + line.ljust(self._width))
            self._width = len(line)
            sys.stderr.flush()
        elif now - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = now
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def end(self, text: str = "") -> None:
        if QUIET:
            return
        if self._tty:
            sys.stderr.write("\r" + " " * self._width + "\r")
        if text:
            sys.stderr.write(f"[{self.label}] {text}\n")
        sys.stderr.flush()
