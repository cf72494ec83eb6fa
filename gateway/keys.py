"""Typed application keys: the one place that names what ``create_app`` puts on the app."""

from __future__ import annotations

from aiohttp import web

from gateway.discovery import Resolver
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.ratelimit_host import HostLimits
from gateway.settings import Settings
from gateway.workers import Fleet

SETTINGS = web.AppKey("settings", Settings)
FLEET = web.AppKey("fleet", Fleet)
METRICS = web.AppKey("metrics", GatewayMetrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
PROXY = web.AppKey("proxy", Proxy)
RESOLVER: web.AppKey[Resolver] = web.AppKey("resolver")
HOST_LIMITS = web.AppKey("host_limits", HostLimits)  # only with several serving processes
