"""Pass-through forwarding: vLLM routes whose answers the proxy's relay does not carry.

The proxy's relay knows OpenAI completion streams (``data:`` events ending in ``[DONE]``) and
JSON bodies. The Responses API and Anthropic's Messages stream typed events (``event:`` lines,
no ``[DONE]``), stored responses live on one worker, audio uploads are multipart bodies that
should stream, and ``/version`` is a GET. These go through here: one worker is chosen, the
request goes as it came (headers filtered as for the proxy), and the answer comes back as the
worker sent it, status and bytes.

What holds here as in the proxy: the key's rate limits (requests, tokens at an estimate of
the body's bytes / 4 plus the output tokens asked for, concurrency; the estimate stands, as no
usage is read here), an admission slot, the worker's in-flight count, a connect bound, an idle
bound between chunks, the total bound, the worker's error status relayed (an OpenAI-shaped 4xx
as it is), a failure after the commit ending a stream with one in-band error event in the
stream's own format, and a gone client closing the upstream request at once (the handler's
task is cancelled). What does not: retries (a streamed upload cannot be re-sent, a stored
response exists on one worker only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import (
    GatewayError,
    ModelNotFound,
    NoHealthyWorker,
    Overloaded,
    TotalTimeout,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.limits import Admission
from gateway.metrics import GatewayMetrics
from gateway.middleware import ACCESS_LOGGED, CLIENT, REQUEST_ID, access_log
from gateway.ratelimit import Grant, RateLimiter
from gateway.settings import Settings
from gateway.upstream import PassResponse, Upstream, passthrough_headers
from gateway.workers import Fleet, Worker

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 64 * 1024
# A JSON answer is read whole before the commit (so a cut answer is a clean 502, and the
# Responses API's id can be remembered); larger ones are relayed as they arrive.
WHOLE_BODY_LIMIT = 4 * 1024 * 1024
# Worker headers that describe the worker's hop or that aiohttp sets itself.
_HOP = frozenset(
    (
        "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
        "proxy-connection", "te", "trailer", "upgrade", "set-cookie",
    )
)  # fmt: skip
IN_BAND_WRITE_TIMEOUT = 1.0

Body = bytes | AsyncIterable[bytes] | None
# Sees the first bytes of a successful answer (up to WHOLE_BODY_LIMIT) and the worker.
OnAnswer = Callable[[bytes, Worker], None]


class Passthrough:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        upstream: Upstream,
        metrics: GatewayMetrics,
        admission: Admission,
        limiter: RateLimiter,
    ) -> None:
        self._settings = settings
        self._fleet = fleet
        self._upstream = upstream
        self._metrics = metrics
        self._admission = admission
        self._limiter = limiter
        self._rng = random.Random()  # noqa: S311 (tie-breaking, not secrets)

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    def pick(self, model: str) -> Worker:
        """The least busy worker for ``model`` that may take a request now."""
        if not self._fleet.serves(model):
            raise ModelNotFound(model)
        candidates = [w for w in self._fleet.candidates(model) if w.in_flight < w.cap]
        if not candidates:
            if self._fleet.candidates(model):
                raise Overloaded(retry_after=self._settings.limits.retry_after)
            raise NoHealthyWorker(retry_after=self._settings.limits.retry_after)
        least = min(w.in_flight for w in candidates)
        return self._rng.choice([w for w in candidates if w.in_flight == least])

    async def forward(
        self,
        request: web.Request,
        worker: Worker,
        route: str,
        model: str,
        *,
        method: str = "POST",
        path: str | None = None,
        body: Body = None,
        on_answer: OnAnswer | None = None,
        tokens: int | None = 0,
    ) -> web.StreamResponse:
        """Send the request to ``worker`` and relay its answer; ``route`` is the metric label.
        ``tokens``: the request's token estimate for its key's limits (None: not limited, for
        what asks no model for anything, such as ``/version``)."""
        started = time.monotonic()
        status, code = 0, ""
        try:
            if tokens is None:
                grant = Grant()
            else:
                grant = await self._limiter.acquire(request[CLIENT], model, tokens)
            try:
                async with self._admission.slot():
                    response = await self._bounded(
                        request, worker, method, path or request.path_qs, body, on_answer,
                        grant.headers,
                    )  # fmt: skip
            finally:
                await grant.settle(None)
            status = response.status
            return response
        except GatewayError as err:
            status, code = err.status, err.code
            raise
        except asyncio.CancelledError:
            status, code = 499, "client_disconnected"
            raise
        finally:
            self._observe(request, worker, route, model, status, code, started)

    def _observe(
        self,
        request: web.Request,
        worker: Worker,
        route: str,
        model: str,
        status: int,
        code: str,
        started: float,
    ) -> None:
        """Metrics and the access-log line, as the proxy's (what the pass-through does not
        read, tokens and the first token's time, left out)."""
        label = model if self._fleet.serves(model) else "unknown"
        duration = time.monotonic() - started
        client = request[CLIENT]
        self._metrics.requests_of(label, route, str(status), code).inc()
        self._metrics.client_requests_of(client.name, str(status)).inc()
        self._metrics.request_duration_of(label, route).observe(duration)
        request[ACCESS_LOGGED] = True
        if access_log.enabled():
            access_log.write(
                request.get(REQUEST_ID, "-"),
                {
                    "key": client.name,
                    "route": route,
                    "model": label,
                    "worker": worker.url,
                    "status": status,
                    "code": code,
                    "duration": round(duration, 4),
                },
            )

    async def _bounded(
        self,
        request: web.Request,
        worker: Worker,
        method: str,
        path: str,
        body: Body,
        on_answer: OnAnswer | None,
        limit_headers: dict[str, str],
    ) -> web.StreamResponse:
        headers = passthrough_headers(request.raw_headers, request[REQUEST_ID])
        out: web.StreamResponse | None = None
        worker.in_flight += 1
        try:
            async with asyncio.timeout(self._settings.timeouts.total) as bound:
                answer = await self._upstream.open(method, worker, path, headers, body)
                try:
                    out = await self._relay(request, answer, worker, on_answer, limit_headers)
                    return out
                finally:
                    answer.close()
        except TimeoutError:
            if not bound.expired():
                raise
            if out is not None and out.prepared:
                await _end_in_band(request, out, TotalTimeout())
                return out
            raise TotalTimeout() from None
        except UpstreamError as err:
            if out is not None and out.prepared:
                await _end_in_band(request, out, err)
                return out
            raise
        finally:
            worker.in_flight -= 1
            worker.finished += 1

    async def _relay(
        self,
        request: web.Request,
        answer: PassResponse,
        worker: Worker,
        on_answer: OnAnswer | None,
        limit_headers: dict[str, str],
    ) -> web.StreamResponse:
        if answer.status >= 400:
            data = await answer.read_all(ERROR_BODY_LIMIT)
            after = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
            raise UpstreamStatusError(answer.status, data, after)
        headers = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in _HOP)
        headers.update(limit_headers)  # x-ratelimit-*, as the proxy's answers carry them
        if "text/event-stream" not in answer.headers.get("Content-Type", ""):
            head = await answer.read_all(WHOLE_BODY_LIMIT + 1)
            if len(head) <= WHOLE_BODY_LIMIT:
                if on_answer is not None:
                    on_answer(head, worker)
                return web.Response(status=answer.status, body=head, headers=headers)
            chunks: AsyncIterator[bytes] = _prefixed(head, answer)
        else:
            chunks = _chunks(answer)
        out = web.StreamResponse(status=answer.status, headers=headers)
        seen = bytearray()
        async for chunk in chunks:
            if not out.prepared:
                await out.prepare(request)
            if on_answer is not None and len(seen) < WHOLE_BODY_LIMIT:
                seen += chunk
                if b"\n\n" in seen:  # the first whole event: enough for an id
                    on_answer(bytes(seen), worker)
                    on_answer = None
            await out.write(chunk)
        if not out.prepared:
            await out.prepare(request)
        await out.write_eof()
        return out


async def _chunks(answer: PassResponse) -> AsyncIterator[bytes]:
    while chunk := await answer.read_chunk():
        yield chunk


async def _prefixed(head: bytes, answer: PassResponse) -> AsyncIterator[bytes]:
    yield head
    async for chunk in _chunks(answer):
        yield chunk


async def _end_in_band(request: web.Request, out: web.StreamResponse, err: GatewayError) -> None:
    """After the commit: an SSE answer gets one error event in the Responses API's form (which
    Anthropic's SDK reads as an error too); any other answer is cut short by closing the
    connection, so it never looks complete."""
    log.warning("pass-through failed after commit: %s", err.code)
    if "text/event-stream" in out.headers.get("Content-Type", ""):
        event: dict[str, object] = {
            "type": "error",
            "code": err.code,
            "message": err.message,
            "param": err.param,
            "error": {"type": err.type, "message": err.message},
        }
        data = b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(IN_BAND_WRITE_TIMEOUT):
                await out.write(data)
                await out.write_eof()
                return
    if request.transport is not None:
        request.transport.close()
