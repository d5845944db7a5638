"""Running the coordinator as a process: bind, announce, serve until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from rewardsignal.coordinator.app import make_app
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.heap import limit_malloc_arenas, trim_forever
from rewardsignal.coordinator.store.lock import DataDirLock
from rewardsignal.errors import ConflictError
from rewardsignal.openmp import serial_by_default

log = logging.getLogger("signal.coordinator")

# Seconds handlers get to finish after SIGTERM before they are cancelled.
_SHUTDOWN_S = 3.0


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (bad framing, a broken chunk size)
    at ERROR with a traceback. On a public port anyone can send those: make them
    one WARNING line naming the sender and the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            detail = str(exc.message).strip().splitlines()[0] if exc.message else ""
            record.msg = f"{record.getMessage()}: malformed HTTP ({exc.code}) {detail}"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# One instance: addFilter ignores a filter already present, so serving twice in a
# process (tests) does not stack them.
_MALFORMED_REQUEST_FILTER = _MalformedRequestFilter()


def _stored_keys(config: CoordinatorConfig) -> tuple[bool, bool]:
    from pathlib import Path

    from rewardsignal.coordinator.store.keys import list_keys

    db = Path(config.data_dir) / "signal.db"
    if not db.exists():
        return False, False
    active = [k for k in list_keys(db) if k["revoked"] is None]
    return (any(k["scope"] == "user" for k in active),
            any(k["scope"] == "worker" for k in active))


async def serve(config: CoordinatorConfig) -> None:
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUEST_FILTER)
    lock = DataDirLock(config.data_dir)
    lock.acquire()  # before anything reads the database: one coordinator per directory
    try:
        await _serve_locked(config)
    finally:
        lock.release()


async def _serve_locked(config: CoordinatorConfig) -> None:
    users, workers = _stored_keys(config)
    config.check_exposure(stored_user_keys=users, stored_worker_keys=workers)
    app = make_app(config)
    # Long-polls are woken at shutdown; whatever handler is still running after
    # this long is cancelled (accepted requests are durable and re-run on restart).
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConflictError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc} "
                            f"(errno {exc.errno}); stop what holds the port or pick another "
                            "--port") from None
    port = runner.addresses[0][1]  # the real port when --port 0
    if not (config.api_keys or users):
        log.warning("no API keys configured: serving loopback only, with no authentication")
    # Tests and the demo read this line to learn the port; keep its shape.
    print(f"signal coordinator listening on http://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    trimmer = asyncio.create_task(trim_forever())
    await stop.wait()
    log.info("shutting down")
    trimmer.cancel()
    await asyncio.gather(trimmer, return_exceptions=True)
    await runner.cleanup()
    log.info("stopped")


def run(config: CoordinatorConfig) -> int:
    if not limit_malloc_arenas():
        log.debug("malloc arenas left at the C library's default")
    serial_by_default()  # small tensor jobs on one thread; big ones get the team
    asyncio.run(serve(config))
    return 0
