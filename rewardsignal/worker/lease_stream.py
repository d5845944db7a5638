"""Reading a streamed lease (``docs/protocol.md``: the lease): frames, each a
4-byte big-endian length and a msgpack map; ``version`` frames while the lease
waits, the task as the last frame, the end of the stream when none came. A
lease sent with a result (``POST /v1/tasks/{task_id}/result`` with ``lease``)
streams the same frames after an ``answer`` frame, the result's answer."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from rewardsignal import protocol, tracing
from rewardsignal.errors import error_from_json

MAX_FRAME_BYTES = 1 << 30


async def read_frame(content: aiohttp.StreamReader) -> dict | None:
    """The next frame's map (None: the stream ended between frames). A stream
    cut mid-frame, or a frame that is not a map, is a ``ClientPayloadError``."""
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
    return msg


async def read_task(next_frame: Callable[[], Awaitable[dict | None]],
                    take_version: Callable[[dict], object]) -> dict | None:
    """The task the lease ends with (None: it ended without one), handing each
    ``version`` frame before it to ``take_version``. ``next_frame``: the
    lease's next frame, None at its end (``read_frame`` of a stream, or the
    worker channel's ``Channel.frame``)."""
    while (msg := await next_frame()) is not None:
        if isinstance(msg.get("version"), dict):
            tracing.mark("worker: version frame read")
            take_version(msg["version"])
            tracing.mark("worker: version applied")
        elif isinstance(msg.get("task"), dict):
            tracing.mark("worker: task frame read")
            return msg["task"]
    return None


async def answer_then_lease(resp: aiohttp.ClientResponse,
                            take_version: Callable[[dict], object]
                            ) -> tuple[Any, asyncio.Task | None]:
    """A result's reply, and, when it came as a lease (a stream that begins with
    the result's ``answer`` frame), a task reading the rest of it: the task the
    lease brings, or None. That task closes ``resp`` when it is done; an error
    answer is raised as the ``SignalError`` it names."""
    try:
        if resp.status != 200 or resp.content_type != protocol.FRAMES:
            payload = decode_reply(resp, await resp.read())
            resp.release()
            if resp.status >= 400:
                raise error_from_json(resp.status, payload)
            return payload, None
        first = await read_frame(resp.content)
        if first is None or not isinstance(first.get("answer"), dict):
            raise aiohttp.ClientPayloadError("a result's lease did not begin with its answer")
    except BaseException:
        resp.close()
        raise
    tracing.mark("worker: result answered")
    return first["answer"], asyncio.create_task(_rest_of_lease(resp, take_version))


async def _rest_of_lease(resp: aiohttp.ClientResponse, take_version: Callable[[dict], object]
                         ) -> dict | None:
    try:
        task = await read_task(functools.partial(read_frame, resp.content), take_version)
    except BaseException:  # cancelled too: the coordinator sees the lease go
        resp.close()
        raise
    resp.release()
    return task


def decode_reply(resp: aiohttp.ClientResponse, body: bytes) -> Any:
    """A coordinator reply by its content type (msgpack, JSON, or raw bytes)."""
    if resp.content_type == protocol.MSGPACK:
        return protocol.unpack(body, max_bytes=1 << 30)
    if resp.content_type == "application/json":
        try:
            return json.loads(body)
        except ValueError:
            return None
    return body
