"""Waiting on the tasks an operation issued, and saying so when no live worker
can take them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.errors import NoWorkerError

# How often a waiting request checks whether any live worker could take it.
_CHECK_S = 1.0


async def gather_tasks(scheduler: Scheduler, tasks: list[Task], request: Request,
                       model_id: str, no_worker_grace_s: float
                       ) -> AsyncIterator[tuple[int, Any]]:
    """Yield (index, result) as tasks finish; cancel the rest on exit (the
    request failed or timed out: its remaining shards are withdrawn). While no
    live worker can serve the run (``model_id``, at its precision and size: see
    ``scheduling.placement``) the request shows ``waiting_for_workers``;
    after ``no_worker_grace_s`` of that it fails with ``NoWorkerError``."""
    index = {t.future: i for i, t in enumerate(tasks)}
    pending = set(index)
    idle_since: float | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=_CHECK_S,
                                               return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                yield index[f], f.result()
            if done or scheduler.eligible_workers(model_id, request.run_id):
                idle_since = None
                request.set_waiting_for_workers(False)
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            request.set_waiting_for_workers(True)
            if now - idle_since >= no_worker_grace_s:
                raise NoWorkerError(
                    f"no live worker can serve run {request.run_id} (model {model_id}): none "
                    f"for {no_worker_grace_s:g}s. Start one with `signal-worker --coordinator "
                    "URL`, then send the request again.")
    finally:
        request.set_waiting_for_workers(False)
        for t in tasks:
            if not t.done:
                scheduler.cancel(t, "request ended")
