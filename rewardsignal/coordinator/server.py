"""Running the coordinator as a process: bind, announce, serve until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from rewardsignal.coordinator.app import make_app
from rewardsignal.coordinator.config import CoordinatorConfig

log = logging.getLogger("signal.coordinator")


def _stored_keys(config: CoordinatorConfig) -> tuple[bool, bool]:
    from pathlib import Path

    from rewardsignal.coordinator.db import list_keys

    db = Path(config.data_dir) / "signal.db"
    if not db.exists():
        return False, False
    active = [k for k in list_keys(db) if k["revoked"] is None]
    return (any(k["scope"] == "user" for k in active),
            any(k["scope"] == "worker" for k in active))


async def serve(config: CoordinatorConfig) -> None:
    users, workers = _stored_keys(config)
    config.check_exposure(stored_user_keys=users, stored_worker_keys=workers)
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # the real port when --port 0
    if not (config.api_keys or users):
        log.warning("no API keys configured: serving loopback only, with no authentication")
    # Tests and the demo read this line to learn the port; keep its shape.
    print(f"signal coordinator listening on http://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()


def run(config: CoordinatorConfig) -> int:
    asyncio.run(serve(config))
    return 0
