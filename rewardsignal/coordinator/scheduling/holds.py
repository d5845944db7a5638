"""Memory for results held for a check, as a budget that leases are granted
against.

A result held for a check (``coordinator.trust``) waits in memory, its
gradient included, until another worker's recomputation agrees with it. Every
result of a worker on probation is held, so a thousand new workers joining at
once would each leave an adapter-sized gradient waiting (the coordinator ran
out of memory at 15 GB under ``bench/coordinator_load.py``). The scheduler
therefore counts, against ``limit`` bytes, the results held and the leases
whose results will be held (``Scheduler.hold_cost`` says which), and grants
such a lease only while it fits. A worker that may not take one takes check
tasks meanwhile (they go first, ``FairQueue``), which is what frees the
budget. While nothing is held any one lease fits, however large, so a run
whose adapter is larger than the budget still moves, one held result at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class HoldBudget:
    def __init__(self, limit_bytes: int, wake: Callable[[], None] = lambda: None) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.peak = 0
        self._wake = wake  # room was given back: a parked lease may look again
        # A Hold may be dropped by a thread, or by the cyclic collector while this
        # thread holds the lock (an allocation in _add): reentrant.
        self._lock = threading.RLock()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= 0 or self.used == 0 or self.used + nbytes <= self.limit

    def take(self, nbytes: int) -> Hold | None:
        """A hold of ``nbytes`` (whether or not it fits: a result already in
        memory is counted as it is); None for nothing."""
        if nbytes <= 0:
            return None
        self._add(nbytes)
        return Hold(self, nbytes)

    def _add(self, nbytes: int, *, wake: bool = True) -> None:
        with self._lock:
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        if nbytes < 0 and wake:
            self._wake()


def release(hold: Hold | None) -> None:
    """Give back ``hold``'s bytes, if there is a hold."""
    if hold is not None:
        hold.release()


class Hold:
    """Bytes counted against a ``HoldBudget`` until released (at the latest when
    the hold is dropped)."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: HoldBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def resize(self, nbytes: int) -> Hold:
        """Count ``nbytes`` instead (what the result turned out to hold)."""
        self._budget._add(nbytes - self.nbytes)
        self.nbytes = nbytes
        return self

    def release(self, *, wake: bool = True) -> None:
        if self.nbytes:
            n, self.nbytes = self.nbytes, 0
            self._budget._add(-n, wake=wake)

    def __del__(self) -> None:
        # A path that dropped a held result without releasing it must not shrink
        # the budget for good. No wake: this may run in any thread.
        self.release(wake=False)
