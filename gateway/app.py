"""The application factory: routes, middlewares, typed keys and owned resources.

``create_app`` builds everything from the settings it is given; nothing lives at module level,
so each test builds its own gateway. The client session and the health-probe task belong to
``cleanup_ctx``: created when the app starts, closed when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import admin, handlers, keys, routes
from gateway.auth import KeyRing, read_keys_file, watch_keys_file
from gateway.discovery import Resolver, ServiceWatcher, system_resolver, watch_forever
from gateway.kvevents import KVEvents, Subscriber
from gateway.kvindex import KVIndex
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.middleware import (
    CORS,
    COUNT_REFUSAL,
    KEYRING,
    add_cors_headers,
    add_request_id_header,
    auth_middleware,
    cors_middleware,
    encoding_middleware,
    error_middleware,
    expect_handler,
    request_id_middleware,
)
from gateway.monitor import probe_all, probe_forever, scrape_forever
from gateway.passthrough import Passthrough
from gateway.prompttokens import Tokenizes
from gateway.proxy import Proxy
from gateway.ratelimit import RateLimiter
from gateway.ratelimit_host import HostLimits
from gateway.settings import KVEventSettings, Settings
from gateway.tls import WorkerTls
from gateway.upstream import Upstream
from gateway.workers import Fleet, Worker, worker_from_settings

log = logging.getLogger(__name__)

# How often the loop-lag timer wakes: often enough to catch a stall of a few tens of ms within
# a scrape interval, rare enough to cost nothing.
LOOP_LAG_INTERVAL = 0.25
KV_EVENTS_FOLLOW_INTERVAL = 1.0  # seconds between matching event subscribers to the fleet
KV_EVENTS = web.AppKey("kv_events", KVEvents)  # present when routing.kv_events is on
KV_INDEX = web.AppKey("kv_index", KVIndex)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    lifecycle: Lifecycle | None = None,
    resolver: Resolver = system_resolver,
    metrics_dir: str | None = None,
    host_limits: HostLimits | None = None,
) -> web.Application:
    """``metrics_dir``: prometheus_client's multiprocess folder, and ``host_limits``: the
    per-key limits the supervisor keeps, when this is one of several serving processes (see
    ``supervisor``)."""
    app = web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            cors_middleware,
            encoding_middleware,
            auth_middleware,
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    metrics = GatewayMetrics(
        registry if registry is not None else CollectorRegistry(), multiprocess_dir=metrics_dir
    )
    cap = settings.limits.pool_per_worker
    fleet = Fleet((worker_from_settings(w, cap) for w in settings.workers), settings.health)
    fleet.on_health_change = lambda worker: _export_health(metrics, worker)
    fleet.on_eject = lambda worker: metrics.worker_ejections.labels(worker.url).inc()
    fleet.on_added = lambda worker: _export_worker(metrics, fleet, worker)
    fleet.on_removed = lambda worker: _forget_worker(metrics, fleet, worker)
    for worker in fleet.workers:
        _export_worker(metrics, fleet, worker)
    app[keys.SETTINGS] = settings
    app[KEYRING] = KeyRing(settings.auth)
    app[CORS] = settings.cors
    app[handlers.OPENAPI] = handlers.openapi_bytes(settings)
    app[keys.RESOLVER] = resolver
    app[keys.METRICS] = metrics
    app[COUNT_REFUSAL] = lambda code: metrics.rejections.labels(code).inc()
    app[keys.FLEET] = fleet
    app[keys.LIFECYCLE] = lifecycle if lifecycle is not None else Lifecycle()
    if host_limits is not None:
        app[keys.HOST_LIMITS] = host_limits
    app.cleanup_ctx.append(_api_keys)
    app.cleanup_ctx.append(_upstream_and_probes)
    app.cleanup_ctx.append(_loop_lag_timer)
    app.on_response_prepare.append(add_request_id_header)
    if settings.cors.allow_origins:
        app.on_response_prepare.append(add_cors_headers)
    posts = {
        "/v1/chat/completions": handlers.chat_completions,
        "/v1/completions": handlers.completions,
        "/v1/embeddings": handlers.embeddings,
    }
    gets = {
        "/v1/models": handlers.list_models,
        "/health": handlers.health,
        "/ready": handlers.ready,
        "/metrics": handlers.metrics,
        "/openapi.json": handlers.openapi_document,
    }
    for path, handler in posts.items():
        app.router.add_post(path, handler, expect_handler=expect_handler)
    for path, handler in gets.items():
        app.router.add_get(path, handler, expect_handler=expect_handler)
    routes.register(app, expect_handler)
    for path in admin.PATHS:
        app.router.add_post(path, admin.lora_adapter, expect_handler=expect_handler)
    return app


def _export_health(metrics: GatewayMetrics, worker: Worker) -> None:
    metrics.worker_healthy.labels(worker.url).set(1 if worker.in_rotation else 0)


def _export_worker(metrics: GatewayMetrics, fleet: Fleet, worker: Worker) -> None:
    # Per-worker series exist from the start at zero, so rate() sees their first increase.
    metrics.upstream_connect.labels(worker.url)
    metrics.worker_in_flight.labels(worker.url)
    metrics.worker_ejections.labels(worker.url)
    _export_health(metrics, worker)
    metrics.workers.set(len(fleet.workers))


def _forget_worker(metrics: GatewayMetrics, fleet: Fleet, worker: Worker) -> None:
    """A worker that left the fleet leaves the per-worker series too: pods come and go, and
    their series must not pile up in the gateway's memory and in Prometheus."""
    with contextlib.suppress(KeyError):
        metrics.worker_in_flight_of.remove(worker.url)
    for family in (
        metrics.upstream_connect,
        metrics.worker_ejections,
        metrics.worker_healthy,
    ):
        with contextlib.suppress(KeyError):
            family.remove(worker.url)
    for signal in LOAD_SIGNALS:
        with contextlib.suppress(KeyError):
            metrics.worker_load.remove(worker.url, signal)
    with contextlib.suppress(KeyError):
        metrics.kv_predicted_hit_tokens_of.remove(worker.url)
    for kv_family in (metrics.kv_events_live, metrics.kv_index_blocks, metrics.kv_events_resets):
        with contextlib.suppress(KeyError):
            kv_family.remove(worker.url)
    metrics.workers.set(len(fleet.workers))


