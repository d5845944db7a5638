"""Typed application keys: what every handler may take from the app."""

from __future__ import annotations

from aiohttp import web

from rewardsignal.coordinator.api.auth import Auth
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.metrics import Metrics

COORDINATOR = web.AppKey("coordinator", Coordinator)
AUTH = web.AppKey("auth", Auth)
METRICS = web.AppKey("metrics", Metrics)
