"""Moving an answer from a worker to the client once the worker said 200: the commit point
(response headers to the client), the stream relay (held back until the first content event,
whole SSE events only, observed on the side, the transcript for a resume), the body relay, the
relay of a continuation spliced into a committed stream, and the idle bound on every write.

``Exchange`` is what one client request has gone through so far; the proxy and the relay both
write it, and the final observation (metrics, access log) reads it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from gateway.auth import OPEN_CLIENT, Client
from gateway.deadline import Deadline
from gateway.errors import (
    UpstreamAborted,
    UpstreamBadAnswer,
    UpstreamDisconnected,
    UpstreamMalformedEvent,
    UpstreamStreamError,
    UpstreamStreamTruncated,
)
from gateway.framing import EventFramer
from gateway.h1 import Closed
from gateway.metrics import GatewayMetrics
from gateway.pump import Pump
from gateway.request import Route
from gateway.resume import Splice, Transcript, scrub_token_ids, worker_fault
from gateway.settings import TimeoutSettings
from gateway.sse import StreamObserver
from gateway.upstream import ClientResponse
from gateway.usage import TAIL_BYTES, int_fields, usage_from_tail
from gateway.workers import Fleet, Worker

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
DONE_EVENT = b"data: [DONE]\n\n"
# Bytes held back before a stream's first token (role chunk, keep-alive comments); past this
# the stream commits anyway so a chatty worker cannot make the gateway buffer without end.
HOLD_LIMIT = 64 * 1024
# One SSE event larger than this is not a token chunk; the worker is broken.
MAX_EVENT_BYTES = 1024 * 1024
# A JSON answer up to this size is read and checked before it is relayed (see ``Relay.body``).
CHECKED_BODY_LIMIT = 8 * 1024 * 1024


class EventStream(web.StreamResponse):
    """The client's SSE response. Its head leaves with the held events in one write, not in a
    write of its own at ``prepare`` (aiohttp's default for a ``StreamResponse``): one system
    call and one wake-up of the client fewer per stream. Should a later aiohttp drop this class
    attribute, the head is sent at ``prepare`` again: one write more, the same bytes."""

    _send_headers_immediately = False


@dataclass(slots=True, eq=False)
class Exchange:
    """What one client request has gone through so far; read by the final observation."""

    request: web.Request
    route: Route
    started: float
    # The running loop, asked for once: on Python 3.11 each ``asyncio.get_running_loop()``
    # is a getpid() system call, and a request made about a dozen of them.
    loop: asyncio.AbstractEventLoop
    client: Client = OPEN_CLIENT  # whose key; its name goes to metrics and logs
    extra_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*, on success
    model: str = ""
    stream: bool = False
    strip_usage: bool = False
    single_choice: bool = True  # n is 1: one finish_reason means the answer is complete
    writing: bool = False  # awaiting a write to our client (a stall there is the client's)
    ending: bool = False  # the response's last chunk is queued: nothing may follow it
    response: web.StreamResponse | None = None
    worker: Worker | None = None
    served_model: str = ""  # the model that answered: a fallback's, when one was used
    transcript: Transcript | None = None  # what the client was sent, when it may be resumed
    scrub_ids: bool = False  # token ids were asked for by the gateway (resume), not the client
    status: int = 0
    code: str = ""
    attempts: int = 0
    first_token_at: float | None = None
    usage: dict[str, int] | None = None  # the worker's usage, when a stream carried it
    deadline: float = 0.0  # loop time the whole request must end by (``timeouts.total``)

    @property
    def committed(self) -> bool:
        return self.response is not None and self.response.prepared


# Reads a committed-to-be stream from a worker and writes it to the client; True when the
# worker's own error event reached the client in-band (the answer ended, but the worker failed).
RelayFn = Callable[["Exchange", ClientResponse, Deadline], Awaitable[bool]]


class Relay:
    """Relays for one gateway: stream, body and continuation; see the module docstring."""

    def __init__(self, metrics: GatewayMetrics, timeouts: TimeoutSettings, fleet: Fleet) -> None:
        self._metrics = metrics
        self._timeouts = timeouts
        self._fleet = fleet

    async def stream(self, ex: Exchange, response: ClientResponse, phase: Deadline) -> bool:
        loop = ex.loop
        observer = StreamObserver()
        sick = False
        held: list[bytes] = []
        held_size = 0
        while not observer.first_token and held_size <= HOLD_LIMIT:
            chunk = await response.read_chunk()
            if not chunk:
                raise UpstreamDisconnected("The model worker ended the stream before any token.")
            observer.feed(chunk)
            sick |= self._check_events(ex, observer)
            held.append(chunk)
            held_size += len(chunk)
        ex.first_token_at = loop.time()
        self._metrics.time_to_first_token_of(self.model_label(ex)).observe(
            ex.first_token_at - ex.started
        )
        idle = self._timeouts.idle
        phase.reschedule(loop.time() + idle)
        client = await self.commit(ex, EventStream(status=200, headers=SSE_HEADERS))
        framer = EventFramer(strip_usage=ex.strip_usage)
        transcript = ex.transcript
        out = framer.feed(b"".join(held))
        if transcript is not None:
            transcript.feed(out)
        out = self._scrubbed(ex, out)
        if observer.done:  # the whole answer was held: it leaves with the end, in one write
            last = out
        else:
            await self._send(ex, client, out, phase)
            # The head left with ``out``, unless that was empty: the pump writes to the
            # transport itself, so the head must be out first.
            self._writer(ex).send_headers()
            pump = Pump(
                response,
                self._transport(ex),
                chunked=self._writer(ex).chunked,
                observer=observer,
                framer=framer,
                transcript=transcript,
                scrub=ex.scrub_ids,
                check=functools.partial(self._check_events, ex),
                itl=self._metrics.inter_token_latency_of(self.model_label(ex)),
                phase=phase,
                idle=idle,
                max_event=MAX_EVENT_BYTES,
            )
            pump.start()
            try:
                while not await pump.settle():
                    ex.writing = True  # the client is not reading: a stall now is its own
                    await self._writer(ex).drain()
                    ex.writing = False
                    pump.unblock()
            except Closed as exc:
                if observer.finish_reason is None or not ex.single_choice:
                    raise UpstreamStreamTruncated() from exc
                # else cut after the answer was complete: finished below
            sick |= pump.sick
            last = pump.last
        observer.finish()
        self.count_usage(ex, observer.usage)
        if not observer.done:
            finished = observer.finish_reason is not None and ex.single_choice
            if not finished and observer.error is None:
                raise UpstreamStreamTruncated()
            # The answer was complete; only the marker was lost.
            last = self._scrubbed(ex, framer.flush()) + DONE_EVENT
        ex.ending = True
        ex.writing = True  # the last events and the terminator, one write
        await client.write_eof(last)
        ex.writing = False
        return sick

    @staticmethod
    def _writer(ex: Exchange) -> StreamWriter:
        writer = ex.request.writer
        assert isinstance(writer, StreamWriter)  # aiohttp's, which the server always uses
        return writer

    @staticmethod
    def _transport(ex: Exchange) -> asyncio.Transport:
        transport = ex.request.transport
        if transport is None:
            raise ConnectionResetError("the client's connection is gone")
        return transport

    def _scrubbed(self, ex: Exchange, out: bytes) -> bytes:
        return scrub_token_ids(out) if ex.scrub_ids else out

    def _check_events(self, ex: Exchange, observer: StreamObserver) -> bool:
        """A malformed event fails the attempt, and so does an ``abort`` ending (the worker is
        stopping: never an end the client may take for complete). So does a worker's own
        in-band error before the commit (another worker can answer) or when the stream can be
        resumed (the client never sees it); otherwise the client gets the worker's error event
        as it was sent, and this returns True: the attempt still counts against the worker."""
        if observer.malformed:
            raise UpstreamMalformedEvent()
        if observer.finish_reason == "abort":
            raise UpstreamAborted()
        error = observer.error
        if error is not None and worker_fault(error):
            if not ex.committed or ex.transcript is not None:
                raise UpstreamStreamError()
            return True
        return False

    async def continuation(
        self, ex: Exchange, response: ClientResponse, phase: Deadline, splice: Splice
    ) -> bool:
        """Relay a continuation as more chunks of the committed stream (see ``resume.py``)."""
        loop = ex.loop
        assert ex.response is not None and ex.transcript is not None
        client, transcript = ex.response, ex.transcript
        observer = StreamObserver()
        idle_armed = False
        while not splice.done:
            try:
                chunk = await response.read_chunk()
            except Closed as exc:
                if splice.finish_reason is not None:
                    break
                raise UpstreamStreamTruncated() from exc
            if not chunk:
                break
            observer.feed(chunk)
            self._check_events(ex, observer)
            out = splice.feed(chunk)
            if splice.first_token:
                deadline = loop.time() + self._timeouts.idle
                if idle_armed:
                    phase.extend(deadline)
                else:  # from the first-token bound to the idle one, which may come sooner
                    phase.reschedule(deadline)
                    idle_armed = True
            if out:
                transcript.feed(out)
                await self._send(ex, client, self._scrubbed(ex, out), phase)
        observer.finish()
        if not splice.done:
            if splice.finish_reason is None:
                raise UpstreamStreamTruncated()
            await self._send(ex, client, self._scrubbed(ex, splice.flush()) + DONE_EVENT, phase)
        self.count_usage(ex, splice.usage)
        ex.ending = True
        await client.write_eof()
        return False  # a worker's error event always fails a continuation (see _check_events)

    def count_usage(self, ex: Exchange, usage: dict[str, int] | None) -> None:
        if not usage:
            return
        ex.usage = usage
        model = self.model_label(ex)
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if tokens is not None and tokens >= 0:
                self._metrics.tokens_of(model, kind).inc(tokens)

    async def body(self, ex: Exchange, response: ClientResponse, phase: Deadline) -> bool:
        """A JSON answer. vLLM sends it whole once generated, so up to ``CHECKED_BODY_LIMIT`` it
        is read before the commit and must parse: a broken answer fails over instead of
        reaching the client as a 200. A larger one (embeddings) is relayed as it arrives."""
        loop = ex.loop
        idle = self._timeouts.idle
        phase.reschedule(loop.time() + idle)
        head: list[bytes] = []
        size = 0
        while size <= CHECKED_BODY_LIMIT and (chunk := await response.read_chunk()):
            phase.extend(loop.time() + idle)
            head.append(chunk)
            size += len(chunk)
        whole = size <= CHECKED_BODY_LIMIT
        data = b"".join(head)
        content_type = response.content_type or "application/json"
        if whole:
            try:
                answer = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamBadAnswer() from None
            if not isinstance(answer, dict):
                raise UpstreamBadAnswer()
            if _aborted(answer):
                raise UpstreamAborted()
            self.count_usage(ex, int_fields(answer.get("usage")))
            # A Response, not a StreamResponse: headers and body leave in one write.
            whole_answer = web.Response(status=200, body=data)
            whole_answer.headers["Content-Type"] = content_type
            client = await self.commit(ex, whole_answer)
            ex.ending = True
            ex.writing = True
            await client.write_eof()
            ex.writing = False
            return False
        out = web.StreamResponse(status=200)
        out.headers["Content-Type"] = content_type
        if response.content_length is not None:
            out.content_length = response.content_length
        client = await self.commit(ex, out)
        await self._send(ex, client, data, phase)
        tail = data[-TAIL_BYTES:]
        while chunk := await response.read_chunk():
            phase.extend(loop.time() + idle)
            tail = (tail + chunk)[-TAIL_BYTES:]
            await self._send(ex, client, chunk, phase)
        self.count_usage(ex, usage_from_tail(tail))
        ex.ending = True
        await client.write_eof()
        return False

    async def _send(
        self, ex: Exchange, client: web.StreamResponse, data: bytes, phase: Deadline
    ) -> None:
        """Write under the idle bound, then re-arm it for the next upstream read. A client that
        does not read is its own failure (``ClientTooSlow``), never the worker's."""
        ex.writing = True
        await client.write(data)
        ex.writing = False
        phase.extend(phase.now() + self._timeouts.idle)

    async def commit(self, ex: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        ex.response = response
        ex.status = response.status
        response.headers.update(ex.extra_headers)
        await response.prepare(ex.request)
        return response

    def model_label(self, ex: Exchange) -> str:
        # Only known model names become label values: clients choose the string.
        return ex.model if ex.model and self._fleet.serves(ex.model) else "unknown"


def _aborted(answer: dict[str, object]) -> bool:
    choices = answer.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices
    )
