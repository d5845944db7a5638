"""The coordinator process's C heap: few malloc arenas, and freed memory handed
back to the system when RSS has grown.

Submissions (a few MB of tensors each) are decoded and checked on a thread
pool. glibc gives each thread an arena of its own by default, and once a large
block has been freed it raises its mmap threshold, so later blocks of that size
come from the arenas' heaps too: freed, they stay resident. Under a swarm the
coordinator's RSS then follows the most it ever had in flight, fragmented, not
what it holds. Measured with ``bench/coordinator_load.py`` (1,000 workers, 7 MB
fp16 updates, 2 upload slots; ``bench/RESULTS.md``): the swarm added 32x the
update size to peak RSS with default arenas, 22x with two. With verification on
(every new worker's results held for their checks), peak RSS and submissions/s
over two runs each: no trim 3,080-3,139 MB at 36.5-40.2/s; a trim whenever RSS
grew by 128 MB 2,320-2,383 MB at 28.9-31.9/s; by 512 MB (``GROWN_BYTES``)
2,489-2,549 MB at 33.9-36.9/s. A trim costs its pause (each arena's lock is
held while it runs, tens of ms) and the page faults of the memory touched again
after it. Linux with glibc only: elsewhere nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import os

from rewardsignal import libc

log = logging.getLogger("signal.coordinator")

# RSS grown since the last trim that makes the next one worth its pause.
GROWN_BYTES = 512 << 20


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (what ``MALLOC_ARENA_MAX`` does), unless the
    user set the arenas themselves; call it before any worker thread exists.
    Whether it did."""
    return libc.mallopt([(libc.M_ARENA_MAX, arenas)])


def resident_bytes() -> int | None:
    """This process's RSS (``/proc/self/statm``); None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def trim_forever(interval_s: float = 1.0, grown_bytes: int = GROWN_BYTES) -> None:
    """Every ``interval_s``, trim the heap (on a thread) if RSS grew by
    ``grown_bytes`` since the last trim, until cancelled. Only then: a trim
    holds each arena's lock while it walks the heap, so a thread allocating
    meanwhile (the event loop's included) waits, up to tens of ms."""
    trim = libc.malloc_trim()
    if trim is None or (floor := resident_bytes()) is None:
        log.debug("no malloc_trim or RSS in this process: freed heap stays resident")
        return
    while True:
        await asyncio.sleep(interval_s)
        rss = resident_bytes() or 0
        if rss - floor < grown_bytes:
            floor = min(floor, rss)
            continue
        try:
            await asyncio.to_thread(trim)
        except Exception:  # never expected; serving goes on untrimmed
            log.exception("heap trimming stopped")
            return
        floor = resident_bytes() or rss
