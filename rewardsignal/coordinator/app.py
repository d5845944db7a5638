"""The aiohttp application factory."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from rewardsignal.coordinator.auth import Auth
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.middlewares import make_error_middleware
from rewardsignal.coordinator.routes import AUTH, COORDINATOR, METRICS, add_routes
from rewardsignal.coordinator.service import Coordinator


def make_app(config: CoordinatorConfig, *, coordinator: Coordinator | None = None
             ) -> web.Application:
    metrics = coordinator.metrics if coordinator else Metrics()
    coord = coordinator or Coordinator(config, metrics)
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[make_error_middleware(metrics)])
    app[COORDINATOR] = coord
    auth = Auth(config.api_keys, config.worker_tokens, Path(config.data_dir) / "signal.db")
    app[AUTH] = auth
    app[METRICS] = metrics

    async def lifecycle(app: web.Application):
        await coord.start()
        yield
        await coord.stop()
        auth.close()

    async def wake_long_polls(app: web.Application) -> None:
        coord.scheduler.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(wake_long_polls)
    add_routes(app)
    return app
