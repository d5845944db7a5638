"""Open endpoints (health, metrics, the dashboard page) and the user's overview
endpoints (status, models, workers)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewardsignal._version import __version__
from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR, METRICS

_DASHBOARD = Path(__file__).parent.parent / "static" / "dashboard.html"


@cache
def _dashboard_html() -> bytes:
    # Read once (on the first request, then from memory): it ships with the package.
    return _DASHBOARD.read_bytes()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def metrics(request: web.Request) -> web.Response:
    request.app[COORDINATOR].tick()
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard(request: web.Request) -> web.Response:
    """The live dashboard: static HTML + JS (no CDN) that polls ``/v1/status``."""
    return web.Response(body=_dashboard_html(), content_type="text/html")


async def status(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    request.app[COORDINATOR].tick()
    return web.json_response(request.app[COORDINATOR].status(owner))


async def list_models(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    catalog = coord.config.models
    note = (f"only these (the operator's models file {catalog.path})" if catalog is not None
            else "any Hugging Face causal LM id is accepted too")
    return web.json_response({"models": await coord.models(), "note": note})


async def list_workers(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    workers = request.app[COORDINATOR].scheduler.workers.values()
    return web.json_response({"workers": [w.to_json() for w in workers]})
