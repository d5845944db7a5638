"""Stragglers: leased tasks running far past their expected time, which an idle
worker may compute a second time (first result wins)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.scheduling.workers import WorkerInfo


class Stragglers:
    def __init__(self, tasks: dict[str, Task], workers: dict[str, WorkerInfo], *, factor: float,
                 min_s: float, serves: Callable[[WorkerInfo, Task], bool] | None = None) -> None:
        self.tasks = tasks
        # Placement: whether a worker can take a task (the scheduler's rule).
        self.serves = serves or (lambda w, t: w.serves(t.base_model))
        self.workers = workers
        self.factor = factor
        self.min_s = min_s
        self._cache: tuple[float, list[Task]] = (0.0, [])

    def candidates(self) -> list[Task]:
        """Leased tasks running far past their expected time, recomputed at most
        twice a second however many workers ask."""
        now = time.monotonic()
        stamp, found = self._cache
        if now - stamp < 0.5:
            return found
        found = []
        for t in self.tasks.values():
            # Federated train tasks are not duplicated: a round already tolerates a
            # missing worker (it closes at its timeout with the others).
            # Nor merged exports: a second worker would merge and upload the
            # whole model again.
            if t.done or t.kind in ("train", "export_merged") or len(t.leases) != 1:
                continue
            (lease,) = t.leases.values()
            if lease.uploading:  # done computing: a copy would only queue a second upload
                continue
            holder = self.workers.get(lease.worker_id)
            rate = holder.tokens_per_s if holder and holder.tokens_per_s else None
            expected = t.tokens / rate if rate else self.min_s
            if now - lease.started > max(self.min_s, self.factor * expected):
                found.append(t)
        self._cache = (now, found)
        return found

    def pick(self, w: WorkerInfo) -> Task | None:
        for t in self.candidates():
            if (t.done or len(t.leases) != 1 or not self.serves(w, t)
                    or w.worker_id in t.exclude):
                continue
            (lease,) = t.leases.values()
            if lease.worker_id != w.worker_id:
                return t
        return None
