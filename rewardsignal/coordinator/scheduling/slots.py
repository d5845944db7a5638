"""Upload slots: how many submission bodies the coordinator takes in at once.

aiohttp reads a request body into memory as it arrives (a waiting handler does
not stop it; measured: 100 parallel 7 MB uploads held ~750 MB in a bare aiohttp
server whose handlers admitted two at a time, even with ``Expect:
100-continue``). So a worker asks for a slot first (a small long-poll) and
sends its update only once it holds one: memory is a few updates, whatever the
number of workers. A slot not used within ``hold_s`` goes back: the worker
died between asking and sending, or went away while its long-poll was being
granted. Workers pack their update before they ask, so a live one starts
sending at once; a short hold keeps a dead one from idling a slot for long.
Waiting uploads are served in the fleet's fair order (the least served run
first), so a small run's gradient does not queue behind a swarm's.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

Rank = tuple[float, ...]
_LAST: Rank = (float("inf"),)


class UploadSlots:
    """``count`` slots; waiters are served lowest ``rank`` first (the fair order
    of their runs), then first come, first served."""

    def __init__(self, count: int, hold_s: float = 10.0) -> None:
        self._free = count
        self._waiters: list[tuple[Rank, int, asyncio.Future]] = []  # a heap
        self._seq = itertools.count()
        self._held: dict[str, float] = {}  # slot id -> deadline
        self.hold_s = hold_s

    async def _wait_turn(self, timeout_s: float | None, rank: Rank) -> bool:
        # A free slot means nobody waits: release() hands slots to waiters first.
        if self._free > 0:
            self._free -= 1
            return True
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._seq), fut))
        try:
            await asyncio.wait({fut}, timeout=timeout_s)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted as the waiter went away: pass it on
            fut.cancel()
            raise
        if fut.done():
            return True
        fut.cancel()  # timed out: release() skips cancelled waiters
        return False

    async def reserve(self, timeout_s: float, rank: Rank = _LAST) -> str | None:
        """A slot id, or None if none freed up within ``timeout_s``."""
        if not await self._wait_turn(timeout_s, rank):
            return None
        slot = "s-" + secrets.token_hex(8)
        self._held[slot] = time.monotonic() + self.hold_s
        return slot

    def take(self, slot: str | None) -> bool:
        """Use a reserved slot for this upload (True), or say there is none."""
        return slot is not None and self._held.pop(slot, None) is not None

    async def acquire(self) -> None:
        await self._wait_turn(None, _LAST)

    @contextlib.asynccontextmanager
    async def holding(self, slot: str | None) -> AsyncIterator[None]:
        """One upload's slot for the ``async with`` block: the reserved
        ``slot`` (``take``), else the next free one, waited for here."""
        if not self.take(slot):
            await self.acquire()
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    def expire(self) -> int:
        now = time.monotonic()
        dead = [s for s, deadline in self._held.items() if deadline < now]
        for s in dead:
            del self._held[s]
            self.release()
        return len(dead)
