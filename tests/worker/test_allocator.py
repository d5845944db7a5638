"""A worker's allocator keeps freed memory: a large buffer freed and allocated
again on a compute thread is not page-faulted back in from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rewardsignal.worker.allocator import SETTINGS, keep_freed_memory

# In a fresh process (the arena limit holds only before any thread starts):
# malloc, touch and free a 64 MiB buffer on a second thread, five times, and
# print the page faults of the last four.
_PROBE = """
import ctypes, resource, sys, threading
from rewardsignal.worker.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def steps():
    for i in range(5):
        if i == 1:
            global before
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(64 << 20)
        ctypes.memset(p, 1, 64 << 20)
        libc.free(p)

t = threading.Thread(target=steps)
t.start()
t.join()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode: str, env: dict | None = None) -> tuple[bool, int]:
    env = {k: v for k, v in (env or os.environ).items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"} | (env or {})
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_buffers_are_reused_without_page_faults():
    applied, kept_faults = _probe("keep")
    _, default_faults = _probe("default")
    pages = 4 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # four buffers of 64 MiB
    assert applied
    assert default_faults > pages // 2  # glibc's default gives the pages back each time
    assert kept_faults < pages // 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_the_users_own_allocator_settings_are_left_alone(monkeypatch):
    """Each parameter the user set keeps their value; the others are applied."""
    from rewardsignal import libc

    calls = []
    monkeypatch.setattr(libc, "_glibc", lambda: type(
        "Glibc", (), {"mallopt": staticmethod(lambda p, v: calls.append(p) or 1)})())
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    settings = dict(SETTINGS)
    for env, left in (({}, set()),
                      ({"MALLOC_ARENA_MAX": "4"}, {libc.M_ARENA_MAX}),
                      ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=1:glibc.malloc.top_pad=0"},
                       {libc.M_MMAP_MAX, libc.M_TOP_PAD}),
                      ({"MALLOC_CHECK_": "3", "MALLOC_CONF": "x"}, set())):
        calls.clear()
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert keep_freed_memory()
        assert set(calls) == set(settings) - left, env
    # Every one set by the user: nothing to apply.
    monkeypatch.setenv("GLIBC_TUNABLES", ":".join(
        f"glibc.malloc.{n}=1" for n in ("arena_max", "mmap_max", "trim_threshold", "top_pad")))
    assert not keep_freed_memory()
