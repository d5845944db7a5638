"""glibc's malloc, tuned from Python: ``mallopt(3)`` and ``malloc_trim(3)``
through ctypes, for the coordinator's heap (``coordinator.heap``) and a worker's
(``worker.allocator``).

A setting the user made themselves is kept: ``mallopt`` leaves alone each
parameter set by its ``MALLOC_*`` variable (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) or its
``GLIBC_TUNABLES`` entry (``glibc.malloc.arena_max`` ...), and applies the
others (``MALLOC_CHECK_``, jemalloc's ``MALLOC_CONF`` or an unrelated tunable
change nothing here). Linux with glibc only; elsewhere every call here says it
did nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# How a user sets each parameter: environment variable, GLIBC_TUNABLES name.
_USER_NAMES = {M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
               M_TOP_PAD: ("MALLOC_TOP_PAD_", "glibc.malloc.top_pad"),
               M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
               M_ARENA_MAX: ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max")}


@functools.cache
def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say)
        return None


def user_set(param: int) -> bool:
    """Whether this process's environment sets mallopt parameter ``param``."""
    variable, tunable = _USER_NAMES[param]
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    return variable in os.environ or any(t.split("=", 1)[0] == tunable for t in tunables)


def mallopt(settings: Iterable[tuple[int, int]]) -> bool:
    """Apply each (parameter, value) the user did not set themselves; whether
    there were some and all of them were applied. Nothing without glibc.
    Settings that only hold before a second thread exists (``M_ARENA_MAX``) are
    the caller's to time."""
    fn = getattr(_glibc(), "mallopt", None)
    ours = [(param, value) for param, value in settings if not user_set(param)]
    if fn is None or not ours:
        return False
    return all(fn(param, value) == 1 for param, value in ours)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``: free pages anywhere in the heaps go back to the
    system. None without it."""
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: int(trim(0))
