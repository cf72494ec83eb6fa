"""The application factory: routes, middlewares, typed keys and owned resources.

``create_app`` builds everything from the settings it is given; nothing lives at module level,
so each test builds its own gateway. The client session and the health-probe task belong to
``cleanup_ctx``: created when the app starts, closed when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import handlers, keys
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.middleware import add_request_id_header, error_middleware, request_id_middleware
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.upstream import Upstream
from gateway.workers import Fleet, Worker, probe_all, probe_forever

# How often the loop-lag timer wakes: often enough to catch a stall of a few tens of ms within
# a scrape interval, rare enough to cost nothing.
LOOP_LAG_INTERVAL = 0.25


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    lifecycle: Lifecycle | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[request_id_middleware, error_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    metrics = GatewayMetrics(registry if registry is not None else CollectorRegistry())
    fleet = Fleet(settings.workers, settings.health.failures_to_eject)
    fleet.on_health_change = lambda worker: _export_health(metrics, worker)
    fleet.on_eject = lambda worker: metrics.worker_ejections.labels(worker.url).inc()
    for worker in fleet.workers:
        # Per-worker series exist from the start at zero, so rate() sees their first increase.
        metrics.upstream_connect.labels(worker.url)
        metrics.worker_in_flight.labels(worker.url)
        metrics.worker_ejections.labels(worker.url)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    app[keys.FLEET] = fleet
    app[keys.LIFECYCLE] = lifecycle if lifecycle is not None else Lifecycle()
    app.cleanup_ctx.append(_upstream_and_probes)
    app.cleanup_ctx.append(_loop_lag_timer)
    app.on_response_prepare.append(add_request_id_header)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/embeddings", handlers.embeddings)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/metrics", handlers.metrics)
    return app


def _export_health(metrics: GatewayMetrics, worker: Worker) -> None:
    metrics.worker_healthy.labels(worker.url).set(1 if worker.healthy else 0)


async def _upstream_and_probes(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    fleet = app[keys.FLEET]
    upstream = Upstream(settings.limits, settings.timeouts, settings.health, app[keys.METRICS])
    app[keys.PROXY] = Proxy(settings, fleet, upstream, app[keys.METRICS], app[keys.LIFECYCLE])
    # One probe round before serving, so /ready and /v1/models are true from the first request;
    # each probe is bounded by health.timeout, so a dead worker cannot hold the start up.
    await probe_all(fleet, upstream.probe)
    prober = asyncio.create_task(probe_forever(fleet, upstream.probe, settings.health.interval))
    try:
        yield
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        await upstream.close()


async def _loop_lag_timer(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(measure_loop_lag(app[keys.METRICS], LOOP_LAG_INTERVAL))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def measure_loop_lag(metrics: GatewayMetrics, interval: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(interval)
        metrics.event_loop_lag.observe(max(loop.time() - asked - interval, 0.0))