LOAD_SIGNALS = ("waiting", "running", "kv_cache")


def _export_load(metrics: GatewayMetrics, fleet: Fleet, worker: Worker) -> None:
    if worker not in fleet.workers:
        return  # removed while its scrape was running
    load = worker.load
    if load is None:
        for signal in LOAD_SIGNALS:
            with contextlib.suppress(KeyError):
                metrics.worker_load.remove(worker.url, signal)
        return
    metrics.worker_load.labels(worker.url, "waiting").set(load.waiting)
    metrics.worker_load.labels(worker.url, "running").set(load.running)
    metrics.worker_load.labels(worker.url, "kv_cache").set(load.kv_cache)


async def _upstream_and_probes(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    fleet = app[keys.FLEET]
    metrics = app[keys.METRICS]
    tls = WorkerTls(settings.workers, settings.discovery.services)  # reads the TLS files
    upstream = Upstream(
        settings.limits, settings.timeouts, settings.health, metrics, settings.routing, tls
    )
    limiter = RateLimiter(settings.redis, metrics, host=app.get(keys.HOST_LIMITS))
    await limiter.start()
    kv_index, kv_events = _kv_events(settings.routing.kv_events)
    tokenizers = await _tokenizers(settings.routing.kv_events, kv_index)
    proxy = Proxy(
        settings, fleet, upstream, metrics, app[keys.LIFECYCLE], limiter, kv_index, tokenizers
    )
    app[keys.PROXY] = proxy
    app[routes.PASSTHROUGH] = Passthrough(
        settings, fleet, upstream, metrics, proxy.admission, limiter
    )
    watchers = [
        ServiceWatcher(
            fleet, service, app[keys.RESOLVER], upstream.probe, settings.limits.pool_per_worker
        )
        for service in settings.discovery.services
    ]
    for watcher in watchers:
        counter = metrics.discovery_errors.labels(watcher.source)
        watcher.on_error = counter.inc
    # One probe round before serving, so /ready and /v1/models are true from the first request;
    # each probe is bounded by health.timeout, so a dead worker cannot hold the start up.
    await asyncio.gather(probe_all(fleet, upstream.probe), *(w.sync() for w in watchers))
    tasks = [asyncio.create_task(probe_forever(fleet, upstream.probe, settings.health.interval))]
    if watchers:
        interval = settings.discovery.interval
        tasks.append(asyncio.create_task(watch_forever(watchers, interval)))
    if settings.routing.scrape_interval > 0:
        scrapes = scrape_forever(
            fleet,
            upstream.scrape,
            settings.routing.scrape_interval,
            lambda worker: _export_load(metrics, fleet, worker),
        )
        tasks.append(asyncio.create_task(scrapes))
    if kv_events is not None and kv_index is not None:
        app[KV_EVENTS], app[KV_INDEX] = kv_events, kv_index
        kv_index.on_prediction = functools.partial(_export_prediction, metrics)
        follow = kv_events.follow(
            lambda: [w.url for w in fleet.workers],
            KV_EVENTS_FOLLOW_INTERVAL,
            functools.partial(_export_kv, metrics, kv_index),
        )
        tasks.append(asyncio.create_task(follow))
    try:
        yield
    finally:
        await _stop(*tasks)
        if kv_events is not None:
            await kv_events.close()
        await upstream.close()
        await limiter.close()


def _export_prediction(metrics: GatewayMetrics, url: str, tokens: int) -> None:
    metrics.kv_predicted_hit_tokens_of(url).inc(tokens)


def _export_kv(metrics: GatewayMetrics, index: KVIndex, subscriber: Subscriber) -> None:
    url = subscriber.worker
    metrics.kv_events_live.labels(url).set(1 if index.live(url) else 0)
    metrics.kv_index_blocks.labels(url).set(index.blocks(url))
    resets = metrics.kv_events_resets.labels(url)
    resets.inc(subscriber.counts.resets - subscriber.counts.exported_resets)
    subscriber.counts.exported_resets = subscriber.counts.resets


def _kv_events(settings: KVEventSettings) -> tuple[KVIndex | None, KVEvents | None]:
    """The KV index and its subscribers when cache-aware routing is on."""
    if not settings.enabled:
        return None, None
    index = KVIndex(settings.max_blocks_per_worker)
    return index, KVEvents(
        index,
        settings.endpoint,
        settings.replay_endpoint,
        settings.topic,
        settings.data_parallel_size,
    )


async def _tokenizers(settings: KVEventSettings, index: KVIndex | None) -> dict[str, Tokenizes]:
    """The models' tokenizers for cache-aware routing, read before serving (off the loop); a
    file that cannot be read stops the start. Each asks the index before encoding a long new
    piece of a prompt whether anyone holds its head."""
    if not (settings.enabled and settings.tokenizers and index is not None):
        return {}
    try:
        from gateway.tokenizer import PromptTokenizer  # the optional `tokenizer` extra
    except ImportError as exc:
        raise RuntimeError(
            f"routing.kv_events.tokenizers needs pip install 'vllm-gateway[tokenizer]': {exc}"
        ) from exc
    loop = asyncio.get_running_loop()
    loaded: dict[str, Tokenizes] = {}
    for model, path in settings.tokenizers.items():
        tokenizer = await loop.run_in_executor(None, PromptTokenizer, path)
        tokenizer.probe = functools.partial(_held, index, model)
        loaded[model] = tokenizer
    return loaded


def _held(index: KVIndex, model: str, tokens: list[int], after: int) -> bool | None:
    return index.held(tokens, index.lora_of(model), after)


async def _api_keys(app: web.Application) -> AsyncIterator[None]:
    """Loads ``auth.keys_file`` before serving (a file that cannot be read stops the start)
    and then watches it; says at start-up when the gateway is open to anyone."""
    ring, auth = app[KEYRING], app[keys.SETTINGS].auth
    if not ring.enabled:
        log.warning("no API keys configured: the OpenAI routes are open to anyone")
    if auth.keys_file is None:
        yield
        return
    loop = asyncio.get_running_loop()
    ring.replace(await loop.run_in_executor(None, read_keys_file, auth.keys_file))
    task = asyncio.create_task(watch_keys_file(ring, auth.keys_file, auth.reload_interval))
    try:
        yield
    finally:
        await _stop(task)


async def _loop_lag_timer(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(measure_loop_lag(app[keys.METRICS], LOOP_LAG_INTERVAL))
    try:
        yield
    finally:
        await _stop(task)
        app[keys.METRICS].close()  # the last requests' batched updates, and any made later


async def measure_loop_lag(metrics: GatewayMetrics, interval: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(interval)
        metrics.event_loop_lag.observe(max(loop.time() - asked - interval, 0.0))


async def _stop(*tasks: asyncio.Task[None]) -> None:
    """Cancel background tasks and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
