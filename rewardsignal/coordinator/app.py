"""The aiohttp application factory."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from rewardsignal.coordinator.api import add_routes
from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR, METRICS
from rewardsignal.coordinator.api.auth import Auth
from rewardsignal.coordinator.api.channel import CHANNELS, Channels, close_channels
from rewardsignal.coordinator.api.middlewares import make_error_middleware
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.tinker import routes as tinker_routes


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
    app[CHANNELS] = Channels()

    async def lifecycle(app: web.Application):
        await coord.start()
        yield
        await coord.stop()
        auth.close()

    async def wake_long_polls(app: web.Application) -> None:
        coord.scheduler.close()
        coord.requests.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(wake_long_polls)
    app.on_shutdown.append(close_channels)
    add_routes(app)
    tinker_routes.add_routes(app)
    return app
