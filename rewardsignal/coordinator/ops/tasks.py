"""Waiting on the tasks an operation issued, and saying so when no live worker
can take them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.holds import release
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.services import Services
from rewardsignal.coordinator.trust.verify import Outcome
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
            # Placement and the task's kind (an optional one older workers lack):
            # the first open task speaks for the request's others.
            probe = next((t for t in tasks if not t.done), None)
            if done or probe is None or scheduler.eligible_for(probe):
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


async def counted_results(ctx: Services, run: Run, request: Request, tasks: list[Task],
                          check: Callable[[Task, Outcome], Coroutine[Any, Any, Outcome | None]]
                          ) -> dict[int, Outcome | None]:
    """Each task's result that counts, by index: an unchecked result as it came
    (its gradient already summed where the task's sink wants it), or, for one the
    trust policy held for a check, what ``check(task, outcome)`` decided (None:
    it did not hold). ``check`` is given the held gradient and its hold, and
    releases them (``Outcome.release``) once it has summed or dropped them, so
    that a request's checked gradients do not wait for each other in memory."""
    for t in tasks:
        t.checkable = ctx.trust.checkable(run, t.kind)
    counted: dict[int, Outcome | None] = {}
    checks: list[tuple[int, Outcome, asyncio.Task]] = []
    try:
        async for j, res in gather_tasks(ctx.scheduler, tasks, request, run.spec.base_model,
                                         ctx.config.no_worker_grace_s):
            t = tasks[j]
            outcome = Outcome(t.done_by, res, t.held, t.hold)
            t.held = t.hold = None
            if t.check:
                checks.append((j, outcome, asyncio.create_task(check(t, outcome))))
            else:
                counted[j] = outcome
            del outcome  # a failure's traceback keeps this frame: nothing held in it
        for j, _, pending in checks:
            counted[j] = await pending
    finally:
        # The request ended (or failed) with checks undecided, some perhaps not
        # started: their gradients are dropped and their memory given back here.
        for _, held, pending in checks:
            pending.cancel()
            held.release()
        checks.clear()
        for t in tasks:  # computed, but the request ended before it was taken
            release(t.hold)
            t.held = t.hold = None
    return counted
