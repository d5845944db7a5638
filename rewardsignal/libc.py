"""glibc's malloc, tuned from Python: ``mallopt(3)`` and ``malloc_trim(3)``
through ctypes, for the coordinator's heap (``coordinator.heap``) and a worker's
(``worker.allocator``).

A user who tuned malloc themselves (any ``MALLOC_*`` variable, or
``GLIBC_TUNABLES``) keeps their settings: ``mallopt`` then changes nothing.
Linux with glibc only; elsewhere every call here says it did nothing.
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


@functools.cache
def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say)
        return None


def user_tuned() -> bool:
    """Whether this process's environment sets malloc's behaviour itself."""
    return "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)


def mallopt(settings: Iterable[tuple[int, int]]) -> bool:
    """Apply each (parameter, value); whether all of them were. Nothing when the
    user tuned malloc or there is no glibc. Settings that only hold before a
    second thread exists (``M_ARENA_MAX``) are the caller's to time."""
    fn = getattr(_glibc(), "mallopt", None)
    if fn is None or user_tuned():
        return False
    return all(fn(param, value) == 1 for param, value in settings)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``: free pages anywhere in the heaps go back to the
    system. None without it."""
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: int(trim(0))
