"""Error mapping (domain exceptions -> JSON errors, in one place) and latency metrics."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from rewardsignal import tracing
from rewardsignal.errors import SignalError

log = logging.getLogger("signal.http")


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def make_error_middleware(metrics):
    @web.middleware
    async def errors(request: web.Request, handler):
        started = time.monotonic()
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        traced = tracing.enabled() and _traced(request, route_name)
        if traced:
            tracing.mark(f"coordinator: {traced} begins")
        try:
            return await handler(request)
        except SignalError as exc:
            return _json_error(exc.http_status, exc.code, exc.message)
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, "payload_too_large",
                               f"request body over the {request.app._client_max_size} byte "
                               "limit (coordinator --max-body-mb)")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
            return _json_error(exc.status, code, exc.reason or "error")
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _json_error(500, "internal", "internal error; see the coordinator log")
        finally:
            metrics.request_latency.labels(route_name, request.method).observe(
                time.monotonic() - started)
            if traced:
                tracing.mark(f"coordinator: {traced} handled")

    return errors


def _traced(request: web.Request, route_name: str) -> str:
    """A request's name in a trace: its route, with the operation it queues."""
    op = request.match_info.get("op")
    return f"{request.method} {route_name.replace('{op}', op) if op else route_name}"

