"""The worker's live status line: redrawn in place on a terminal, a periodic
log line otherwise (so it stays readable in journald or a CI log)."""

from __future__ import annotations

import sys
import time

_LOG_EVERY_S = 10.0


class StatusLine:
    def __init__(self, name: str, stream=None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.tasks_done = 0
        self.last_rate: float | None = None
        self._last_log = 0.0

    def update(self, state: str, **fields) -> None:
        parts = [f"[{self.name}]", state]
        parts += [f"{k}={v}" for k, v in fields.items() if v is not None]
        parts.append(f"done={self.tasks_done}")
        if self.last_rate:
            parts.append(f"{self.last_rate:,.0f} tok/s")
        text = " ".join(parts)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[:200])
            self.stream.flush()
        elif now - self._last_log > _LOG_EVERY_S:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_log = now

    def event(self, text: str) -> None:
        """A line that must not be overwritten (errors, joins, shutdown)."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"[{self.name}] {text}\n")
        self.stream.flush()
