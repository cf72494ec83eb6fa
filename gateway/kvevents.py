"""Subscribing to each worker's KV-cache events (ZeroMQ) and keeping the index in step with them.

One `Subscriber` per worker: a SUB socket on the worker's publisher, read with pyzmq's asyncio
sockets (nothing blocks the loop), and a socket monitor that reports when the ZeroMQ handshake
with the publisher succeeds and when the connection drops. The index's entries for the worker
are right only while every batch since the engine started has been applied in order, so:

- on each handshake (first connect, reconnect, the worker restarted) the worker's entries are
  reset and the replay socket is asked for everything it still buffers, from sequence 0; what
  it returns is a suffix of the worker's history, so the index learns a true subset of the cache;
- a disconnect resets the worker's entries and marks them not live (the balancer falls back);
- a gap in the sequence numbers is filled from the replay socket; when it cannot be (no replay
  socket, timeout, the buffer moved on) the worker's entries are reset and rebuilt from there;
- a batch already applied (replay and live stream overlap) is dropped by its sequence number;
- ``AllBlocksCleared`` resets the worker's entries (the index does that itself).

`KVEvents` runs one subscriber per worker of the fleet, added and removed with the fleet. A
worker with several data-parallel engines (``ranks``) has one subscriber per engine, each on the
worker's endpoints with the port raised by the rank, and each engine is its own source in the
index: ``source(url, rank)``, the worker's URL for rank 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gateway.kvindex import source
from gateway.kvwire import (
    END_SEQ,
    Batch,
    Event,
    WireError,
    decode_message,
    encode_seq,
    rank_endpoint,
)

log = logging.getLogger(__name__)

REPLAY_TIMEOUT = 2.0  # seconds without a replayed batch before giving the replay up
HEARTBEAT_INTERVAL_MS = 2000
YIELD_EVERY = 64  # batches applied in a row before letting other tasks run
RETRY_MAX = 60.0  # seconds between attempts to start a failing subscriber, at most
ASK_TIMEOUT = 2.0  # seconds for a worker to say where its engines publish (endpoint: auto)
AUTO = "auto"
_PLACEHOLDER = re.compile(r"\{(host|port)(?:\+(\d+))?\}")


class Sink(Protocol):
    """Where a subscriber's batches go (the index)."""

    def apply(self, worker: str, events: Iterable[Event]) -> None: ...

    def reset(self, worker: str, live: bool) -> None: ...

    def forget(self, worker: str) -> None: ...

    def set_engines(self, url: str, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Endpoints:
    publisher: str
    replay: str | None
    topic: str = ""


def endpoint_for(template: str, worker_url: str) -> str:
    """A ZeroMQ endpoint for the worker from a template with ``{host}``, ``{port}`` (the worker's
    HTTP port) and ``{port+N}``: ``tcp://{host}:5557`` for one worker per host (pods),
    ``tcp://{host}:{port+1000}`` for several workers on one host."""
    parts = urlsplit(worker_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)

    def fill(match: re.Match[str]) -> str:
        if match.group(1) == "host":
            return host
        return str(port + int(match.group(2) or 0))

    return _PLACEHOLDER.sub(fill, template)


@dataclass(slots=True)
class Counts:
    """What a subscriber went through, for tests and (later) metrics."""

    batches: int = 0
    duplicates: int = 0
    gaps: int = 0
    replays: int = 0
    resets: int = 0
    bad_messages: int = 0
    connects: int = 0
    exported_resets: int = 0  # the resets already added to the gateway's counter


class Subscriber:
    """One worker's event stream, applied to the sink in sequence order."""

    def __init__(
        self,
        worker: str,
        endpoints: Endpoints,
        sink: Sink,
        ctx: zmq.asyncio.Context,
        replay_timeout: float = REPLAY_TIMEOUT,
        rank: int | None = None,
    ) -> None:
        self.worker = worker
        # With data parallelism, the rank this engine's batches must name: ports that point at
        # another engine (workers on one host, too close together) must not mix two caches.
        self.rank = rank
        self.endpoints = endpoints
        self.counts = Counts()
        self.synced = asyncio.Event()  # set after each connect's replay; tests wait on it
        self._sink = sink
        self._ctx = ctx
        self._replay_timeout = replay_timeout
        self._expected: int | None = None  # next sequence number; None: take whatever comes

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.endpoints.topic.encode())
        # Heartbeats find a publisher that vanished without closing its connection (a host
        # gone): the disconnect then marks the worker's entries not live.
        sub.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_INTERVAL_MS)
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_INTERVAL_MS)
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoints.publisher)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll())
                # Connection news first: a restarted publisher's first batches must not be
                # taken as duplicates of the old one's.
                if monitor in ready:
                    await self._on_monitor(await monitor.recv_multipart(), sub)
                if sub in ready:
                    await self._on_live(await sub.recv_multipart())
        finally:
            self._sink.reset(self.worker, live=False)
            if not sub.closed:  # the context may have been destroyed under it
                sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _on_monitor(self, frames: list[bytes], sub: zmq.asyncio.Socket) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_DISCONNECTED:
            log.info("kv events: %s disconnected", self.worker)
            self.synced.clear()
            self._reset(live=False)
            return
        self.counts.connects += 1
        self._reset(live=True)
        # Batches still queued may come from the publisher before a restart; anything the new
        # one already sent is in the replay that follows.
        while await sub.poll(0):
            await sub.recv_multipart()
        await self._fill(0, None)
        self.synced.set()

    async def _on_live(self, frames: list[bytes]) -> None:
        try:
            batch = decode_message(frames)
        except WireError as exc:
            self.counts.bad_messages += 1
            log.warning("kv events: %s sent a bad message: %s", self.worker, exc)
            return
        if self._foreign(batch):
            return
        expected = self._expected
        if expected is not None and batch.seq < expected:
            self.counts.duplicates += 1
            return
        if expected is not None and batch.seq > expected:
            self.counts.gaps += 1
            await self._fill(expected, batch.seq)
            if self._expected is not None and self._expected != batch.seq:
                self._reset(live=True)
        self._apply(batch)

    async def _fill(self, start: int, stop: int | None) -> None:
        """Applies the replayed batches from ``start`` up to ``stop`` (exclusive); when the
        replay does not start at ``start`` the worker is reset first, so what the index holds
        stays a true subset of the cache."""
        batches = [b for b in await self._replay(start) if not self._foreign(b)]
        if stop is not None:
            batches = [b for b in batches if b.seq < stop]
        if stop is not None and (not batches or batches[0].seq != start):
            self._reset(live=True)  # a gap left open: what came before is not trustworthy
        for count, batch in enumerate(batches, 1):
            if self._expected is not None and batch.seq < self._expected:
                continue
            if self._expected is not None and batch.seq > self._expected:
                self._reset(live=True)  # a hole inside the replay itself
            self._apply(batch)
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a long replay must not hold the loop

    def _foreign(self, batch: Batch) -> bool:
        """A batch from another data-parallel engine than this subscriber's: counted as bad
        and left out."""
        if self.rank is None or batch.rank is None or batch.rank == self.rank:
            return False
        self.counts.bad_messages += 1
        log.warning(
            "kv events: %s is published by data-parallel rank %d, expected %d: are the "
            "workers' event ports at least data_parallel_size apart?",
            self.worker, batch.rank, self.rank,
        )  # fmt: skip
        return True

    def _apply(self, batch: Batch) -> None:
        self._sink.apply(self.worker, batch.events)
        self._expected = batch.seq + 1
        self.counts.batches += 1

    def _reset(self, live: bool) -> None:
        self.counts.resets += 1
        self._expected = None
        self._sink.reset(self.worker, live)

    async def _replay(self, start: int) -> list[Batch]:
        """Every batch the publisher still buffers from ``start`` on; [] without a replay
        socket, or when it does not answer in time."""
        if self.endpoints.replay is None:
            return []
        self.counts.replays += 1
        # A fresh socket per replay: answers to a replay given up on must not be read as
        # answers to the next one.
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        batches: list[Batch] = []
        try:
            dealer.connect(self.endpoints.replay)
            await dealer.send_multipart([b"", encode_seq(start)])
            while await dealer.poll(self._replay_timeout * 1000):
                frames = await dealer.recv_multipart()
                if len(frames) == 4 and frames[2] == END_SEQ:
                    return batches
                try:
                    batches.append(decode_message(frames[1:]))
                except WireError as exc:
                    self.counts.bad_messages += 1
                    log.warning("kv events: %s replayed a bad message: %s", self.worker, exc)
            log.warning("kv events: %s replay from %d timed out", self.worker, start)
            return batches
        finally:
            dealer.close(linger=0)


