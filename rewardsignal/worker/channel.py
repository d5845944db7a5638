"""How a worker leases, and sends the results that carry its next lease: on
the coordinator's worker channel (a WebSocket, ``docs/protocol.md``: the
channel) when it offers one, else as HTTP requests.

A channel carries one exchange at a time: a lease, or a result with the next
lease, each answered by the frames a streamed lease is made of (its last one a
task or ``{"end": true}``; an error is one frame). A channel that fails is
closed; the exchange goes again as an HTTP request (a result the coordinator
took already is answered "duplicate", and a lease it granted but could not
deliver goes back to the queue), and a new channel is tried a little later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp.http import WS_CLOSED_MESSAGE

from rewardsignal import protocol, tracing
from rewardsignal.errors import SignalError, error_from_json
from rewardsignal.worker.lease_stream import (
    MAX_FRAME_BYTES,
    answer_then_lease,
    decode_reply,
    read_frame,
    read_task,
)
from rewardsignal.worker.status import StatusLine

# After a channel failed, or could not be opened, HTTP requests until then;
# after the coordinator refused the upgrade (a proxy without WebSockets), longer.
_REOPEN_AFTER_FAILURE_S = 10.0
_REOPEN_AFTER_REFUSAL_S = 300.0
# A closing channel waits this long for the coordinator's reply.
_CLOSE_S = 1.0
# Pings each way this often (as the coordinator's): a dead link is found while
# the worker computes, not when its result waits for an answer.
HEARTBEAT_S = 30.0
# The close code of a channel dropped in the middle of an exchange.
ABANDONED = 4000


class Channel:
    """One open channel; ``busy`` while an exchange is under way. A reader task
    takes every message as it comes (so pings are answered while the worker
    computes), and ``frame`` hands them out in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.busy = False
        self._inbox: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str, headers: dict) -> Channel:
        ws = await session.ws_connect(
            url, headers=headers, compress=0, max_msg_size=MAX_FRAME_BYTES + 4,
            heartbeat=HEARTBEAT_S, timeout=aiohttp.ClientWSTimeout(ws_close=_CLOSE_S))
        return cls(ws)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._ws.receive()
                self._inbox.put_nowait(msg)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return  # closed, closing, or failed: the last thing in the inbox
        except BaseException:  # cancelled (closing), or aiohttp failed: say closed
            self._inbox.put_nowait(WS_CLOSED_MESSAGE)
            raise

    @property
    def closed(self) -> bool:
        return self._ws.closed or self._reader.done()

    async def send(self, head: dict, body: bytes = b"") -> None:
        packed = protocol.pack(head)
        await self._ws.send_bytes(b"".join((len(packed).to_bytes(4, "big"), packed, body)))

    async def frame(self, timeout_s: float) -> dict | None:
        """The exchange's next frame; None: it ended (``end``). An ``error``
        frame is raised as the ``SignalError`` it names."""
        msg = await asyncio.wait_for(self._inbox.get(), timeout_s)
        if msg.type != aiohttp.WSMsgType.BINARY:
            self._inbox.put_nowait(msg)  # it stays closed for whoever asks next
            raise aiohttp.ClientConnectionError(f"worker channel closed ({msg.type.name})")
        data = msg.data
        if len(data) < 4 or int.from_bytes(data[:4], "big") != len(data) - 4:
            raise aiohttp.ClientPayloadError("a channel frame's length is not its size")
        obj = protocol.unpack(memoryview(data)[4:], max_bytes=MAX_FRAME_BYTES)
        if not isinstance(obj, dict):
            raise aiohttp.ClientPayloadError("a channel frame is not a map")
        if "error" in obj:
            status = obj.get("status")
            raise error_from_json(status if isinstance(status, int) else 500, obj)
        return None if obj.get("end") is True else obj

    async def close(self, *, abandoned: bool) -> None:
        """``abandoned``: in the middle of an exchange (the coordinator puts
        back the task it may have sent)."""
        try:
            await self._ws.close(code=ABANDONED if abandoned else aiohttp.WSCloseCode.OK)
        finally:
            self._reader.cancel()


