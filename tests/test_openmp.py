"""A worker's OpenMP helpers stop spinning soon after the compute ends, and a
spin the user chose is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rewardsignal.openmp import SPIN_COUNT, short_spin

# In a fresh process (libgomp reads its variables when torch loads it): run a
# parallel region on two threads, then idle 50 ms, five times; print the CPU
# the process used while idle (the helper's spin: the main thread sleeps).
_PROBE = """
import os, sys, time
from rewardsignal.openmp import short_spin
set_here = short_spin() if sys.argv[1] == "short" else False
import torch
torch.set_num_threads(2)
x = torch.ones(4_000_000)
idle = 0.0
for _ in range(5):
    x.add_(1.0)
    before = time.process_time()
    time.sleep(0.05)
    idle += time.process_time() - before
print(set_here, os.environ.get("GOMP_SPINCOUNT", "-"), idle * 1000)
"""


def _probe(mode: str, **env: str) -> tuple[bool, str, float]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120, env=base | env).stdout.split()
    return out[0] == "True", out[1], float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="libgomp's spin, two cores")
def test_helpers_stop_spinning_soon_after_the_last_parallel_region():
    set_here, spin, short_ms = _probe("short")
    _, default_spin, default_ms = _probe("default")
    assert set_here and spin == str(SPIN_COUNT) and default_spin == "-"
    # libgomp's default spins for milliseconds after each of the five regions
    # (7-8 ms each on the 2-core machine of bench/RESULTS.md): a core taken
    # from whatever the step waits on next.
    assert default_ms > 10
    assert short_ms < default_ms / 3


def test_a_spin_the_user_chose_is_kept(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "infinite")
    assert not short_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "infinite"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert not short_spin()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert short_spin()
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT)


# In a fresh process: the coordinator's threads (serial_by_default at start).
_TEAMS = """
import sys, threading
import torch
from rewardsignal.openmp import PARALLEL_FROM, serial_by_default, threads_for
torch.set_num_threads(2)
seen = {}
with threads_for(PARALLEL_FROM):  # before serial_by_default: leaves the team alone
    seen["untouched"] = torch.get_num_threads()
serial_by_default()
seen["main"] = torch.get_num_threads()

def job():
    torch.ones(100_000).add_(1.0)  # a thread's first torch work takes the default
    seen["new thread"] = torch.get_num_threads()
    with threads_for(PARALLEL_FROM - 1):
        seen["small job"] = torch.get_num_threads()
    with threads_for(PARALLEL_FROM):
        seen["big job"] = torch.get_num_threads()
        # another thread starting now may take the team; that is all it costs
    seen["after"] = torch.get_num_threads()

t = threading.Thread(target=job)
t.start()
t.join()
seen["main after"] = torch.get_num_threads()
print(" ".join(f"{k.replace(' ', '_')}={v}" for k, v in seen.items()))
"""


def test_small_tensor_jobs_run_on_one_thread_and_big_ones_get_the_team():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", _TEAMS], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout.split()
    seen = dict(item.split("=") for item in out)
    assert seen == {"untouched": "2", "main": "1", "new_thread": "1", "small_job": "1",
                    "big_job": "2", "after": "1", "main_after": "1"}
