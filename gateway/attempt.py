"""One attempt of a request on one worker, the same for a forwarded request, an embeddings
shard and a resumed stream: count it, bound it, send it, hand the answer to a reader, classify
how it ended, record that in the worker's health, release it.

What the attempt records, and where:
- ``worker.in_flight`` and the per-worker in-flight gauge, for the attempt's whole life;
- the half-open trial (``Fleet.begin_attempt``/``end_attempt``);
- ``worker.reading``, so a worker that stops listening can have its answers cut;
- the outcome in the worker's health: success, or a failure when the worker is at fault
  (``failover.worker_at_fault``, the one verdict the retry policy also uses), a cooldown when
  it asked for time, down at once when its address refuses connections (as a probe would
  find), and ``gateway_upstream_errors_total``.

Phases: a stream's attempt is bounded by the first-token timeout until the reader moves the
bound to the idle one; a timeout is classified by where the attempt stood (the client not
reading, no first token yet, or a silent worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.deadline import Deadline
from gateway.errors import (
    ClientTooSlow,
    FirstTokenTimeout,
    IdleTimeout,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.failover import worker_at_fault
from gateway.h1 import TransportError
from gateway.metrics import GatewayMetrics
from gateway.relay import Exchange
from gateway.retry import parse_retry_after
from gateway.settings import RetrySettings, TimeoutSettings
from gateway.upstream import ClientResponse, Upstream, gateway_error
from gateway.workers import Fleet, ProbeResult, Worker

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 64 * 1024

T = TypeVar("T")
# Reads the answer of a worker that said 200 (relays it, or reads it into memory).
Reader = Callable[[ClientResponse, Deadline], Awaitable[T]]


class Attempts:
    """Runs attempts for one gateway; see the module docstring."""

    def __init__(
        self,
        fleet: Fleet,
        upstream: Upstream,
        metrics: GatewayMetrics,
        timeouts: TimeoutSettings,
        retry: RetrySettings,
    ) -> None:
        self._fleet = fleet
        self._upstream = upstream
        self._metrics = metrics
        self._timeouts = timeouts
        self._retry = retry

    async def run(
        self,
        ex: Exchange,
        worker: Worker,
        path: str,
        body: bytes,
        headers: bytes,
        read: Reader[T],
        sick: Callable[[T], bool] = lambda _: False,
    ) -> T:
        """One attempt; returns what ``read`` returned, or raises the attempt's
        ``UpstreamError``. ``sick`` tells from that result whether the worker failed anyway
        (its own error event reached the client in-band)."""
        ex.worker, ex.attempts = worker, ex.attempts + 1
        self._fleet.begin_attempt(worker)
        try:
            result = await self._run(ex, worker, path, body, headers, read)
        except TransportError as exc:  # a reader's read of the body
            err = gateway_error(exc)
            self.record_failure(worker, err)
            raise err from exc
        except UpstreamError as err:
            self.record_failure(worker, err)
            raise
        else:
            if sick(result):
                self._metrics.upstream_errors.labels(worker.url, "upstream_stream_error").inc()
                self._fleet.record_failure(worker)
            else:
                self._fleet.record_success(worker)
            return result
        finally:
            self._fleet.end_attempt(worker)

    def record_failure(self, worker: Worker, err: UpstreamError) -> None:
        """The worker's health after a failed attempt: a cooldown when it asked for time, a
        failure towards ejection when it is at fault, and the error counted either way but
        for the client's own errors."""
        if isinstance(err, UpstreamStatusError):
            if err.status in (429, 503):
                self._cool_down(worker, err)
            if err.status < 500 and err.status != 429:
                return  # the client's doing, not the worker's
        self._metrics.upstream_errors.labels(worker.url, err.code).inc()
        if worker_at_fault(err):
            self._fleet.record_failure(worker)
        if isinstance(err, UpstreamConnectError) and err.refused and worker.healthy:
            # Nothing listens there: as a refused probe says, it is down until a probe passes,
            # so the next requests go elsewhere (or to a fallback) without trying it first.
            self._fleet.apply_probe(worker, ProbeResult(healthy=False, refused=True))

    def _cool_down(self, worker: Worker, err: UpstreamStatusError) -> None:
        wait = parse_retry_after(err.upstream_headers.get("Retry-After"), time.time())
        if wait is None or wait <= 0:
            return
        wait = min(wait, self._retry.max_retry_after)
        if worker.not_before <= self._fleet.clock():
            log.warning(
                "worker %s answered %d with Retry-After: no new request to it for %.1fs",
                worker.url, err.status, wait,
            )  # fmt: skip
        self._fleet.retry_later(worker, wait)

    async def _run(
        self,
        ex: Exchange,
        worker: Worker,
        path: str,
        body: bytes,
        headers: bytes,
        read: Reader[T],
    ) -> T:
        loop = ex.loop
        worker.in_flight += 1
        gauge = self._metrics.worker_in_flight_of(worker.url)
        gauge.inc()
        response: ClientResponse | None = None
        finished = False
        first_token = loop.time() + self._timeouts.first_token if ex.stream else None
        try:
            async with Deadline(first_token, loop) as phase:
                response = await self._upstream.send(worker, path, body, headers)
                worker.reading.add(response)
                if response.status != 200:
                    await self._raise_status(response, phase)
                result = await read(response, phase)
                finished = True
        except TimeoutError:
            if not phase.expired():
                raise
            if ex.writing:
                raise ClientTooSlow() from None
            if ex.first_token_at is None and ex.stream:
                raise FirstTokenTimeout() from None
            raise IdleTimeout() from None
        finally:
            worker.in_flight -= 1
            worker.finished += 1
            gauge.dec()
            if response is not None:
                worker.reading.discard(response)
                # release() keeps a fully read connection for reuse (drain: once the stream's
                # terminator after [DONE] is in); close() drops it, which is what tells vLLM
                # to abort the request when we stop early.
                response.release(drain=True) if finished else response.close()
        return result

    async def _raise_status(self, response: ClientResponse, phase: Deadline) -> None:
        phase.reschedule(phase.now() + self._timeouts.idle)
        try:
            data = await self._upstream.read_body(response, ERROR_BODY_LIMIT)
        except UpstreamDisconnected:
            data = b""  # the status decides; a cut error body must not make a 4xx retryable
        # Relayed bodies are OpenAI-shaped JSON (ours or the worker's): only Retry-After is kept.
        headers = {}
        if "Retry-After" in response.headers:
            headers["Retry-After"] = response.headers["Retry-After"]
        raise UpstreamStatusError(response.status, data, headers)