class KVSourcesError(ValueError):
    """A worker's ``/kv_event_sources`` answer names no engine we can subscribe to."""


def sources_plan(sources: object, worker_url: str) -> list[Endpoints]:
    """Each engine's sockets, rank by rank, from a ``/kv_event_sources`` answer."""
    if not isinstance(sources, dict) or not sources:
        raise KVSourcesError("the worker publishes no KV-cache events (/kv_event_sources: {})")
    try:
        by_rank = {int(rank): config for rank, config in sources.items()}
    except ValueError:
        raise KVSourcesError("/kv_event_sources: a rank that is not an integer") from None
    if sorted(by_rank) != list(range(len(by_rank))):
        raise KVSourcesError(f"/kv_event_sources: ranks {sorted(by_rank)}, expected 0..n-1")
    plan = []
    for rank in range(len(by_rank)):
        config = by_rank[rank]
        endpoint = config.get("endpoint") if isinstance(config, dict) else None
        if not isinstance(endpoint, str) or not endpoint:
            raise KVSourcesError(f"/kv_event_sources: rank {rank} has no endpoint")
        replay, topic = config.get("replay_endpoint"), config.get("topic", "")
        plan.append(
            Endpoints(
                _worker_host(endpoint, worker_url),
                _worker_host(replay, worker_url) if isinstance(replay, str) and replay else None,
                topic if isinstance(topic, str) else "",
            )
        )
    return plan


