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
"""

from __future__ import annotations

import asyncio
import secrets
import time


class UploadSlots:
    def __init__(self, count: int, hold_s: float = 10.0) -> None:
        self._sem = asyncio.Semaphore(count)
        self._held: dict[str, float] = {}  # slot id -> deadline
        self.hold_s = hold_s

    async def reserve(self, timeout_s: float) -> str | None:
        """A slot id, or None if none freed up within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout_s)
        except TimeoutError:
            return None
        slot = "s-" + secrets.token_hex(8)
        self._held[slot] = time.monotonic() + self.hold_s
        return slot

    def take(self, slot: str | None) -> bool:
        """Use a reserved slot for this upload (True), or say there is none."""
        return slot is not None and self._held.pop(slot, None) is not None

    async def acquire(self) -> None:
        await self._sem.acquire()

    def release(self) -> None:
        self._sem.release()

    def expire(self) -> int:
        now = time.monotonic()
        dead = [s for s, deadline in self._held.items() if deadline < now]
        for s in dead:
            del self._held[s]
            self._sem.release()
        return len(dead)
