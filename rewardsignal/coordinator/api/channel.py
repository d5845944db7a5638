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
answered, and the channel stays open. Each exchange is counted in the request
metrics under its route, with method ``WS``.

A worker has one channel (a new one closes the old) and it must hold the
token it registered with; the token is checked again at every exchange (a
revoked one is told so, and the channel closes), and a result on it may name
no other worker. The channel is read while its exchange runs: the worker's
leaving ends a parked lease at once (its task goes back to the queue), a
worker that drops the channel mid-exchange (close code 4000) gets the task
the exchange sent put back, and pings go both ways every 30 s, so a peer gone
without a word is found.

Why: receiving a 240 KB result over the channel takes about 0.1 ms against
0.5 ms as an HTTP request's body (aiohttp, loopback), and a step of a small
model spends that on its critical path.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web

from rewardsignal import tracing
from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR
from rewardsignal.coordinator.api.workers import lease_fields, stream_lease, take_result
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.errors import (
    AuthError,
    CoordinatorUnavailableError,
    ForbiddenError,
    SignalError,
    ValidationError,
)
from rewardsignal.protocol import CHANNEL_MAX_BODY_BYTES, MSGPACK, RESULT, frame, unpack

log = logging.getLogger("signal.coordinator")

# An exchange's head (its body follows): a few hundred bytes in practice.
MAX_HEAD_BYTES = 64 << 10
# Close codes: a worker that drops its channel in the middle of an exchange
# closes with ABANDONED (the task the exchange sent, if any, never reached it).
ABANDONED = 4000
_LEASE_ROUTE = "/v1/workers/{worker_id}/lease"
_RESULT_ROUTE = "/v1/tasks/{task_id}/result"
# Pings each way this often: a peer gone without a word is found within 1.5x.
HEARTBEAT_S = 30.0
# How long a closing channel waits for its worker's close reply.
_CLOSE_S = 2.0


class Channels:
    """The open channels, one per worker (a new one replaces the old), closed
    when the coordinator stops (an open WebSocket would hold the server's
    shutdown until its timeout)."""

    def __init__(self) -> None:
        self.open: dict[str, web.WebSocketResponse] = {}
        self.stopping = False


CHANNELS = web.AppKey("channels", Channels)


class _ChannelFrames:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def write(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def end(self, task_sent: bool) -> None:
        if not task_sent:  # a task frame ends the exchange by itself
            await self._ws.send_bytes(frame({"end": True}))


async def worker_channel(request: web.Request) -> web.StreamResponse:
    token_id = await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    channels = request.app[CHANNELS]
    worker_id = request.match_info["worker_id"]
    w = coord.scheduler.worker(worker_id)  # an unknown worker is a 404, before the upgrade
    if w.token_id != token_id:
        raise ForbiddenError(f"{worker_id} registered with another worker token")
    if channels.stopping:
        raise CoordinatorUnavailableError("the coordinator is stopping")
    ws = web.WebSocketResponse(max_msg_size=CHANNEL_MAX_BODY_BYTES + MAX_HEAD_BYTES, compress=False,
                               timeout=_CLOSE_S, heartbeat=HEARTBEAT_S)
    await ws.prepare(request)
    if channels.stopping:  # it began stopping during the upgrade
        await _close(ws, WSCloseCode.GOING_AWAY, b"coordinator stopping")
        return ws
    replaced = channels.open.get(worker_id)
    channels.open[worker_id] = ws
    if replaced is not None:
        await _close(replaced, WSCloseCode.POLICY_VIOLATION, b"replaced by a newer channel")
    try:
        await _serve(request, ws, worker_id)
    finally:
        if channels.open.get(worker_id) is ws:
            del channels.open[worker_id]
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, worker_id: str) -> None:
    """Read the channel while its exchanges run (one at a time), so that the
    worker's leaving ends a parked lease at once and pings are answered."""
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    exchange: asyncio.Task | None = None
    try:
        while not ws.closed:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                            WSMsgType.ERROR):
                break
            if msg.type != WSMsgType.BINARY:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA,
                               message=b"the channel takes binary messages only")
                break
            if exchange is not None and not exchange.done():
                await ws.close(code=WSCloseCode.POLICY_VIOLATION,
                               message=b"one exchange at a time")
                break
            exchange = asyncio.create_task(_exchange(request, ws, worker_id, msg.data, gone))
            del msg  # the exchange holds the message's bytes, and frees them
    finally:
        gone.set_result(None)
        if exchange is not None:
            sent = await exchange  # a parked lease ends at once; a result is still taken
            if sent is not None and ws.close_code == ABANDONED:
                _give_back(request.app[COORDINATOR], worker_id, *sent)


