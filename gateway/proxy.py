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
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web

from gateway.attempt import Attempts
from gateway.balancer import Prompt, make_policy
from gateway.cutpoint import align
from gateway.deadline import Deadline
from gateway.errors import (
    ClientTooSlow,
    GatewayError,
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
    UpstreamError,
    UpstreamStatusError,
    WorkersCoolingDown,
)
from gateway.failover import Failover, Step
from gateway.fanout import merge, plan_shards
from gateway.kvindex import KVIndex
from gateway.lifecycle import Lifecycle
from gateway.limits import Admission
from gateway.logs import AccessLog
from gateway.metrics import GatewayMetrics
from gateway.middleware import ACCESS_LOGGED, CLIENT, REQUEST_ID, error_response
from gateway.prompttokens import Tokenizes
from gateway.ratelimit import RateLimiter
from gateway.relay import Exchange, Relay
from gateway.request import EMBEDDINGS, RequestMeta, Route, parse_request, with_model
from gateway.resume import CONTINUATION_PATH, Splice, Transcript, ask_for_token_ids
from gateway.retry import RetryBudget
from gateway.settings import Settings
from gateway.sse import encode_error_event
from gateway.upstream import ClientResponse, Upstream, forward_headers, with_rank
from gateway.workers import Fleet, Worker

