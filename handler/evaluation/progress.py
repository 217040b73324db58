"""Progress on long evaluation runs, on stderr: a live line on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Counts work done towards a total and shows rate and time left; silent when ``enabled`` is false."""

    def __init__(self, label: str, total: int, *, stream: Optional[TextIO] = None, enabled: bool = True,
                 every_s: float = 5.0):
        self.label = label
        self.total = max(int(total), 0)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.every_s = every_s
        self.started = time.perf_counter()
        self._last = 0.0
        self._live = enabled and getattr(self.stream, "isatty", lambda: False)()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._live or now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        text = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, {elapsed:.0f}s elapsed, ~{left:.0f}s left)"
        if self._live:
            end = "\n" if self.done >= self.total else ""
            self.stream.write("\r\033[K" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done < self.total:
            self._show(time.perf_counter())
            if self._live:
                self.stream.write("\n")
