"""Waiting on the tasks an operation issued."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task


async def gather_tasks(scheduler: Scheduler, tasks: list[Task]
                       ) -> AsyncIterator[tuple[int, Any]]:
    """Yield (index, result) as tasks finish; cancel the rest on exit (the
    request failed or timed out: its remaining shards are withdrawn)."""
    index = {t.future: i for i, t in enumerate(tasks)}
    pending = set(index)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                yield index[f], f.result()
    finally:
        for t in tasks:
            if not t.done:
                scheduler.cancel(t, "request ended")
