"""Where a step's time goes across processes: named timestamps, off by default.

With ``SIGNAL_TRACE=DIR`` in its environment, a process (the SDK's, the
coordinator, a worker) writes one line per ``mark`` to ``DIR/<pid>.trace``:
CLOCK_MONOTONIC nanoseconds (one clock for every process on a machine), the
thread's CPU nanoseconds, the thread and the mark's name. ``read`` gives them
back merged and in time order; ``bench/step_overhead.py --timeline`` prints a
step as the median time of each mark after the step's start.

Off, a mark costs a call that returns at once (and building its name, where
that is an f-string: a fraction of a microsecond). On, it is a buffered write
(about a microsecond); the file is flushed when the process exits normally
(the coordinator and the worker do on SIGTERM and Ctrl-C) or on ``flush()``.
A mark never raises: marks sit on paths that must not fail for a diagnostic
(between a commit and what follows it), so a folder that cannot be written
turns tracing off in that process, with one line on stderr.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "SIGNAL_TRACE"

_dir = os.environ.get(ENV) or None
_lock = threading.Lock()
_file = None


def enabled() -> bool:
    return _dir is not None


def start(folder: str | Path) -> None:
    """Trace into ``folder`` from now on, here and in processes started from here
    (they inherit ``SIGNAL_TRACE``)."""
    global _dir
    _dir = str(folder)
    os.environ[ENV] = _dir


def mark(name: str) -> None:
    """Record that ``name`` happened now, in this thread."""
    if _dir is None:
        return
    line = (f"{time.monotonic_ns()} {time.thread_time_ns()} {threading.get_ident()} "
            f"{name}\n")
    global _file
    with _lock:
        if _dir is None:  # another thread gave up meanwhile
            return
        try:
            if _file is None:
                os.makedirs(_dir, exist_ok=True)
                _file = open(Path(_dir) / f"{os.getpid()}.trace", "a", buffering=1 << 20)  # noqa: SIM115
                atexit.register(flush)
            _file.write(line)
        except Exception as exc:  # never the caller's problem
            _give_up(exc)


def flush() -> None:
    with _lock:
        try:
            if _file is not None:
                _file.flush()
        except Exception as exc:
            _give_up(exc)


def _give_up(exc: Exception) -> None:
    """Tracing off in this process (the lock held)."""
    global _dir, _file
    try:
        print(f"signal: tracing to {_dir} stopped: {exc}", file=sys.stderr, flush=True)
    except Exception:  # no stderr to say it on
        pass
    if _file is not None:
        try:
            _file.close()
        except Exception:  # what it could not write is lost with it
            pass
    _dir, _file = None, None


@dataclass(frozen=True)
class Mark:
    t_ns: int       # CLOCK_MONOTONIC
    cpu_ns: int     # the thread's CPU time so far
    pid: int
    thread: int
    name: str


def read(folder: str | Path) -> list[Mark]:
    """Every mark written under ``folder``, in time order. A line that is not a
    mark (a file cut short by a kill) is skipped."""
    marks = []
    for path in Path(folder).glob("*.trace"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
                marks.append(Mark(int(parts[0]), int(parts[1]), pid, int(parts[2]), parts[3]))
    marks.sort(key=lambda m: m.t_ns)
    return marks
