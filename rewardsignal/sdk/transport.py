"""HTTP to a coordinator for the SDK: typed errors, idempotency keys, and a
retry window that rides out a restarted or unreachable coordinator.

Every call that changes something carries an ``X-Idempotency-Key`` made for
that call and reused on its retries, so a retry after a lost answer gets the
original request back instead of a second one. Connection failures (refused,
reset, timed out) are retried with exponential backoff and jitter for up to
``retry_window_s``; one line on stderr says so while it lasts.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from typing import Any

import aiohttp
import msgpack

from rewardsignal import tracing
from rewardsignal.errors import CoordinatorUnavailableError, SignalError, error_from_json

DEFAULT_RETRY_WINDOW_S = 120.0
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 8.0
# protocol.MSGPACK; the SDK does not import protocol (it would load torch).
MSGPACK = "application/msgpack"


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def _cause(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None)
    if os_error is not None and os_error.errno is not None:
        return f"{os_error.strerror} (errno {os_error.errno})"
    return type(exc).__name__


def _decode(data: bytes, content_type: str) -> Any:
    """An answer's body by its content type (ValueError when it is not what it says)."""
    if content_type == MSGPACK:
        try:
            return msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises many unrelated types for garbage
            raise ValueError(f"answer is not valid msgpack: {type(exc).__name__}") from None
    return json.loads(data)


class Transport:
    def __init__(self, base_url: str, api_key: str | None, retry_window_s: float) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.retry_window_s = retry_window_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def call(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                   timeout_s: float = 60.0, idempotency_key: str | None = None,
                   request_id: str | None = None, raw: bool = False) -> Any:
        """One call, retried on connection failures within the retry window when
        it is safe: a GET, or a call with an idempotency key. ``request_id``
        names the request the call is about, for the error if the window ends."""
        headers = self.headers()
        if idempotency_key is not None:
            headers["X-Idempotency-Key"] = idempotency_key
        retry = method == "GET" or idempotency_key is not None
        give_up_at: float | None = None
        attempt = 0
        traced = _traced(method, path) if tracing.enabled() else None
        while True:
            try:
                if traced:
                    tracing.mark(f"sdk: {traced} sent")
                try:
                    return await self._once(method, path, body, params, headers, timeout_s,
                                            raw)
                finally:
                    if traced:
                        tracing.mark(f"sdk: {traced} answered")
            except SignalError:  # the coordinator answered (NoWorkerError is a TimeoutError)
                raise
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if not retry:
                    raise
                now = time.monotonic()
                if give_up_at is None:
                    give_up_at = now + self.retry_window_s
                    print(f"signal: cannot reach the coordinator at {self.base_url} "
                          f"({_cause(exc)}); retrying for up to {self.retry_window_s:g}s",
                          file=sys.stderr, flush=True)
                if now >= give_up_at:
                    raise self._unavailable(exc, request_id) from exc
                delay = min(_MAX_DELAY_S, _FIRST_DELAY_S * 2 ** attempt)
                await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), give_up_at - now))
                attempt += 1

    async def _once(self, method: str, path: str, body: Any, params: dict | None,
                    headers: dict, timeout_s: float, raw: bool) -> Any:
        # Bodies go as msgpack and answers are asked for in msgpack: a result
        # holds a float per token (logprobs), which JSON encodes and parses at
        # several times msgpack's cost on both ends. curl and other clients that
        # do not ask keep getting JSON.
        headers = {**headers, "Accept": f"{MSGPACK}, application/json"}
        data_out = None
        if body is not None:
            try:
                data_out = msgpack.packb(body, use_bin_type=True)
                headers["Content-Type"] = MSGPACK
            except (OverflowError, TypeError, ValueError):
                # What msgpack cannot carry (an int beyond 64 bits) goes as JSON, for the
                # coordinator to answer as it does any value it refuses.
                data_out = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        async with self.session.request(
                method, self.base_url + path, data=data_out, params=params, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            data = await resp.read()
            if resp.status >= 400:
                try:
                    payload = _decode(data, resp.content_type)
                except ValueError:
                    payload = None
                raise error_from_json(resp.status, payload)
            if raw:
                return data
            return _decode(data, resp.content_type) if data else None

    def _unavailable(self, exc: BaseException, request_id: str | None
                     ) -> CoordinatorUnavailableError:
        base = (f"cannot reach the coordinator at {self.base_url} ({_cause(exc)}) for "
                f"{self.retry_window_s:g}s")
        if request_id is not None:
            return CoordinatorUnavailableError(
                f"{base}; request {request_id} was accepted: once the coordinator is back, "
                f"resume with client.wait({request_id!r})", request_id=request_id)
        return CoordinatorUnavailableError(
            f"{base}; the call was not confirmed, so it may or may not have been accepted: "
            "check the run (run.info()) before repeating it")


def _traced(method: str, path: str) -> str:
    """A call's name in a trace: its path with the ids left out."""
    parts = path.split("?")[0].strip("/").split("/")
    if len(parts) >= 3 and parts[1] in ("runs", "requests", "workers", "tasks"):
        parts[2] = "{id}"
    return f"{method} /{'/'.join(parts)}"
