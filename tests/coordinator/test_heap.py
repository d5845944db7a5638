"""The coordinator's heap: large blocks freed on a decoding thread stay resident
until trimmed, and the trim the server runs once RSS has grown gives them back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from rewardsignal.coordinator import heap

# In a fresh process (the arena limit holds only before any thread starts): on a
# second thread, free one 16 MiB block (glibc then serves blocks of that size
# from the heap instead of mmap), allocate and touch eight more, pin the heap's
# top with a small block, free the eight, and print how many MiB RSS fell
# by the end (trimmed or not) and how many the frees alone gave back.
_PROBE = """
import ctypes, sys, threading
from rewardsignal.coordinator.heap import limit_malloc_arenas
from rewardsignal.libc import malloc_trim
limit_malloc_arenas()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

out = {}
def work():
    libc.free(libc.malloc(16 * MB))
    blocks = [libc.malloc(16 * MB) for _ in range(8)]
    for b in blocks:
        ctypes.memset(b, 1, 16 * MB)
    libc.malloc(1024)
    out["before"] = rss()
    for b in blocks:
        libc.free(b)
    out["freed"] = rss()
    if sys.argv[1] == "trim":
        malloc_trim()()
    out["after"] = rss()

t = threading.Thread(target=work)
t.start()
t.join()
print((out["before"] - out["after"]) // MB, (out["before"] - out["freed"]) // MB)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_a_trim_gives_back_what_frees_left_resident():
    kept, freed = _probe("none")
    trimmed, _ = _probe("trim")
    assert abs(kept - freed) <= 1 and freed < 64  # without a trim most stays resident
    assert trimmed >= 112


def _run_trims(monkeypatch, rss_step: int, ticks: int = 6) -> int:
    """How many trims ``trim_forever`` makes over ``ticks`` intervals while RSS
    moves by ``rss_step`` per look; checks the loop ends when cancelled."""
    calls, rss = [], iter(range(1 << 30, 1 << 40, rss_step) if rss_step else [1 << 30] * 999)
    monkeypatch.setattr(heap.libc, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(rss))

    async def main() -> None:
        task = asyncio.create_task(heap.trim_forever(0.02))
        await asyncio.sleep(0.02 * ticks + 0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        seen = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) == seen  # nothing after the cancel

    asyncio.run(main())
    return len(calls)


def test_the_heap_is_trimmed_only_when_rss_grew(monkeypatch):
    # Each look sees RSS a whole threshold higher: a trim at (nearly) every tick.
    assert 2 <= _run_trims(monkeypatch, heap.GROWN_BYTES) <= 6
    # Growing by less than the threshold between trims: every other tick.
    assert 1 <= _run_trims(monkeypatch, heap.GROWN_BYTES // 2 + 1) <= 3
    assert _run_trims(monkeypatch, 0) == 0  # steady RSS: never


def test_without_malloc_trim_nothing_runs(monkeypatch):
    monkeypatch.setattr(heap.libc, "malloc_trim", lambda: None)
    asyncio.run(asyncio.wait_for(heap.trim_forever(0.01), 5))  # returns at once


def test_the_users_own_arena_setting_is_left_alone():
    """The coordinator caps malloc's arenas unless the user set the arenas
    themselves (a variable or a tunable); other malloc settings do not count."""
    probe = "from rewardsignal.coordinator.heap import limit_malloc_arenas as f; print(f())"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs = [subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                           capture_output=True, text=True, check=True).stdout.strip()
            for extra in ({}, {"MALLOC_ARENA_MAX": "8"},
                          {"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.arena_max=3"},
                          {"MALLOC_CHECK_": "0", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})]
    assert runs == ["True", "False", "False", "True"]
