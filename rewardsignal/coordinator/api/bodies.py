"""Reading request bodies and query parameters: size limits enforced as bytes
arrive, JSON or msgpack by content type, each problem a ``ValidationError``."""

from __future__ import annotations

import json
import math

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from rewardsignal.coordinator.api.appkeys import COORDINATOR
from rewardsignal.errors import ValidationError
from rewardsignal.protocol import MSGPACK, pack, unpack

MAX_WAIT_S = 120.0


def decode_body(raw: bytes | bytearray, content_type: str, max_bytes: int) -> object:
    if content_type == MSGPACK:
        return unpack(raw, max_bytes=max_bytes)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"body is not valid JSON: {exc}") from None


def reply(request: web.Request, body: object, *, status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    """``body`` as msgpack when the request's ``Accept`` names it (the SDK does:
    a result with a float per token encodes and parses several times faster),
    else as JSON (curl and any client that does not ask)."""
    if MSGPACK in request.headers.get("Accept", ""):
        return web.Response(body=pack(body), status=status, headers=headers,
                            content_type=MSGPACK)
    return web.json_response(body, status=status, headers=headers)


async def read_raw(request: web.Request) -> bytearray:
    """The request body, read without ``request.read()``'s cache.

    ``request.read()`` keeps the body on the request object, and aiohttp keeps a
    keep-alive connection's last request alive until the next request arrives on
    that connection. With 1,000 idle workers that pinned ~350 submitted 7 MB
    updates (2.4 GB, found with ``gc`` under ``bench/coordinator_load.py``). This
    buffer dies with the handler.
    """
    limit = request.app[COORDINATOR].config.max_body_bytes
    size = request.content_length
    if size is not None and size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    buf = bytearray(size or 0)
    view, filled = memoryview(buf), 0
    while chunk := await _next_chunk(request):
        end = filled + len(chunk)
        if end > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=end)
        if end <= len(buf):
            view[filled:end] = chunk
        else:  # no Content-Length (chunked): grow (aiohttp stops at a declared length)
            view.release()
            buf[filled:] = chunk
            view = memoryview(buf)
        filled = end
    view.release()
    if filled != len(buf):
        raise ValidationError(f"body ended after {filled} of {len(buf)} bytes")
    return buf


async def _next_chunk(request: web.Request) -> bytes:
    try:
        return await request.content.readany()
    except (ConnectionResetError, HttpProcessingError) as exc:
        # A sender that died mid-upload, or broken chunked framing: the sender's
        # problem, answered (if anyone is listening) rather than logged as ours.
        raise ValidationError(f"request body cut off or malformed: {exc}") from None


async def read_body(request: web.Request) -> object:
    return decode_body(await read_raw(request), request.content_type,
                       request.app[COORDINATOR].config.max_body_bytes)


_KEY_HEADERS = ("X-Idempotency-Key", "Idempotency-Key")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")


def idempotency_key(request: web.Request) -> str | None:
    """The caller's idempotency key (``X-Idempotency-Key``, or the standard
    ``Idempotency-Key``): 1-128 characters of letters, digits and ``-_.:``."""
    key = next((request.headers[h] for h in _KEY_HEADERS if h in request.headers), None)
    if key is None:
        return None
    if not 1 <= len(key) <= 128 or not set(key) <= _KEY_CHARS:
        raise ValidationError("X-Idempotency-Key must be 1-128 characters of letters, digits "
                              "and '-_.:'")
    return key


def query_float(request: web.Request, key: str, default: float, hi: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError(f"query parameter {key} must be a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValidationError(f"query parameter {key} must be >= 0")
    return min(value, hi)