log = logging.getLogger(__name__)
access_log = AccessLog("gateway.access")

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
        kv_index: KVIndex | None = None,
        tokenizers: Mapping[str, Tokenizes] | None = None,  # by model, for cache-aware routing
    ) -> None:
        # Built on the loop that serves it. Asked for here once: on Python 3.11 each
        # ``get_running_loop()`` (and ``current_task()`` without a loop) is a getpid() call.
        self._loop = asyncio.get_running_loop()
        self._settings = settings
        self._timeouts = settings.timeouts
        self._fleet = fleet
        self._upstream = upstream
        self._relay = Relay(metrics, settings.timeouts, fleet)
        self._attempts = Attempts(fleet, upstream, metrics, settings.timeouts, settings.retry)
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._limiter = limiter
        self._tokenizers = tokenizers
        routing = settings.routing
        self._rng = random.Random()  # noqa: S311 (jitter and sampling, not secrets)
        self._balancer = make_policy(
            routing.policy,
            routing.affinity,
            self._rng,
            routing.load_factor,
            kv_index,  # cache-aware routing (routing.kv_events)
            routing.kv_events.weight,
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
        loop = self._loop
        ex = Exchange(
            request=request, route=route, started=loop.time(), loop=loop, client=request[CLIENT]
        )
        task = asyncio.current_task(loop)
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
            try:
                return await self._fail(ex, err)
            finally:
                _drop_tracebacks(err)
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
        meta = parse_request(
            body, ex.route, self._settings.routing, self._settings.input, self._tokenizers
        )
        routing = self._settings.routing
        if routing.affinity == "session":
            header = ex.request.headers.get(routing.session_header)
            if header:
                meta = replace(meta, affinity_key=header)
        ex.model, ex.stream, ex.strip_usage = meta.model, meta.stream, meta.strip_usage
        ex.single_choice = meta.single_choice
        if meta.resumable and self._resume_wanted(ex.request):
            ex.transcript = Transcript()
            with_ids = ask_for_token_ids(meta.body, meta.data)
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
        loop = ex.loop
        queued = loop.time()
        async with self._admission.slot():
            self._metrics.queue_wait_batched.observe(loop.time() - queued)
            self._metrics.in_flight_batched.inc()
            try:
                shards = self._plan_fan_out(ex, meta)
                if shards:
                    await self._within_deadline(ex, self._fan_out(ex, shards))
                else:
                    await self._within_deadline(ex, self._forward(ex, meta))
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

    async def _within_deadline(self, ex: Exchange, work: Coroutine[Any, Any, None]) -> None:
        ex.deadline = ex.loop.time() + self._timeouts.total
        deadline = Deadline(ex.deadline, ex.loop)
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
        """Attempts until one succeeds or the retry policy (``failover``) says the failure is
        final. A failure after the commit point is resumed when it may be, else final."""
        headers = forward_headers(ex.request.raw_headers, ex.request[REQUEST_ID])
        self._budget.record_request()
        failover = self._failover(ex.model)
        step = failover.first()
        if step is None:
            raise self._nothing_available(ex.model)
        relay = self._relay.stream if ex.stream else self._relay.body
        last: UpstreamError | None = None
        while True:
            prompt = Prompt(step.model, meta.prompt_ids) if meta.prompt_ids else None
            worker = self._pick(step, meta.affinity_key, last, prompt)
            sent = (
                headers
                if prompt is None or prompt.rank is None
                else with_rank(headers, prompt.rank)
            )
            if step.model != ex.model and ex.served_model != step.model:
                self._metrics.fallbacks.labels(self._relay.model_label(ex), step.model).inc()
            ex.served_model = step.model
            body = meta.body if step.model == ex.model else with_model(meta.body, step.model)
            failover.started(step.model, worker)
            try:
                await self._attempts.run(
                    ex, worker, ex.route.path, body, sent, functools.partial(relay, ex), bool
                )
                return
            except UpstreamError as err:
                if ex.committed:
                    await self._resume(ex, failover, body, headers, meta.affinity_key, err)
                    return
                last = err
                step = await self._retry(ex, failover, err, worker)

    async def _retry(
        self, ex: Exchange, failover: Failover, err: UpstreamError, worker: Worker
    ) -> Step:
        """The next step after ``err``, once it is paid for from the retry budget and its wait
        is over; raises the final error when there is none."""
        step = failover.after(err, worker, time.time(), self._left(ex))
        if step is None:
            raise self._final_for(ex.model, err)
        if not self._budget.try_spend():
            self._metrics.retry_budget_exhausted.inc()
            raise self._final_for(ex.model, err)
        self._metrics.retries.labels(step.reason).inc()
        log.info(
            "retrying on %s (%s) after %s from %s, in %.2fs",
            step.worker.url if step.worker else "another worker", step.model, err.code,
            worker.url, step.wait,
        )  # fmt: skip
        if step.wait > 0:
            await asyncio.sleep(step.wait)
        return step

    def _failover(self, model: str) -> Failover:
        return Failover(
            self._fleet,
            self._settings.retry,
            self._chain(model),
            self._settings.context_fallbacks,
            self._rng,
        )

    def _pick(
        self,
        step: Step,
        key: str | None,
        last: UpstreamError | None,
        prompt: Prompt | None = None,  # its token ids, for cache-aware routing
    ) -> Worker:
        """The worker for ``step``. A worker never gets more requests than its cap (past that,
        the pool's wait would be a hidden queue): when every candidate is at it, a first
        attempt is ``Overloaded`` and a retry ends with the last failure."""
        if step.worker is not None:
            return step.worker
        worker = self._balancer.pick(
            [w for w in step.candidates if w.in_flight < w.cap], key, prompt
        )
        if worker is not None:
            return worker
        if last is not None:
            raise self._final_for(step.model, last)
        raise Overloaded(retry_after=self._settings.limits.retry_after)

    def _left(self, ex: Exchange) -> float:
        """Seconds left before the request's deadline."""
        return ex.deadline - ex.loop.time()

    def _final_for(self, model: str, err: UpstreamError) -> UpstreamError:
        """``err`` as the client gets it: a busy worker's 429 or 503 always with a
        ``Retry-After`` the client can honour."""
        if (
            isinstance(err, UpstreamStatusError)
            and err.status in (429, 503)
            and "Retry-After" not in err.upstream_headers
        ):
            err.upstream_headers["Retry-After"] = str(self._retry_hint(model))
        return err

    def _nothing_available(self, model: str) -> GatewayError:
        """Why no worker of the chain can take the request: every one that is up asked for
        time (``WorkersCoolingDown``, with the time left), or none is up."""
        wait = self._cooling(model)
        if wait is not None:
            return WorkersCoolingDown(retry_after=wait)
        return NoHealthyWorker(retry_after=self._settings.limits.retry_after)

    def _cooling(self, model: str) -> int | None:
        """Whole seconds until the first worker of the chain that is up and asked for time
        (``Retry-After``) may take requests again; None when none is cooling down."""
        now = self._fleet.clock()
        waits = [
            w.not_before - now
            for m in self._chain(model)
            for w in self._fleet.pool(m)
            if w.healthy and w.ejected_until is None and w.not_before > now
        ]
        return max(1, math.ceil(min(waits))) if waits else None

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
        failover: Failover,
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
            candidates = failover.others(ex.served_model)
            worker = self._balancer.pick([w for w in candidates if w.in_flight < w.cap], key)
            if worker is None:
                self._metrics.resumes.labels(model, "no_worker").inc()
                raise err
            if not self._budget.try_spend():
                self._metrics.retry_budget_exhausted.inc()
                self._metrics.resumes.labels(model, "budget").inc()
                raise err
            self._metrics.retries.labels(err.code).inc()
            log.warning(
                "resuming a stream on %s after %d tokens (%s)",
                worker.url, transcript.tokens, err.code,
            )  # fmt: skip
            await align(self._upstream, worker, ex.served_model, transcript, headers)
            continuation = transcript.continuation(body)
            splice = Splice(transcript, client_wants_usage=not ex.strip_usage)
            relay = functools.partial(self._relay.continuation, ex, splice=splice)
            failover.started(ex.served_model, worker)
            try:
                await self._attempts.run(
                    ex, worker, CONTINUATION_PATH, continuation, headers, relay
                )
            except UpstreamError as again:
                self._metrics.resumes.labels(model, "failed").inc()
                err = again
                continue
            self._metrics.resumes.labels(model, "resumed").inc()
            return
        raise err

    def _plan_fan_out(self, ex: Exchange, meta: RequestMeta) -> list[bytes] | None:
        size = self._settings.routing.embedding_shard_size
        if ex.route is not EMBEDDINGS or size <= 0:
            return None
        return plan_shards(meta.body, size, len(self._fleet.candidates(ex.model)))

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
        """One shard, with the same retry policy as a whole request but no fallback models
        (one answer is never merged from several models)."""
        failover = Failover(self._fleet, self._settings.retry, (ex.model,), {}, self._rng)
        step = failover.first()
        if step is None:
            raise self._nothing_available(ex.model)
        last: UpstreamError | None = None
        while True:
            free = [w for w in step.candidates if w not in taken]
            worker = self._pick(replace(step, candidates=free or step.candidates), None, last)
            failover.started(ex.model, worker)
            taken.append(worker)
            try:
                return await self._attempts.run(
                    ex, worker, ex.route.path, body, headers, self._read_shard
                )
            except UpstreamError as err:
                last = err
                step = await self._retry(ex, failover, err, worker)
            finally:
                taken.remove(worker)

    async def _read_shard(self, response: ClientResponse, phase: Deadline) -> bytes:
        """One whole embeddings answer, read into memory (bounded) to be merged."""
        phase.reschedule(phase.now() + self._timeouts.idle)
        data = await self._upstream.read_body(response, SHARD_BODY_LIMIT + 1)
        if len(data) > SHARD_BODY_LIMIT:
            raise UpstreamBadResponse("The model worker sent an oversized answer.")
        return data

    def _retry_hint(self, model: str) -> int:
        """Seconds until a worker of the chain can take requests again, for ``Retry-After``."""
        wait = self._cooling(model)
        return self._settings.limits.retry_after if wait is None else wait

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
        ex.request[ACCESS_LOGGED] = True
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


def _drop_tracebacks(err: BaseException | None) -> None:
    """Cut ``err`` and what it was raised from off the frames they went through. Those frames
    hold the request (its body too) and, where an error was kept (a retry keeps the last one),
    the error itself: a reference cycle, which only the cyclic collector frees, request body
    and all. Once the error is answered nothing reads its traceback."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        err.__traceback__ = None
        err = err.__cause__ or err.__context__


def _close(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _total_tokens(usage: dict[str, int] | None) -> int | None:
    if not usage:
        return None
    total = usage.get("total_tokens")
    if total is None:
        total = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    return total
