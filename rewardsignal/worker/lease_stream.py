"""Reading a streamed lease (``docs/protocol.md``: the lease): frames, each a
4-byte big-endian length and a msgpack map; ``version`` frames while the lease
waits, the task as the last frame, the end of the stream when none came."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from rewardsignal import protocol, tracing

MAX_FRAME_BYTES = 1 << 30


async def read_task(content: aiohttp.StreamReader, take_version: Callable[[dict], object]
                    ) -> dict | None:
    """The task the stream ends with (None: it ended without one), handing each
    ``version`` frame before it to ``take_version``. A stream cut mid-frame, or
    a frame that is not a map, is a ``ClientPayloadError``."""
    while True:
        try:
            head = await content.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise aiohttp.ClientPayloadError("lease stream cut mid-frame") from None
            return None
        size = int.from_bytes(head, "big")
        if size > MAX_FRAME_BYTES:
            raise aiohttp.ClientPayloadError(f"lease frame of {size} bytes")
        try:
            msg = protocol.unpack(await content.readexactly(size), max_bytes=MAX_FRAME_BYTES)
        except asyncio.IncompleteReadError:
            raise aiohttp.ClientPayloadError("lease stream cut mid-frame") from None
        if not isinstance(msg, dict):
            raise aiohttp.ClientPayloadError("lease frame is not a map")
        if isinstance(msg.get("version"), dict):
            tracing.mark("worker: version frame read")
            take_version(msg["version"])
            tracing.mark("worker: version applied")
        elif isinstance(msg.get("task"), dict):
            tracing.mark("worker: task frame read")
            return msg["task"]
