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
from collections import Counter, deque
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


class _RunQueue:
    """One run's pending task ids: its checks, then the rest, each FIFO, and how
    many of the rest are of each kind."""

    __slots__ = ("checks", "rest", "kinds")

    def __init__(self) -> None:
        self.checks: deque[str] = deque()
        self.rest: deque[str] = deque()
        self.kinds: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.checks) + len(self.rest)


class FairQueue:
    def __init__(self, half_life_s: float = 10.0) -> None:
        self._queues: dict[str, _RunQueue] = {}    # run id -> its pending tasks
        self._owner: dict[str, str] = {}           # run id -> owner (its group)
        self._by_run = _Decayed(half_life_s)
        self._by_owner = _Decayed(half_life_s)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[str]:
        for q in self._queues.values():
            yield from itertools.chain(q.checks, q.rest)

    def append(self, t: Task, *, front: bool = False) -> None:
        rq = self._queues.get(t.run_id)
        if rq is None:
            rq = self._queues[t.run_id] = _RunQueue()
        self._owner[t.run_id] = t.group
        q = rq.checks if t.keep else rq.rest
        if front:
            q.appendleft(t.task_id)
        else:
            q.append(t.task_id)
        if not t.keep:
            rq.kinds[t.kind] += 1

    def remove(self, t: Task) -> None:
        rq = self._queues.get(t.run_id)
        if rq is None:
            return
        try:
            (rq.checks if t.keep else rq.rest).remove(t.task_id)
        except ValueError:
            return
        if not t.keep:
            rq.kinds[t.kind] -= 1
        if not rq:
            del self._queues[t.run_id]

    def queues(self, run_id: str) -> tuple[deque[str], deque[str]]:
        """The run's pending check tasks and its other pending tasks, each in the
        order they are handed out."""
        rq = self._queues.get(run_id)
        return (rq.checks, rq.rest) if rq is not None else (deque(), deque())

    def only(self, run_id: str, kind: str) -> bool:
        """Whether every pending task of the run but its checks is of ``kind``."""
        rq = self._queues.get(run_id)
        return rq is None or rq.kinds[kind] == len(rq.rest)

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
