"""Futures of accepted requests (SDK calls), waited on by long-polling clients."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from rewardsignal.errors import NotFoundError, SignalError


@dataclass
class Request:
    request_id: str
    owner: str
    run_id: str
    kind: str
    future: asyncio.Future
    created: float = field(default_factory=time.time)
    # Pending with no live worker able to take its tasks (shown to the client).
    waiting_for_workers: bool = False
    # Set when something a waiting client should hear changes before the end.
    noticed: asyncio.Event = field(default_factory=asyncio.Event)
    # The database write that makes it durable (``Database.add_requests``); None
    # for one read back from the database.
    stored: asyncio.Future | None = None
    # Set once what it does is in memory and only making it durable is left
    # (``forward_backward``: its gradient is staged), or once it has finished.
    staged: asyncio.Event = field(default_factory=asyncio.Event)
    # The operations queued before this one that were still finishing when it
    # started (a barrier that ``starts_on_staged``); ``until_prior_done``.
    prior: tuple[asyncio.Future, ...] = ()
    # The result its operation stored itself, with what it made durable
    # (``forward_backward``: with its gradient's row); the runner then stores
    # nothing more for it when that is its outcome.
    stored_result: dict | None = None

    async def until_stored(self) -> None:
        """Return once the request is durable; raises what storing it raised.
        An operation that starts while its acceptance is being synced waits here
        before it changes anything that outlives the process."""
        if self.stored is not None:
            await asyncio.shield(self.stored)

    async def until_prior_done(self) -> None:
        """Return once the operations before this one have finished and stored
        their outcomes; raises if one of them could not (what this one would
        make durable could then be applied twice after a restart)."""
        if not self.prior:
            return
        await asyncio.wait(self.prior)
        for t in self.prior:
            if t.cancelled() or t.exception() is not None:
                raise SignalError("an operation queued before this one did not finish "
                                  "storing its outcome; nothing was applied. Check the "
                                  "coordinator's log and disk, then retry")

    def store_failed(self) -> bool:
        stored = self.stored
        return (stored is not None and stored.done()
                and (stored.cancelled() or stored.exception() is not None))

    def set_waiting_for_workers(self, waiting: bool) -> None:
        if waiting and not self.waiting_for_workers:
            self.noticed.set()  # answer long-polls now: the client tells its user
        self.waiting_for_workers = waiting

    def to_json(self) -> dict:
        base = {"request_id": self.request_id, "run_id": self.run_id, "kind": self.kind}
        if not self.future.done():
            if self.waiting_for_workers:
                return {**base, "status": "pending", "waiting_for_workers": True}
            return {**base, "status": "pending"}
        exc = self.future.exception() if not self.future.cancelled() else None
        if self.future.cancelled():
            return {**base, "status": "failed", "error": {"code": "cancelled",
                                                          "message": "request was cancelled"}}
        if exc is not None:
            err = exc if isinstance(exc, SignalError) else SignalError(str(exc))
            return {**base, "status": "failed", **err.to_json()}
        return {**base, "status": "done", "result": self.future.result()}


class RequestRegistry:
    """Requests in memory; ``keep_finished`` finished ones stay for clients that
    come back late for their result (the database keeps as many across restarts)."""

    def __init__(self, keep_finished: int) -> None:
        self._items: dict[str, Request] = {}
        # Finished request ids, oldest first: trimming drops from the front, so
        # finishing a request costs the same with 10,000 kept as with none.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.keep_finished = keep_finished
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Answer every long-poll now (the coordinator is shutting down; clients
        see their request still pending and come back after the restart)."""
        self._closing.set()

    def create(self, owner: str, run_id: str, kind: str, *, request_id: str | None = None
               ) -> Request:
        req = Request(request_id or "req-" + secrets.token_hex(8), owner, run_id, kind,
                      asyncio.get_running_loop().create_future())
        self._items[req.request_id] = req
        req.future.add_done_callback(lambda _f: self._finish(req.request_id))
        return req

    def _finish(self, request_id: str) -> None:
        self._finished[request_id] = None
        self._finished.move_to_end(request_id)
        while len(self._finished) > self.keep_finished:
            old = self._items.get(self._finished.popitem(last=False)[0])
            if old is not None and old.future.done():  # not a pending one reusing the id
                del self._items[old.request_id]

    def fail_run(self, run_id: str, error: SignalError) -> int:
        """Fail every open request of ``run_id`` (the run is gone); returns how many."""
        open_ = [r for r in self._items.values() if r.run_id == run_id and not r.future.done()]
        for req in open_:
            req.future.set_exception(error)
        return len(open_)

    def get(self, request_id: str, owner: str) -> Request:
        req = self._items.get(request_id)
        if req is None or req.owner != owner:
            raise NotFoundError(f"unknown request {request_id}")
        return req

    async def wait(self, request_id: str, owner: str, timeout_s: float) -> Request:
        req = self.get(request_id, owner)
        if not req.future.done() and not self._closing.is_set():
            # asyncio.wait never cancels what it waits on: a client that gives up
            # (or disconnects) leaves the request running.
            closing = asyncio.ensure_future(self._closing.wait())
            noticed = asyncio.ensure_future(req.noticed.wait())
            try:
                await asyncio.wait({req.future, closing, noticed}, timeout=timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                noticed.cancel()
            req.noticed.clear()
        return req