def _give_back(coord, worker_id: str, task: Task, lease_id: str) -> None:
    """The task the last exchange sent, which the worker says it never read."""
    lease = task.leases.get(lease_id)
    if lease is not None and lease.worker_id == worker_id and not (task.done or task.claimed):
        coord.scheduler.release(task, lease_id, f"worker {worker_id} dropped its channel "
                                "before its task reached it")


async def _exchange(request: web.Request, ws: web.WebSocketResponse, worker_id: str,
                    data: bytes, gone: asyncio.Future[None]) -> tuple[Task, str] | None:
    """One exchange, answered on ``ws`` (its errors too); the task it sent."""
    coord = request.app[COORDINATOR]
    started, route = time.monotonic(), "channel"
    out = _ChannelFrames(ws)
    try:
        head, body = _split(data)
        del data
        op = head.get("op")
        if op in ("lease", "result"):
            route = _LEASE_ROUTE if op == "lease" else _RESULT_ROUTE
        tracing.mark(f"coordinator: WS {route} begins")
        try:
            await request.app[AUTH].worker(request)
        except AuthError as exc:  # revoked meanwhile: said, and the channel closes
            await _error(ws, exc.http_status, exc.code, exc.message)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"token refused")
            return None
        if op == "lease":
            w = coord.scheduler.worker(worker_id)
            if w.quarantined:
                await ws.send_bytes(frame({"error": {"code": "quarantined",
                                                     "message": w.quarantine_reason},
                                           "status": 403}))
                return None
            have, timeout_s = lease_fields(head.get("lease"))
            return await stream_lease(out, coord, w, timeout_s, have, started, gone=gone)
        if op == "result":
            return await _result(coord, out, worker_id, head, body, gone)
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
    return None


async def _result(coord, out: _ChannelFrames, worker_id: str, head: dict, body: bytearray,
                  gone: asyncio.Future[None]) -> tuple[Task, str] | None:
    task_id, content_type = head.get("task_id"), head.get("content_type")
    if not isinstance(task_id, str) or content_type not in (RESULT, MSGPACK):
        raise ValidationError(f"a result's head names its task_id and its content_type "
                              f"({RESULT} or {MSGPACK})")
    slot = head.get("slot")
    async with coord.services.upload_slots.holding(slot if isinstance(slot, str) else None):
        w, answer, then_lease = await take_result(coord, task_id, content_type, body,
                                                  frames=True, worker_id=worker_id)
    if then_lease is not None and not w.quarantined:  # else its plain lease hears why
        have, timeout_s = then_lease
        return await stream_lease(out, coord, w, timeout_s, have, time.monotonic(),
                                  answer=answer, gone=gone)
    await out.write(frame({"answer": answer}))
    await out.end(False)
    return None


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


async def _close(ws: web.WebSocketResponse, code: int, message: bytes) -> None:
    """Close ``ws``, waiting a bounded time for its worker (a peer that reads
    nothing cannot hold the caller)."""
    try:
        await asyncio.wait_for(ws.close(code=code, message=message), _CLOSE_S * 2)
    except (TimeoutError, ConnectionError):
        pass


async def close_channels(app: web.Application) -> None:
    """At shutdown: no new channel, and every open one closed (its worker goes
    back to HTTP, or waits for the coordinator to come back)."""
    channels = app[CHANNELS]
    channels.stopping = True
    await asyncio.gather(*(_close(ws, WSCloseCode.GOING_AWAY, b"coordinator stopping")
                           for ws in list(channels.open.values())))
