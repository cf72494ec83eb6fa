"""The request path: admit, pick a worker, send; the retry, fallback, resume and fan-out
policies; failure rendering and the one observation per request. Moving the answer's bytes is
``relay``'s; reading the request is ``request``'s.

The commit point is the moment response headers go to the client (``StreamResponse.prepare``).
Before it, a retryable failure moves the request to a worker it has not tried yet (within the
retry budget, after a jittered backoff, then to fallback models), and any failure becomes a
clean OpenAI-shaped error status. After it, the status can't change: a stream is resumed on
another worker when it may be (``resume``), else ends with one in-band error event, and a plain
body is cut off (the connection is closed, so the client sees an incomplete response rather
than a complete-looking wrong one).

A stream commits on its first content event, not on the worker's headers: vLLM sends 200 before
prefill, so holding the few bytes before the first token back lets a first-token timeout or an
early cut still fail over to another worker.

Phases: ``queue`` (admission), ``connect`` (in ``upstream``), ``first_token`` (attempt start to
the first content event, streams only), ``idle`` (largest gap between chunks), ``total`` (the
whole request, every attempt included).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from gateway.balancer import make_policy
from gateway.deadline import Deadline
from gateway.errors import (
    ClientTooSlow,
    FirstTokenTimeout,
    GatewayError,
    IdleTimeout,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NoHealthyWorker,
    Overloaded,
    PayloadTooLarge,
    RequestBodyTimeout,
    ShuttingDown,
    TotalTimeout,
    Unavailable,
    UnsupportedMediaType,
    UpstreamBadResponse,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamStatusError,
    UpstreamStreamError,
)
from gateway.fanout import merge, plan_shards
from gateway.lifecycle import Lifecycle
from gateway.limits import Admission
from gateway.logs import AccessLog
from gateway.metrics import GatewayMetrics
from gateway.middleware import CLIENT, REQUEST_ID, error_response
from gateway.ratelimit import RateLimiter
from gateway.relay import Exchange, Relay, RelayFn
from gateway.request import EMBEDDINGS, RequestMeta, Route, parse_request, with_model
from gateway.resume import CONTINUATION_PATH, Splice, Transcript, ask_for_token_ids
from gateway.retry import RetryBudget, backoff, parse_retry_after
from gateway.settings import Settings
from gateway.sse import encode_error_event
from gateway.upstream import ClientResponse, Upstream, forward_headers
from gateway.workers import Fleet, Worker

log = logging.getLogger(__name__)
access_log = AccessLog("gateway.access")

ERROR_BODY_LIMIT = 64 * 1024
IN_BAND_WRITE_TIMEOUT = 1.0
# One embeddings shard's answer is read into memory to be merged: bounded.
SHARD_BODY_LIMIT = 256 * 1024 * 1024


class Proxy:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        upstream: Upstream,
        metrics: GatewayMetrics,
        lifecycle: Lifecycle,
        limiter: RateLimiter,
    ) -> None:
        self._settings = settings
        self._timeouts = settings.timeouts
        self._fleet = fleet
        self._upstream = upstream
        self._relay = Relay(metrics, settings.timeouts, fleet)
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._limiter = limiter
        routing = settings.routing
        self._rng = random.Random()  # noqa: S311 (jitter and sampling, not secrets)
        self._balancer = make_policy(
            routing.policy, routing.affinity, self._rng, routing.load_factor
        )
        retry = settings.retry
        self._budget = RetryBudget(
            retry.budget_ratio, retry.budget_min, retry.budget_window, time.monotonic
        )
        limits = settings.limits
        self._admission = Admission(
            limits.max_in_flight, settings.timeouts.queue, limits.retry_after
        )

    @property
    def admission(self) -> Admission:
        return self._admission

    async def handle(self, request: web.Request, route: Route) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        ex = Exchange(request=request, route=route, started=loop.time(), client=request[CLIENT])
        task = asyncio.current_task()
        assert task is not None
        self._lifecycle.enter(task)
        try:
            return await self._run(ex)
        except asyncio.CancelledError:
            if not self._lifecycle.aborted(task):
                ex.status, ex.code = 499, "client_disconnected"
                raise
            task.uncancel()
            return await self._fail(ex, ShuttingDown())
        except GatewayError as err:
            return await self._fail(ex, err)
        except ConnectionError:
            # Writing to our own client failed: it went away (upstream errors are mapped).
            ex.status, ex.code = 499, "client_disconnected"
            return ex.response if ex.response is not None else web.Response(status=499)
        except Exception:
            log.exception("unhandled error in the request path")
            return await self._fail(ex, InternalError())
        finally:
            self._lifecycle.leave(task)
            self._observe(ex, loop.time())

    async def _run(self, ex: Exchange) -> web.StreamResponse:
        if not self._lifecycle.accepting:
            raise ShuttingDown()
        body = await self._read_body(ex.request)
        meta = parse_request(body, ex.route, self._settings.routing, self._settings.input)
        routing = self._settings.routing
        if routing.affinity == "session":
            header = ex.request.headers.get(routing.session_header)
            if header:
                meta = replace(meta, affinity_key=header)
        ex.model, ex.stream, ex.strip_usage = meta.model, meta.stream, meta.strip_usage
        ex.single_choice = meta.single_choice
        if meta.resumable and self._resume_wanted(ex.request):
            ex.transcript = Transcript()
            with_ids = ask_for_token_ids(meta.body)
            if with_ids is not None:
                meta, ex.scrub_ids = replace(meta, body=with_ids), True
        if not self._serves(meta.model):
            raise ModelNotFound(meta.model)
        grant = await self._limiter.acquire(ex.client, meta.model, meta.token_estimate)
        ex.extra_headers = grant.headers
        try:
            return await self._admitted(ex, meta)
        finally:
            await grant.settle(_total_tokens(ex.usage))

    async def _admitted(self, ex: Exchange, meta: RequestMeta) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queued = loop.time()
        async with self._admission.slot():
            self._metrics.queue_wait_batched.observe(loop.time() - queued)
            self._metrics.in_flight_batched.inc()
            try:
                shards = self._plan_fan_out(ex, meta)
                if shards:
                    await self._within_deadline(self._fan_out(ex, shards))
                else:
                    await self._within_deadline(self._forward(ex, meta))
            finally:
                self._metrics.in_flight_batched.dec()
        assert ex.response is not None
        return ex.response

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            raise UnsupportedMediaType()
        limit = self._settings.server.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(limit)
        try:
            if request.content.is_eof():
                # All in already (most bodies): nothing to wait for, so no timer, and the
                # buffered bytes as they are (read() copies them through a bytearray).
                body = request.content.read_nowait(-1)
                if len(body) > limit:
                    raise PayloadTooLarge(limit)
                return body
            # A client that sends its body slowly holds no admission slot, but it must not
            # hold a handler without end either.
            async with asyncio.timeout(self._timeouts.idle):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(limit) from None
        except TimeoutError:
            raise RequestBodyTimeout() from None
        except web.RequestPayloadError:
            # The body does not decode as its Content-Encoding says, or its framing is broken.
            raise InvalidRequest("The request body could not be read as sent.") from None

    async def _within_deadline(self, work: Coroutine[Any, Any, None]) -> None:
        deadline = Deadline(asyncio.get_running_loop().time() + self._timeouts.total)
        try:
            async with deadline:
                await work
        except TimeoutError:
            if deadline.expired():
                raise TotalTimeout() from None
            raise

    def _serves(self, model: str) -> bool:
        return any(self._fleet.serves(m) for m in self._chain(model))

    def _chain(self, model: str) -> tuple[str, ...]:
        return (model, *self._settings.fallbacks.get(model, ()))

    async def _forward(self, ex: Exchange, meta: RequestMeta) -> None:
        """Try the model's pool, then each fallback model's, until an attempt succeeds.

        Within a pool: at most ``retry.max_attempts`` attempts, never the same worker twice;
        each retry is taken from the retry budget and waits a jittered backoff first, unless
        the failed worker asked for time (``Retry-After``): then the request goes elsewhere at
        once. A fallback is used when a pool has no worker to try or failed retryably.
        """
        headers = forward_headers(ex.request.raw_headers, ex.request[REQUEST_ID])
        self._budget.record_request()
        last: UpstreamError | None = None
        for model in self._chain(ex.model):
            body = meta.body if model == ex.model else with_model(meta.body, model)
            for _ in range(self._settings.retry.max_attempts):
                worker = await self._next_worker(ex.tried, model, meta.affinity_key, last)
                if worker is None:
                    break
                if model != ex.model and ex.served_model != model:
                    self._metrics.fallbacks.labels(self._relay.model_label(ex), model).inc()
                ex.served_model = model
                try:
                    await self._attempt_on(ex, worker, body, headers)
                    return
                except UpstreamError as err:
                    if ex.committed:
                        await self._resume(ex, body, headers, meta.affinity_key, err)
                        return
                    if not err.retryable:
                        raise
                    last = err
        if last is not None:
            raise last
        raise NoHealthyWorker(retry_after=self._retry_hint(ex.model))

    def _resume_wanted(self, request: web.Request) -> bool:
        resume = self._settings.resume
        asked = request.headers.get(resume.header, "").strip().lower()
        if asked in ("1", "true", "yes", "on"):
            return True
        if asked in ("0", "false", "no", "off"):
            return False
        return resume.enabled

    async def _resume(
        self,
        ex: Exchange,
        body: bytes,
        headers: bytes,
        key: str | None,
        err: UpstreamError,
    ) -> None:
        """Finish a committed stream on other workers of the same model; re-raise ``err`` (the
        last failure) when that is not possible. Each continuation counts as a retry."""
        transcript = ex.transcript
        if transcript is None:
            raise err
        model = self._relay.model_label(ex)
        for _ in range(self._settings.resume.max_resumes):
            if not transcript.resumable:
                self._metrics.resumes.labels(model, "not_resumable").inc()
                raise err
            worker = await self._next_worker(ex.tried, ex.served_model, key, None)
            if worker is None:
                self._metrics.resumes.labels(model, "no_worker").inc()
                raise err
            if not self._budget.try_spend():
                self._metrics.retry_budget_exhausted.inc()
                self._metrics.resumes.labels(model, "budget").inc()
                raise err
            log.warning(
                "resuming a stream on %s after %d tokens (%s)",
                worker.url, transcript.tokens, err.code,
            )  # fmt: skip
            continuation = transcript.continuation(body)
            splice = Splice(transcript, client_wants_usage=not ex.strip_usage)
            relay = functools.partial(self._relay.continuation, splice=splice)
            try:
                await self._attempt_on(ex, worker, continuation, headers, relay, CONTINUATION_PATH)
            except UpstreamError as again:
                self._metrics.resumes.labels(model, "failed").inc()
                err = again
                continue
            self._metrics.resumes.labels(model, "resumed").inc()
            return
        raise err

    async def _next_worker(
        self, tried: list[Worker], model: str, key: str | None, last: UpstreamError | None
    ) -> Worker | None:
        """The worker for the next attempt, or None to move on; raises ``last`` when the retry
        budget is spent and ``Overloaded`` when every worker is at its cap."""
        if last is not None:
            if not self._fleet.candidates(model, tried):
                return None
            if not self._budget.try_spend():
                self._metrics.retry_budget_exhausted.inc()
                raise last
            self._metrics.retries.labels(last.code).inc()
            if not _asked_to_wait(last):
                retry = self._settings.retry
                await asyncio.sleep(
                    backoff(len(tried), retry.backoff_base, retry.backoff_max, self._rng)
                )
        candidates = self._fleet.candidates(model, tried)
        # A worker never gets more requests than its cap (at most its pooled connections):
        # past that, the connector's wait would be a hidden queue.
        open_ = [w for w in candidates if w.in_flight < w.cap]
        if candidates and not open_ and last is None and not tried:
            raise Overloaded(retry_after=self._settings.limits.retry_after)
        return self._balancer.pick(open_, key)

    async def _attempt_on(
        self,
        ex: Exchange,
        worker: Worker,
        body: bytes,
        headers: bytes,
        relay: RelayFn | None = None,
        path: str | None = None,
    ) -> None:
        ex.tried.append(worker)
        ex.worker, ex.attempts = worker, ex.attempts + 1
        self._fleet.begin_attempt(worker)
        try:
            await self._attempt(ex, worker, body, headers, relay, path or ex.route.path)
        except UpstreamError as err:
            self._count_failure(worker, err)
            raise
        else:
            if ex.worker_error:  # it answered, but with its own error: a sick worker
                self._count_failure(worker, UpstreamStreamError())
            else:
                self._fleet.record_success(worker)
        finally:
            self._fleet.end_attempt(worker)

    def _plan_fan_out(self, ex: Exchange, meta: RequestMeta) -> list[bytes] | None:
        size = self._settings.routing.embedding_shard_size
        if ex.route is not EMBEDDINGS or size <= 0:
            return None
        data = orjson.loads(meta.body)  # valid: parse_request read it already
        return plan_shards(data, size, len(self._fleet.candidates(ex.model)))

    async def _fan_out(self, ex: Exchange, shards: list[bytes]) -> None:
        """Send every shard at once, each with its own retries; all or nothing."""
        headers = forward_headers(ex.request.raw_headers, ex.request[REQUEST_ID])
        self._budget.record_request()
        taken: list[Worker] = []  # workers holding a shard now: others go elsewhere first
        tasks = [asyncio.create_task(self._shard(ex, body, headers, taken)) for body in shards]
        try:
            bodies = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        ex.served_model = ex.model
        ex.response = web.Response(
            body=merge(bodies), content_type="application/json", headers=ex.extra_headers
        )
        ex.status = 200

    async def _shard(self, ex: Exchange, body: bytes, headers: bytes, taken: list[Worker]) -> bytes:
        tried: list[Worker] = []
        last: UpstreamError | None = None
        for _ in range(self._settings.retry.max_attempts):
            avoid = tried + [w for w in taken if w not in tried]
            if not self._fleet.candidates(ex.model, avoid):
                avoid = tried
            worker = await self._next_worker(avoid, ex.model, None, last)
            if worker is None:
                break
            tried.append(worker)
            taken.append(worker)
            ex.worker, ex.attempts = worker, ex.attempts + 1
            try:
                return await self._attempt_buffered(worker, ex.route.path, body, headers)
            except UpstreamError as err:
                if not err.retryable:
                    raise
                last = err
            finally:
                taken.remove(worker)
        if last is not None:
            raise last
        raise NoHealthyWorker(retry_after=self._retry_hint(ex.model))

    async def _attempt_buffered(
        self, worker: Worker, path: str, body: bytes, headers: bytes
    ) -> bytes:
        """One whole non-streamed answer from one worker, read into memory (bounded)."""
        worker.in_flight += 1
        gauge = self._metrics.worker_in_flight_of(worker.url)
        gauge.inc()
        self._fleet.begin_attempt(worker)
        response: ClientResponse | None = None
        try:
            async with Deadline(None) as phase:
                response = await self._upstream.send(worker, path, body, headers)
                if response.status != 200:
                    await self._raise_status(response, phase)
                data = await self._upstream.read_body(response, SHARD_BODY_LIMIT + 1)
            if len(data) > SHARD_BODY_LIMIT:
                raise UpstreamBadResponse("The model worker sent an oversized answer.")
        except UpstreamError as err:
            self._count_failure(worker, err)
            raise
        else:
            self._fleet.record_success(worker)
            return data
        finally:
            worker.in_flight -= 1
            gauge.dec()
            self._fleet.end_attempt(worker)
            if response is not None:
                response.release()

    def _retry_hint(self, model: str) -> int:
        """Seconds until a worker of the chain can take requests again, for ``Retry-After``."""
        now = self._fleet.clock()
        waits = [
            w.not_before - now
            for m in self._chain(model)
            for w in self._fleet.pool(m)
            if w.healthy and w.not_before > now
        ]
        if not waits:
            return self._settings.limits.retry_after
        return max(1, math.ceil(min(waits)))

    def _count_failure(self, worker: Worker, err: UpstreamError) -> None:
        if isinstance(err, UpstreamStatusError):
            wait = parse_retry_after(err.upstream_headers.get("Retry-After"), time.time())
            if wait is not None and err.status in (429, 503):
                self._fleet.retry_later(worker, min(wait, self._settings.retry.max_retry_after))
            if not err.retryable and err.status < 500:
                return  # a 4xx is the client's doing, not a sign of a sick worker
            self._metrics.upstream_errors.labels(worker.url, err.code).inc()
            if err.worker_at_fault:  # busy (429, 503) is not sick
                self._fleet.record_failure(worker)
            return
        self._metrics.upstream_errors.labels(worker.url, err.code).inc()
        self._fleet.record_failure(worker)

    async def _attempt(
        self,
        ex: Exchange,
        worker: Worker,
        body: bytes,
        headers: bytes,
        relay: RelayFn | None,
        path: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        worker.in_flight += 1
        gauge = self._metrics.worker_in_flight_of(worker.url)
        gauge.inc()
        response: ClientResponse | None = None
        finished = False
        first_token_deadline = loop.time() + self._timeouts.first_token if ex.stream else None
        try:
            async with Deadline(first_token_deadline) as phase:
                response = await self._upstream.send(worker, path, body, headers)
                worker.reading.add(response)
                if response.status != 200:
                    await self._raise_status(response, phase)
                elif ex.stream:
                    await (relay or self._relay.stream)(ex, response, phase)
                else:
                    await self._relay.body(ex, response, phase)
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
            gauge.dec()
            if response is not None:
                worker.reading.discard(response)
                # release() keeps a fully read connection for reuse (drain: once the stream's
                # terminator after [DONE] is in); close() drops it, which is what tells vLLM
                # to abort the request when we stop early.
                response.release(drain=True) if finished else response.close()

    async def _raise_status(self, response: ClientResponse, phase: Deadline) -> None:
        phase.reschedule(asyncio.get_running_loop().time() + self._timeouts.idle)
        try:
            data = await self._upstream.read_body(response, ERROR_BODY_LIMIT)
        except UpstreamDisconnected:
            data = b""  # the status decides; a cut error body must not make a 4xx retryable
        # Relayed bodies are OpenAI-shaped JSON (ours or the worker's): only Retry-After is kept.
        headers = {}
        if "Retry-After" in response.headers:
            headers["Retry-After"] = response.headers["Retry-After"]
        raise UpstreamStatusError(response.status, data, headers)

    async def _fail(self, ex: Exchange, err: GatewayError) -> web.StreamResponse:
        ex.code = err.code
        if isinstance(err, Unavailable):
            self._metrics.rejections.labels(err.code).inc()
        if not ex.committed:
            ex.status = err.status
            response = error_response(err)
            if isinstance(err, ShuttingDown):
                response.force_close()
            return response
        assert ex.response is not None
        log.warning("request failed after commit: %s", err.code)
        if ex.stream and not ex.ending and not isinstance(err, ClientTooSlow):
            await self._write_in_band(ex, err)
        else:
            _close(ex.request)  # cut the body short: never a complete-looking answer
        return ex.response

    async def _write_in_band(self, ex: Exchange, err: GatewayError) -> None:
        assert ex.response is not None
        try:
            async with asyncio.timeout(IN_BAND_WRITE_TIMEOUT):
                await ex.response.write(encode_error_event(err.body()))
                await ex.response.write_eof()
        except (ConnectionError, TimeoutError):
            _close(ex.request)  # the client is gone or not reading; nothing more can be told
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # aiohttp keeps a drain future that an earlier interrupted write cancelled: the
            # client stopped reading. Not a cancellation of this task.
            _close(ex.request)

    def _observe(self, ex: Exchange, now: float) -> None:
        model = self._relay.model_label(ex)
        duration = now - ex.started
        self._metrics.requests_of(model, ex.route.name, str(ex.status), ex.code).inc()
        self._metrics.client_requests_of(ex.client.name, str(ex.status)).inc()
        self._metrics.request_duration_of(model, ex.route.name).observe(duration)
        if not access_log.enabled():
            return  # don't build the line's fields for nothing
        access_log.write(
            ex.request.get(REQUEST_ID, "-"),
            {
                "key": ex.client.name,
                "route": ex.route.name,
                "model": model,
                "stream": ex.stream,
                "worker": ex.worker.url if ex.worker else None,
                "served_model": ex.served_model or None,
                "attempts": ex.attempts,
                "status": ex.status,
                "code": ex.code,
                "ttft": round(ex.first_token_at - ex.started, 4) if ex.first_token_at else None,
                "duration": round(duration, 4),
                "retries": max(ex.attempts - 1, 0),
                "prompt_tokens": ex.usage.get("prompt_tokens") if ex.usage else None,
                "completion_tokens": ex.usage.get("completion_tokens") if ex.usage else None,
            },
        )


def _close(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _asked_to_wait(err: UpstreamError) -> bool:
    """The worker said when to come back: go elsewhere at once instead of backing off."""
    return isinstance(err, UpstreamStatusError) and "Retry-After" in err.upstream_headers


def _total_tokens(usage: dict[str, int] | None) -> int | None:
    if not usage:
        return None
    total = usage.get("total_tokens")
    if total is None:
        total = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    return total