class Leasing:
    """A worker's leases and its results that carry one (``lease``,
    ``post_leasing``), on its channel or over HTTP. ``channel``: whether to use
    a channel the coordinator offers (``offer``, at registration)."""

    def __init__(self, coordinator: str, take_version: Callable[[dict], object],
                 have: Callable[[], dict], status: StatusLine, *, channel: bool = True) -> None:
        self._base = coordinator.rstrip("/")
        self._take_version = take_version
        self._have = have
        self._status = status
        self._use_channel = channel
        self._path: str | None = None
        self._channel: Channel | None = None
        self._reopen_at = 0.0
        self.session: aiohttp.ClientSession | None = None

    async def offer(self, path: object) -> None:
        """The channel a (new) registration names, None or absent: none."""
        await self.close()
        self._path = path if isinstance(path, str) and path.startswith("/") else None
        self._reopen_at = 0.0

    async def lease(self, headers: dict, worker_id: str, lease: dict) -> dict | None:
        """Long-poll for a task (None: the lease ended without one). The lease
        (``{have, timeout_s, deltas}``) says which versions this worker holds and
        asks for a stream: while it waits, each new version of a run it holds
        arrives as the exact delta from the one before and goes to
        ``take_version``, so the next step's weights are in place before its
        task comes (the last frame). A coordinator that does not stream answers
        one msgpack message."""
        timeout_s = float(lease["timeout_s"]) + 30
        channel = await self._free_channel(headers)
        if channel is not None:
            async with self._using(channel):
                await channel.send({"op": "lease", "lease": lease})
                task = await read_task(functools.partial(channel.frame, timeout_s),
                                       self._take_version)
                channel.busy = False
                return task
            # The channel failed: the lease goes again, as a request, with the
            # versions taken meanwhile.
            lease = {**lease, "have": self._have()}
        async with self._http.post(
                f"{self._base}/v1/workers/{worker_id}/lease",
                params={"timeout_s": str(lease["timeout_s"]), "push": "1",
                        "deltas": ",".join(lease["deltas"])},
                headers={**headers, "Content-Type": protocol.MSGPACK,
                         "Accept": f"{protocol.FRAMES}, {protocol.MSGPACK}"},
                data=protocol.pack({"have": lease["have"]}),
                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status == 204:
                return None
            if resp.status >= 400 or resp.content_type != protocol.FRAMES:
                payload = decode_reply(resp, await resp.read())
                if resp.status >= 400:
                    raise error_from_json(resp.status, payload)
                return payload
            return await read_task(functools.partial(read_frame, resp.content),
                                   self._take_version)

    async def post_leasing(self, headers: dict, worker_id: str, task_id: str, body: bytes,
                           kind: str, timeout_s: float, lease: dict
                           ) -> tuple[Any, asyncio.Task | None]:
        """Send a result (``body``) that carries the next lease (``lease``, the
        lease's fields in it): its answer, and a task reading the rest of the
        lease meanwhile (its task, or None). A body the channel does not take
        goes as a request."""
        lease_timeout_s = float(lease["timeout_s"]) + 30
        fits = len(body) <= protocol.CHANNEL_MAX_BODY_BYTES
        channel = await self._free_channel(headers) if fits else None
        if channel is not None:
            async with self._using(channel):
                await channel.send({"op": "result", "task_id": task_id, "content_type": kind},
                                   body)
                first = await channel.frame(timeout_s)
                if first is None or not isinstance(first.get("answer"), dict):
                    raise aiohttp.ClientPayloadError("a result's answer did not come first")
                tracing.mark("worker: result answered")
                # The channel stays busy until the rest of the lease is read.
                return first["answer"], asyncio.create_task(
                    self._rest_of_lease(channel, headers, worker_id, lease))
            # The channel failed: the result goes again, as a request (a result
            # already taken is answered "duplicate").
        resp = await self._http.post(
            f"{self._base}/v1/tasks/{task_id}/result", data=body,
            headers={**headers, "Content-Type": kind,
                     "Accept": f"{protocol.FRAMES}, {protocol.MSGPACK}"},
            timeout=aiohttp.ClientTimeout(total=max(timeout_s, lease_timeout_s)))
        return await answer_then_lease(resp, self._take_version)

    async def _rest_of_lease(self, channel: Channel, headers: dict, worker_id: str,
                             lease: dict) -> dict | None:
        async with self._using(channel):
            task = await read_task(
                functools.partial(channel.frame, float(lease["timeout_s"]) + 30),
                self._take_version)
            channel.busy = False
            return task
        # The channel failed: what the lease held the coordinator releases when
        # it cannot send it, and the lease goes again, as a request, with the
        # versions taken meanwhile.
        return await self.lease(headers, worker_id, {**lease, "have": self._have()})

    @contextlib.asynccontextmanager
    async def _using(self, channel: Channel) -> AsyncIterator[None]:
        """An exchange on ``channel``, busy meanwhile. An error frame leaves it
        free for the next; a failure of the channel closes it and is swallowed
        (the caller goes on with HTTP); anything else (a cancel) closes it."""
        channel.busy = True
        try:
            yield
        except SignalError:
            channel.busy = False
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self._failed(exc)
        except BaseException:  # cancelled too: the coordinator sees the exchange go
            await self._drop(abandoned=True)
            raise

    async def close(self) -> None:
        await self._drop()

    @property
    def _http(self) -> aiohttp.ClientSession:
        assert self.session is not None, "used only inside the worker's run()"
        return self.session

    async def _free_channel(self, headers: dict) -> Channel | None:
        """The channel, opened if need be; None: HTTP this time."""
        ch = self._channel
        if ch is not None and (ch.closed or ch.busy):
            if ch.busy:  # never, by the worker's design: one exchange at a time
                return None
            await self._drop()
            ch = None
        if ch is None and self._path is not None and self._use_channel \
                and time.monotonic() >= self._reopen_at:
            try:
                ch = self._channel = await Channel.open(self._http, self._base + self._path,
                                                        headers)
            except Exception as exc:  # whatever it is, HTTP requests still work
                # Refused (no WebSockets there) waits long; a coordinator that is
                # down or stopping (5xx, no connection) is tried again soon.
                refused = isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status < 500
                wait = _REOPEN_AFTER_REFUSAL_S if refused else _REOPEN_AFTER_FAILURE_S
                self._reopen_at = time.monotonic() + wait
                self._status.event(f"no worker channel ({_short(exc)}); leasing with HTTP "
                                   f"requests, trying again in {wait:.0f}s")
        return ch

    async def _failed(self, exc: BaseException) -> None:
        """An exchange's channel failed (in the middle of it)."""
        self._status.event(f"worker channel failed ({_short(exc)}); going on with HTTP "
                           f"requests, a new channel in {_REOPEN_AFTER_FAILURE_S:.0f}s")
        self._reopen_at = time.monotonic() + _REOPEN_AFTER_FAILURE_S
        await self._drop(abandoned=True)

    async def _drop(self, *, abandoned: bool = False) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            try:
                await ch.close(abandoned=abandoned)
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
