"""The coordinator process's C heap: few malloc arenas, and freed memory handed
back to the system every second.

Submissions (a few MB of tensors each) are decoded and checked on a thread
pool. glibc gives each thread an arena of its own by default, and once a large
block has been freed it raises its mmap threshold, so later blocks of that size
come from the arenas' heaps too: freed, they stay resident. Under a swarm the
coordinator's RSS then follows the most it ever had in flight, not what it
holds. Measured with ``bench/coordinator_load.py`` (1,000 workers, 7 MB fp16
updates, 2 upload slots; ``bench/RESULTS.md``): the swarm added 32x the update
size to peak RSS with default arenas, 22x with two; with verification on (every
result held for its check) two arenas peaked at 3,470-3,570 MB, and a
``malloc_trim`` every second at 2,324 MB (each trim about 30 ms, on a thread).
Linux with glibc only: elsewhere nothing changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("signal.coordinator")

_M_ARENA_MAX = -8  # mallopt(3) parameter, from glibc's malloc.h


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (what ``MALLOC_ARENA_MAX`` does); call it before
    any worker thread exists. Whether it did."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, arenas))


def heap_trimmer() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``: free pages anywhere in the heaps go back to the
    system. None without it."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return None
    return lambda: int(trim(0))


async def trim_forever(interval_s: float = 1.0) -> None:
    """Trim the heap every ``interval_s`` on a thread (a trim of a few GB of heap
    takes tens of ms) until cancelled."""
    trim = heap_trimmer()
    if trim is None:
        log.debug("no malloc_trim in this C library: freed heap stays resident")
        return
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(trim)
