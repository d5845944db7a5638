"""Tinker's futures and per-model ordering.

Every Tinker call that does work answers at once with a ``request_id``; the
client then polls ``retrieve_future``. ``Futures`` keeps those results (JSON
objects, or protobuf bytes for forward and sample results) for late pollers.

Training calls on one model carry a ``seq_id`` and apply in its order; the
SDK sends the chunks of a large ``forward_backward`` concurrently, lowest
``seq_id`` last, and re-sends a call with the same ``seq_id`` when it retries.
A ``Sequencer`` queues calls until every lower ``seq_id`` has started, starts
them in order, and hands a re-sent call the first one's future.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from rewardsignal.errors import NotFoundError, SignalError, ValidationError

log = logging.getLogger("signal.tinker")

# Calls one model may hold waiting for a lower seq_id; more is a client bug.
MAX_WAITING = 4096
# Seq ids remembered per model for answering re-sent calls.
REMEMBERED = 4096


def error_result(exc: BaseException) -> dict:
    """A failure as the SDK reads it: ``user`` for what the caller can fix."""
    if isinstance(exc, SignalError):
        return {"error": exc.message, "category": "user" if exc.http_status < 500 else "server"}
    return {"error": f"{type(exc).__name__}: {exc}", "category": "server"}


class Futures:
    def __init__(self, keep: int = 10_000) -> None:
        self._items: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._owners: dict[str, str] = {}
        self.keep = keep

    def run(self, owner: str, work: Awaitable[Any], request_id: str | None = None) -> str:
        """A new future resolved by ``work`` (a dict, or protobuf bytes)."""
        request_id = request_id or "tk-" + secrets.token_hex(10)
        fut: asyncio.Future = asyncio.ensure_future(work)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        self._items[request_id] = fut
        self._owners[request_id] = owner
        while len(self._items) > self.keep:
            old, f = next(iter(self._items.items()))
            if not f.done():
                break
            del self._items[old]
            del self._owners[old]
        return request_id

    def get(self, request_id: str, owner: str) -> asyncio.Future:
        fut = self._items.get(request_id)
        if fut is None or self._owners[request_id] != owner:
            raise NotFoundError(f"unknown request {request_id} (finished too long ago, or from "
                                "before a coordinator restart)")
        return fut

    async def wait(self, request_id: str, owner: str, timeout_s: float) -> dict | bytes | None:
        """The result (or an error result) once done; None if still running
        after ``timeout_s``."""
        fut = self.get(request_id, owner)
        done, _ = await asyncio.wait({fut}, timeout=timeout_s)
        if not done:
            return None
        if fut.cancelled():
            return {"error": "the request was cancelled (coordinator shutting down)",
                    "category": "server"}
        exc = fut.exception()
        return error_result(exc) if exc is not None else fut.result()


class Turn:
    """A call's turn to queue its operation: entered once every lower seq_id
    has queued (or failed), left when this call has queued. Work that may
    finish out of order (reading and checking the arguments) goes before it."""

    def __init__(self, previous: asyncio.Future | None) -> None:
        self._previous = previous
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def __aenter__(self) -> None:
        if self._previous is not None:
            await asyncio.shield(self._previous)

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def released(self, _task: asyncio.Future) -> None:
        """Done callback: a call that failed before queueing gives its turn up."""
        self.release()


Start = Callable[[Turn], Awaitable[Any]]


class Sequencer:
    """Queues one model's calls in ``seq_id`` order."""

    def __init__(self, futures: Futures, next_seq: int) -> None:
        self.futures = futures
        self.next_seq = next_seq
        self._waiting: dict[int, tuple[asyncio.Future, Start]] = {}
        self._ids: OrderedDict[int, str] = OrderedDict()
        self._last: asyncio.Future | None = None  # the latest started call's Turn.done

    def seen(self, seq_id: int) -> bool:
        return seq_id in self._ids

    def offer(self, owner: str, seq_id: int, start: Start, request_id: str | None = None
              ) -> str:
        """The call's request id. ``start(turn)`` runs once every lower seq_id
        has started, and queues its operation inside ``async with turn``; its
        result is the call's result. A seq_id seen before gets the first
        call's id back (the SDK re-sends with the same seq_id)."""
        if seq_id in self._ids:
            return self._ids[seq_id]
        if seq_id < self.next_seq:
            raise ValidationError(f"seq_id {seq_id} was already applied on this model (next "
                                  f"is {self.next_seq})")
        if len(self._waiting) >= MAX_WAITING:
            raise ValidationError(f"{MAX_WAITING} calls are waiting for seq_id "
                                  f"{self.next_seq}, which never came")
        gate: asyncio.Future = asyncio.get_running_loop().create_future()
        request_id = self.futures.run(owner, self._after(gate), request_id)
        self._waiting[seq_id] = (gate, start)
        self._ids[seq_id] = request_id
        while len(self._ids) > REMEMBERED:
            self._ids.popitem(last=False)
        self._drain()
        return request_id

    @staticmethod
    async def _after(gate: asyncio.Future) -> Any:
        return await (await gate)  # the started call's task, once its seq_id came up

    def _drain(self) -> None:
        while self.next_seq in self._waiting:
            gate, start = self._waiting.pop(self.next_seq)
            self.next_seq += 1
            turn = Turn(self._last)
            self._last = turn.done
            task = asyncio.ensure_future(start(turn))
            task.add_done_callback(turn.released)
            gate.set_result(task)
