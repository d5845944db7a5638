"""A small progress bar: redrawn in place on a terminal, a line every ~10% otherwise."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, desc: str = "", stream=None, width: int = 28) -> None:
        self.total = max(total, 1)
        self.desc = desc
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n = 0
        self.started = time.monotonic()
        self._last_decile = -1

    def update(self, n: int = 1, **postfix) -> None:
        self.n = min(self.n + n, self.total)
        frac = self.n / self.total
        filled = int(frac * self.width)
        elapsed = time.monotonic() - self.started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in postfix.items())
        line = (f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.n}/{self.total} {extra} ({elapsed:.0f}s, eta {eta:.0f}s)")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if self.n == self.total:
                self.stream.write("\n")
        elif int(frac * 10) != self._last_decile or self.n == self.total:
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()
