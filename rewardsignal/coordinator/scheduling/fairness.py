"""Sharing the fleet between runs and their owners.

Pending tasks wait in one FIFO queue per run. When a worker asks for work, the
runs are tried in order of the service they received lately: first by owner
(tokens handed to all of that owner's runs), then by run, each a decayed sum
(half-life ``half_life_s``) so that history fades. A small run or an interactive
call therefore goes ahead of a swarm's backlog instead of queueing behind it,
and two owners get equal shares whatever number of runs each has. The same
order ranks uploads waiting for a slot (``UploadSlots``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator

from rewardsignal.coordinator.scheduling.tasks import Task


class _Decayed:
    """Per-key sums that halve every ``half_life_s``."""

    def __init__(self, half_life_s: float) -> None:
        self._rate = math.log(2) / half_life_s
        self._value: dict[str, tuple[float, float]] = {}  # key -> (value, as of)

    def get(self, key: str, now: float) -> float:
        value, stamp = self._value.get(key, (0.0, now))
        return value * math.exp(-self._rate * (now - stamp))

    def add(self, key: str, amount: float, now: float) -> None:
        self._value[key] = (self.get(key, now) + amount, now)

    def forget(self, key: str) -> None:
        self._value.pop(key, None)


class FairQueue:
    def __init__(self, half_life_s: float = 10.0) -> None:
        self._queues: dict[str, deque[str]] = {}   # run id -> pending task ids, FIFO
        self._owner: dict[str, str] = {}           # run id -> owner (its group)
        self._by_run = _Decayed(half_life_s)
        self._by_owner = _Decayed(half_life_s)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[str]:
        for q in self._queues.values():
            yield from q

    def append(self, t: Task, *, front: bool = False) -> None:
        q = self._queues.setdefault(t.run_id, deque())
        self._owner[t.run_id] = t.group
        if front:
            q.appendleft(t.task_id)
        else:
            q.append(t.task_id)

    def remove(self, t: Task) -> None:
        q = self._queues.get(t.run_id)
        if q is None:
            return
        try:
            q.remove(t.task_id)
        except ValueError:
            return
        if not q:
            del self._queues[t.run_id]

    def queue(self, run_id: str) -> deque[str]:
        return self._queues.get(run_id, deque())

    def rank(self, run_id: str, owner: str, now: float | None = None) -> tuple[float, float]:
        """Lower goes first: (owner's recent service, run's recent service)."""
        now = time.monotonic() if now is None else now
        return self._by_owner.get(owner, now), self._by_run.get(run_id, now)

    def order(self) -> list[str]:
        """Runs with pending tasks, the least served first."""
        now = time.monotonic()
        return sorted(self._queues, key=lambda r: self.rank(r, self._owner[r], now))

    def charge(self, t: Task) -> None:
        """``t`` was handed to a worker: its tokens count as service."""
        now = time.monotonic()
        self._by_run.add(t.run_id, t.tokens, now)
        self._by_owner.add(t.group, t.tokens, now)
