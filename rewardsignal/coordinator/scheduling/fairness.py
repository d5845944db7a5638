"""Sharing the fleet between runs and their owners.

Pending tasks wait in one FIFO queue per run, a run's check tasks (a second
worker recomputing a result held for a check) ahead of its other tasks: a
check frees the memory its result holds (``holds``) and lets the request it
belongs to finish. When a worker asks for work, the
runs are tried in order of the service they received lately: first by owner
(tokens handed to all of that owner's runs), then by run, each a decayed sum
(half-life ``half_life_s``) so that history fades. A small run or an interactive
call therefore goes ahead of a swarm's backlog instead of queueing behind it,
and two owners get equal shares whatever number of runs each has. The same
order ranks uploads waiting for a slot (``UploadSlots``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator

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
        # run id -> (check tasks, other tasks): pending task ids, each FIFO
        self._queues: dict[str, tuple[deque[str], deque[str]]] = {}
        self._owner: dict[str, str] = {}           # run id -> owner (its group)
        self._by_run = _Decayed(half_life_s)
        self._by_owner = _Decayed(half_life_s)

    def __len__(self) -> int:
        return sum(len(c) + len(q) for c, q in self._queues.values())

    def __iter__(self) -> Iterator[str]:
        for run_id in self._queues:
            yield from self.queue(run_id)

    def append(self, t: Task, *, front: bool = False) -> None:
        checks, rest = self._queues.setdefault(t.run_id, (deque(), deque()))
        self._owner[t.run_id] = t.group
        q = checks if t.keep else rest
        if front:
            q.appendleft(t.task_id)
        else:
            q.append(t.task_id)

    def remove(self, t: Task) -> None:
        queues = self._queues.get(t.run_id)
        if queues is None:
            return
        try:
            queues[0 if t.keep else 1].remove(t.task_id)
        except ValueError:
            return
        if not queues[0] and not queues[1]:
            del self._queues[t.run_id]

    def queue(self, run_id: str) -> Iterable[str]:
        """The run's pending task ids in the order they are handed out."""
        checks, rest = self._queues.get(run_id, ((), ()))
        return itertools.chain(checks, rest)

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
