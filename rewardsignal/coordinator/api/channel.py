"""The worker channel (``docs/protocol.md``: the channel): ``GET
/v1/workers/{worker_id}/channel``, a WebSocket on which a worker leases and
sends the results that carry its next lease, one exchange at a time.

Each exchange is what one HTTP request would be, without the request: a
binary message (a 4-byte big-endian length, a msgpack head, then the body the
route takes), answered by the frames a streamed lease is made of, each one
message. A lease (head ``{"op": "lease", "lease": {have, timeout_s, deltas}}``)
ends with its ``task`` frame or ``{"end": true}``; a result (head ``{"op":
"result", "task_id", "content_type", "slot"?}``, the result's body after it)
is answered with an ``answer`` frame, then streams the lease it carries the
same way, or ``{"end": true}`` when it carries none. An error is one terminal
frame, ``{"error": {code, message}, "status": S}``, what the route would have
answered, and the channel stays open. The worker's token is checked at every
exchange (a revoked one stops at the next), and each exchange is counted in
the request metrics under its route, with method ``WS``.

Why: receiving a 240 KB result over the channel takes about 0.1 ms against
0.5 ms as an HTTP request's body (aiohttp, loopback), and a step of a small
model spends that on its critical path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from aiohttp import WSCloseCode, WSMsgType, web

from rewardsignal import tracing
from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR
from rewardsignal.coordinator.api.workers import lease_fields, stream_lease, take_result
from rewardsignal.errors import SignalError, ValidationError
from rewardsignal.protocol import MSGPACK, RESULT, frame, unpack

log = logging.getLogger("signal.coordinator")

# An exchange's head (its body follows): a few hundred bytes in practice.
MAX_HEAD_BYTES = 64 << 10
_LEASE_ROUTE = "/v1/workers/{worker_id}/lease"
_RESULT_ROUTE = "/v1/tasks/{task_id}/result"
# The open channels, closed when the coordinator stops (an open WebSocket
# would hold the server's shutdown until its timeout).
# How long a closing channel waits for its worker's close reply.
_CLOSE_S = 2.0
CHANNELS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("channels")


class _ChannelFrames:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def write(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def end(self, task_sent: bool) -> None:
        if not task_sent:  # a task frame ends the exchange by itself
            await self._ws.send_bytes(frame({"end": True}))


async def worker_channel(request: web.Request) -> web.StreamResponse:
    await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    worker_id = request.match_info["worker_id"]
    coord.scheduler.worker(worker_id)  # an unknown worker is a 404, before the upgrade
    ws = web.WebSocketResponse(max_msg_size=coord.config.max_body_bytes + MAX_HEAD_BYTES,
                               compress=False, timeout=_CLOSE_S)
    await ws.prepare(request)
    request.app[CHANNELS].add(ws)
    async for msg in ws:
        if msg.type != WSMsgType.BINARY:
            await ws.close(code=WSCloseCode.UNSUPPORTED_DATA,
                           message=b"the channel takes binary messages only")
            break
        await _exchange(request, ws, worker_id, msg.data)
    return ws


async def _exchange(request: web.Request, ws: web.WebSocketResponse, worker_id: str,
                    data: bytes) -> None:
    """One exchange, answered on ``ws``; its errors are answered there too."""
    coord = request.app[COORDINATOR]
    started, route = time.monotonic(), "channel"
    out = _ChannelFrames(ws)
    try:
        head, body = _split(data)
        op = head.get("op")
        if op in ("lease", "result"):
            route = _LEASE_ROUTE if op == "lease" else _RESULT_ROUTE
        tracing.mark(f"coordinator: WS {route} begins")
        await request.app[AUTH].worker(request)  # a token revoked meanwhile stops here
        if op == "lease":
            w = coord.scheduler.worker(worker_id)
            if w.quarantined:
                await ws.send_bytes(frame({"error": {"code": "quarantined",
                                                     "message": w.quarantine_reason},
                                           "status": 403}))
                return
            have, timeout_s = lease_fields(head.get("lease"))
            await stream_lease(out, coord, w, timeout_s, have, started)
        elif op == "result":
            await _result(coord, out, head, body, started)
        else:
            raise ValidationError(f"unknown op {str(op)[:32]!r}: the channel takes 'lease' "
                                  "and 'result'")
    except SignalError as exc:
        await _error(ws, exc.http_status, exc.code, exc.message)
    except ConnectionError:  # gone: its next exchange is on a new channel or over HTTP
        pass
    except Exception:
        log.exception("channel exchange failed worker=%s", worker_id)
        await _error(ws, 500, "internal", "internal error; see the coordinator log")
    finally:
        coord.metrics.request_latency.labels(route, "WS").observe(time.monotonic() - started)
        tracing.mark(f"coordinator: WS {route} handled")


async def _result(coord, out: _ChannelFrames, head: dict, body: bytearray,
                  started: float) -> None:
    task_id, content_type = head.get("task_id"), head.get("content_type")
    if not isinstance(task_id, str) or content_type not in (RESULT, MSGPACK):
        raise ValidationError(f"a result's head names its task_id and its content_type "
                              f"({RESULT} or {MSGPACK})")
    slots = coord.services.upload_slots
    slot = head.get("slot")
    if not slots.take(slot if isinstance(slot, str) else None):
        await slots.acquire()
    try:
        w, answer, then_lease = await take_result(coord, task_id, content_type, body,
                                                  frames=True)
    finally:
        slots.release()
    if then_lease is not None and not w.quarantined:  # else its plain lease hears why
        have, timeout_s = then_lease
        await stream_lease(out, coord, w, timeout_s, have, time.monotonic(), answer=answer)
    else:
        await out.write(frame({"answer": answer}))
        await out.end(False)


def _split(data: bytes) -> tuple[dict, bytearray]:
    """An exchange's head and its body (a copy the handler may keep or free)."""
    size = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if not 0 <= size <= min(MAX_HEAD_BYTES, len(data) - 4):
        raise ValidationError("a channel message is a 4-byte length, a msgpack head of at "
                              f"most {MAX_HEAD_BYTES} bytes, then the body")
    head = unpack(data[4:4 + size], max_bytes=MAX_HEAD_BYTES)
    if not isinstance(head, dict):
        raise ValidationError("a channel message's head must be a msgpack map")
    return head, bytearray(memoryview(data)[4 + size:])


async def _error(ws: web.WebSocketResponse, status: int, code: str, message: str) -> None:
    try:
        await ws.send_bytes(frame({"error": {"code": code, "message": message},
                                   "status": status}))
    except ConnectionError:
        pass


async def close_channels(app: web.Application) -> None:
    """At shutdown: every open channel closed (its worker goes back to HTTP, or
    waits for the coordinator to come back)."""
    channels = app[CHANNELS]
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"coordinator stopping")
                           for ws in list(channels)), return_exceptions=True)
