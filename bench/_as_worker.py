"""Imported first by a benchmark whose reference runs in its own process: that
process gets the allocator and OpenMP settings a worker process runs with
(before torch starts a thread and loads libgomp), so a ratio against the
reference compares the work done and not two configurations. The coordinator
a benchmark starts still runs as users run it: ``GOMP_SPINCOUNT`` is taken out
of the environment again once libgomp has read it."""

from __future__ import annotations

import os

from rewardsignal.openmp import short_spin
from rewardsignal.worker.allocator import keep_freed_memory

keep_freed_memory()
_spun = short_spin()

import torch  # noqa: E402,F401

if _spun:
    del os.environ["GOMP_SPINCOUNT"]
