"""Process lifecycle: start serving, and on SIGTERM/SIGINT drain in a written, bounded order.

1. Readiness turns 503 at once (``Lifecycle.draining``); requests are still served, so the load
   balancer has ``server.shutdown_grace`` seconds to notice and stop sending.
2. Stop listening; a request that still arrives on a kept-alive connection gets 503.
3. Wait for requests in flight, streams included, up to ``server.drain_timeout``.
4. Cancel the stragglers: each ends with a ``shutting_down`` error (in-band if streaming).
5. Close connections and the upstream session; return, and the process exits 0.

A second signal skips what is left of the grace period. A serving process whose supervisor is
gone (its channel closed) drains as on SIGTERM.

Start-up (building the app, reading the keys file, the first probes, listening) either
completes, and a serving process tells its supervisor it is ready, or raises ``StartFailed``
with a one-line reason, which a serving process also tells its supervisor.

Test hook: with ``GATEWAY_TEST_HANG_ON_SIGUSR1=1`` in its environment a serving process
blocks its event loop for good on SIGUSR1, as a stuck loop would (``tests/test_processes.py``
checks that the supervisor's heartbeat replaces it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading

from aiohttp import web

from gateway.app import create_app
from gateway.channel import Channel
from gateway.lifecycle import Lifecycle
from gateway.preflight import BACKLOG
from gateway.protocol import GatewayRunner
from gateway.ratelimit_host import HostLimits
from gateway.settings import Settings

log = logging.getLogger(__name__)

ABORT_WAIT = 2.0  # for aborted requests to write their last error event
CLEANUP_TIMEOUT = 2.0
YOUNG_GC_THRESHOLD = 10_000  # tracked objects allocated, net of those freed, per young collection
HANG_HOOK = "GATEWAY_TEST_HANG_ON_SIGUSR1"


class StartFailed(Exception):
    """Start-up could not complete; the message is one line saying why."""


async def serve(
    settings: Settings,
    listener: socket.socket | None = None,
    *,
    metrics_dir: str | None = None,
    parent: socket.socket | None = None,
) -> None:
    """Serve on ``listener`` (bound by the command line or the supervisor; else bind host and
    port here) until a signal, then drain. With ``parent`` (its end of the channel to the
    supervisor) this is one of several serving processes: per-key limits are the supervisor's,
    metrics go to ``metrics_dir``, and it answers SIGTERM only (the parent turns a Ctrl-C into
    one SIGTERM).
    """
    channel = await Channel.over(parent) if parent is not None else None
    if channel is not None:
        channel.start(lambda message: None)  # the supervisor only pings (answered by Channel)
    lifecycle = Lifecycle()
    try:
        runner, site = await _start(settings, listener, lifecycle, metrics_dir, channel)
    except StartFailed as exc:
        if channel is not None:
            channel.note("failed", str(exc))
            await channel.close()
        raise
    try:
        await _serve_until_stopped(settings, lifecycle, runner, site, channel)
    finally:
        if channel is not None:
            await channel.close()
    log.info("stopped")


async def _start(
    settings: Settings,
    listener: socket.socket | None,
    lifecycle: Lifecycle,
    metrics_dir: str | None,
    channel: Channel | None,
) -> tuple[web.AppRunner, web.BaseSite]:
    host_limits = HostLimits(channel) if channel is not None else None
    app = create_app(
        settings, lifecycle=lifecycle, metrics_dir=metrics_dir, host_limits=host_limits
    )
    runner = GatewayRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=CLEANUP_TIMEOUT
    )
    site: web.BaseSite
    try:
        await runner.setup()
        if listener is not None:
            # It listens here: a serving process's socket is bound, not yet listening, so the
            # kernel sends it connections only once it can serve them.
            site = web.SockSite(runner, listener, backlog=BACKLOG)
        else:
            site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=BACKLOG)
        await site.start()
    except (OSError, ValueError) as exc:
        await runner.cleanup()
        raise StartFailed(one_line(exc)) from exc
    if channel is not None:
        channel.note("ready")
    return runner, site


def one_line(exc: BaseException) -> str:
    """An exception as one line: the file or address it concerns and why."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _serve_until_stopped(
    settings: Settings,
    lifecycle: Lifecycle,
    runner: web.AppRunner,
    site: web.BaseSite,
    channel: Channel | None,
) -> None:
    child = channel is not None
    # What start-up built (settings, routes, metrics, the imported modules) lives as long as
    # the process: frozen out of the collector's sight, a full collection (22 ms here
    # before, 0 after) walks only what requests leave behind.
    gc.collect()
    gc.freeze()
    # A request allocates hundreds of tracked objects, nearly all freed by reference counting.
    # At the default threshold (700 more allocated than freed) the youngest generation was
    # collected every few requests, each time walking the young objects the in-flight requests
    # hold: about 2 % of the serving thread's time under 64 paced streams. A higher threshold
    # makes that walk rarer; what it would leave waiting longer is cyclic garbage, and a
    # request leaves none that holds its body (tests/test_cycles.py).
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    log.info("listening on %s", " ".join(_addresses(runner)))

    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM,) if child else (signal.SIGTERM, signal.SIGINT)
    if child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.environ.get(HANG_HOOK) == "1":
            loop.add_signal_handler(signal.SIGUSR1, _hang)
    for sig in handled:
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    orphaned = asyncio.create_task(_orphaned(channel, signals)) if channel else None
    try:
        received = await signals.get()
        log.info("received %s: draining", signal.Signals(received).name)
        await _drain(settings, lifecycle, site, signals)
    finally:
        if orphaned is not None:
            orphaned.cancel()
        await runner.cleanup()
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _orphaned(channel: Channel, signals: asyncio.Queue[int]) -> None:
    await channel.closed.wait()
    log.error("the supervisor is gone: stopping")
    signals.put_nowait(signal.SIGTERM)


def _hang() -> None:
    """The test hook: block the event loop, as a stuck loop would, until the process dies."""
    log.warning("%s: blocking the event loop on purpose", HANG_HOOK)
    threading.Event().wait()


async def _drain(
    settings: Settings, lifecycle: Lifecycle, site: web.BaseSite, signals: asyncio.Queue[int]
) -> None:
    lifecycle.draining = True
    try:
        async with asyncio.timeout(settings.server.shutdown_grace):
            await signals.get()
            log.info("second signal: skipping the rest of the grace period")
    except TimeoutError:
        pass
    lifecycle.accepting = False
    await site.stop()
    if await lifecycle.wait_idle(settings.server.drain_timeout):
        log.info("drained")
        return
    aborted = lifecycle.abort_all()
    log.warning("drain timeout: aborting %d requests in flight", aborted)
    await lifecycle.wait_idle(ABORT_WAIT)


def _addresses(runner: web.AppRunner) -> list[str]:
    return [f"http://{host}:{port}" for host, port, *_ in runner.addresses]