def _worker_host(endpoint: str, worker_url: str) -> str:
    """A bound endpoint (``tcp://*:5557``, any address) as a subscriber reaches it: at the
    worker's host. A concrete host is kept."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if sep and colon and host in ("*", "0.0.0.0", "[::]", ""):  # noqa: S104 (read, not bound)
        return f"{scheme}://{endpoint_for('{host}', worker_url)}:{port}"
    return endpoint


class KVEvents:
    """One subscriber per engine of each worker, feeding one sink; `sync` follows the fleet's
    membership.

    Each worker's engines and their sockets come from the endpoint templates and ``ranks``, or,
    with ``endpoint="auto"``, from what the worker itself says at ``GET /kv_event_sources``
    (vLLM's: each data-parallel rank's publisher settings), asked once per worker."""

    def __init__(
        self,
        sink: Sink,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str,
        ranks: int = 1,
    ) -> None:
        self._sink = sink
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic
        self.ranks = ranks
        self.auto = endpoint == AUTO
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # url: (in a row, no retry before)
        self._plans: dict[str, list[Endpoints]] = {}  # worker URL: its engines' sockets
        self._asking: dict[str, asyncio.Task[list[Endpoints]]] = {}  # auto: asked, no answer yet
        self._http: aiohttp.ClientSession | None = None
        self.subscribers: dict[str, Subscriber] = {}

    def endpoints(self, worker_url: str, rank: int = 0) -> Endpoints:
        replay = self._replay_endpoint
        return Endpoints(
            rank_endpoint(endpoint_for(self._endpoint, worker_url), rank),
            rank_endpoint(endpoint_for(replay, worker_url), rank) if replay is not None else None,
            self._topic,
        )

    async def sync(self, worker_urls: Sequence[str]) -> None:
        """Subscribers for exactly these workers. One that failed (a bad endpoint, a ZeroMQ
        error, a worker that could not say where it publishes) is started again after a pause
        that doubles with each failure in a row, and only its first failure is logged as an
        error."""
        now = asyncio.get_running_loop().time()
        for name, task in list(self._tasks.items()):
            if task.done():
                self._failed(name, task, now)
        urls = set(worker_urls)
        self._plan(urls, now)
        wanted = {
            source(url, rank): (url, rank, endpoints)
            for url, plan in self._plans.items()
            for rank, endpoints in enumerate(plan)
        }
        for name in self._tasks.keys() - wanted.keys():
            await self._stop(name)
            self._failures.pop(name, None)
            self._sink.forget(name)
        for name in wanted.keys() - self._tasks.keys():
            if now < self._failures.get(name, (0, 0.0))[1]:
                continue
            url, rank, endpoints = wanted[name]
            several = len(self._plans[url]) > 1
            subscriber = Subscriber(
                name, endpoints, self._sink, self._ctx, rank=rank if several else None
            )
            self.subscribers[name] = subscriber
            self._tasks[name] = asyncio.create_task(subscriber.run(), name=f"kv-events {name}")

    def _plan(self, urls: set[str], now: float) -> None:
        """Each worker's engines: from the templates, or (auto) from its answer."""
        for url in self._plans.keys() - urls:
            del self._plans[url]
            self._sink.set_engines(url, 0)
        for url in self._asking.keys() - urls:
            self._asking.pop(url).cancel()
        for url in urls - self._plans.keys():
            if not self.auto:
                self._planned(url, [self.endpoints(url, r) for r in range(self.ranks)])
                continue
            asking = self._asking.get(url)
            if asking is None:
                if now >= self._failures.get(url, (0, 0.0))[1]:
                    self._asking[url] = asyncio.create_task(self._ask(url), name=f"kv-ask {url}")
            elif asking.done():
                del self._asking[url]
                if asking.cancelled() or asking.exception() is not None:
                    self._failed(url, asking, now)
                else:
                    self._failures.pop(url, None)
                    self._planned(url, asking.result())

    def _planned(self, url: str, plan: list[Endpoints]) -> None:
        self._plans[url] = plan
        self._sink.set_engines(url, len(plan))

    async def _ask(self, url: str) -> list[Endpoints]:
        """The worker's engines' sockets, from vLLM's ``GET /kv_event_sources``: ``{rank:
        {endpoint, replay_endpoint, topic, ...}}``, a bound wildcard host read as the worker's."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT))
        async with self._http.get(url + "/kv_event_sources") as response:
            if response.status != 200:
                raise KVSourcesError(f"GET /kv_event_sources answered {response.status}")
            sources = await response.json(content_type=None)
        return sources_plan(sources, url)

    def _failed(self, url: str, task: asyncio.Task[Any], now: float) -> None:
        if url in self._tasks:
            del self._tasks[url], self.subscribers[url]
        error = None if task.cancelled() else task.exception()
        count = self._failures.get(url, (0, 0.0))[0] + 1
        self._failures[url] = (count, now + min(RETRY_MAX, 2.0**count))
        level = logging.ERROR if count == 1 else logging.DEBUG
        log.log(level, "kv events: %s failed (%d in a row): %r", url, count, error)

    async def follow(
        self,
        worker_urls: Callable[[], Sequence[str]],
        interval: float,
        report: Callable[[Subscriber], None] | None = None,
    ) -> None:
        """Keeps the subscribers in step with the fleet (discovery adds and removes workers),
        and reports on each of them every ``interval`` seconds."""
        while True:
            await self.sync(worker_urls())
            if report is not None:
                for subscriber in self.subscribers.values():
                    report(subscriber)
            await asyncio.sleep(interval)

    async def _stop(self, url: str) -> None:
        task = self._tasks.pop(url)
        del self.subscribers[url]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        for url in list(self._tasks):
            await self._stop(url)
        for asking in self._asking.values():
            asking.cancel()
        await asyncio.gather(*self._asking.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._ctx.destroy(linger=0)
