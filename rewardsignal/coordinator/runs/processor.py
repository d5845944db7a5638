"""Each run's operations, applied in the order they were accepted.

Operations that are not barriers overlap (forward passes: gradients add
commutatively and all of them see the same version), up to a bound; a barrier
(``optim_step``, ``save_state``, a federated job) waits for everything queued
before it and runs alone. A barrier that ``starts_on_staged`` (``optim_step``)
starts once everything before it has its effect in memory (``request.staged``),
and waits for the rest to finish (``request.until_prior_done``) before it makes
anything durable: AdamW runs while the last gradient is being written.
Operations that are not ordered (``sample``) skip the queue and run at once on
the current version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from rewardsignal.coordinator.runs.requests import Request

# Forward passes of one run computed at once: each holds one adapter-sized partial
# sum until it completes, so this bounds coordinator memory per run.
MAX_INFLIGHT_PER_RUN = 4


class Ordered(Protocol):
    """What the processor needs to know of an operation."""

    @property
    def name(self) -> str: ...

    @property
    def barrier(self) -> bool: ...

    @property
    def ordered(self) -> bool: ...

    @property
    def starts_on_staged(self) -> bool: ...


@dataclass
class Op:
    operation: Ordered
    request: Request
    args: Any
    timeout_s: float


class RunProcessor:
    def __init__(self, execute: Callable[[Op], Coroutine[Any, Any, None]],
                 max_inflight: int = MAX_INFLIGHT_PER_RUN) -> None:
        self.queue: asyncio.Queue[Op] = asyncio.Queue()
        self._execute = execute
        self._max_inflight = max_inflight
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        # The ordered operations running (not barriers), with their requests.
        self._running: dict[asyncio.Task, Request] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def put(self, op: Op) -> None:
        if op.operation.ordered:
            self.queue.put_nowait(op)
            return
        # Reads whatever version is current and changes nothing: it need not wait
        # behind the queue (a sample during a long federated job).
        t = asyncio.create_task(self._execute(op))
        self._inflight.add(t)
        t.add_done_callback(self._inflight.discard)

    async def stop(self) -> None:
        """Cancel the loop and every operation running: what they had accepted is
        durable and runs again after a restart."""
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        inflight = self._inflight
        while True:
            op = await self.queue.get()
            barrier = op.operation.barrier
            if barrier and op.operation.starts_on_staged:
                running = dict(self._running)
                # In turn (all must be set; one already set returns at once): no
                # task per wait, as gather makes, between the last one staged
                # and the step.
                for r in running.values():
                    await r.staged.wait()
                op.request.prior = tuple(running)
            elif barrier and inflight:
                await asyncio.wait(inflight)
            if barrier:  # alone: run here, not in a task of its own a loop turn later
                await self._execute(op)
                continue
            while len(inflight) >= self._max_inflight:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            t = asyncio.create_task(self._execute(op))
            inflight.add(t)
            self._running[t] = op.request
            t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task) -> None:
        self._inflight.discard(t)
        request = self._running.pop(t, None)
        if request is not None:
            request.staged.set()
