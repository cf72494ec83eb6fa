"""Running one chat or completions request: wait for a batch slot, prefill, pace the tokens,
write them as SSE events or one JSON body, and inject the in-flight faults.

Commit point: a streaming response sends status 200 and its headers right after admission
control, before the slot wait and prefill (as vLLM does); from then on every failure is
in-band. A gone client surfaces as `asyncio.CancelledError` (handler cancellation) or
`ConnectionResetError` (next write); either way the engine slot is released on the way out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import shapes
from .config import FaultSpec, SimConfig
from .engine import Engine, QueueFull, Seq
from .errors import SimError
from .metrics import SimMetrics
from .prefix_cache import PrefixCache
from .protocol import GenerationRequest
from .text import token_text

Wait = Callable[[Awaitable[None]], Awaitable[None]]
FINISH_LENGTH = "length"
MALFORMED_EVENT = b"data: {not json\n\n"


@dataclass(frozen=True, slots=True)
class Sim:
    """Everything a request handler needs from its app."""

    config: SimConfig
    engine: Engine
    metrics: SimMetrics
    registry: CollectorRegistry
    prefix_cache: PrefixCache


def overloaded() -> SimError:
    return SimError(503, "The server is overloaded: too many requests are queued. Retry later.")


async def forever() -> None:
    """Wait until cancelled (the client disconnects): a hung engine."""
    await asyncio.get_running_loop().create_future()


async def stream(
    request: web.Request, sim: Sim, gen: GenerationRequest, fault: FaultSpec, header: shapes.Header
) -> web.StreamResponse:
    with _submitted(sim, gen) as seq:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        sse = SseWriter(response, sim.config.sse_keep_alive)
        with suppress(ConnectionResetError):  # the client left; leaving the block aborts
            await _stream_tokens(request, sim, gen, fault, header, seq, sse)
        return response


async def complete(
    request: web.Request, sim: Sim, gen: GenerationRequest, fault: FaultSpec, header: shapes.Header
) -> web.Response:
    with _submitted(sim, gen) as seq:
        texts: list[str] = []
        async with aclosing(decode(sim, gen, seq, fault, _plain_wait)) as tokens:
            if (broken := await _whole_fault(0, fault, request)) is not None:
                return broken
            async for text in tokens:
                texts.append(text)
                if (broken := await _whole_fault(len(texts), fault, request)) is not None:
                    return broken
        usage = shapes.usage(gen.prompt_tokens, len(texts))
        body = shapes.full_response(header, "".join(texts), FINISH_LENGTH, usage)
        return web.Response(body=orjson.dumps(body), content_type="application/json")


async def decode(
    sim: Sim, gen: GenerationRequest, seq: Seq, fault: FaultSpec, wait: Wait
) -> AsyncGenerator[str, None]:
    """Yield the request's tokens at the pace of the latency model, recording metrics.

    Marks `seq` finished only after the consumer asked for the token after the last one.
    """
    config, metrics = sim.config, sim.metrics
    await wait(seq.wait_admitted())
    last = time.monotonic()
    metrics.observe_queue(gen.model, last - seq.arrival)
    metrics.observe_prompt(gen.model, gen.prompt_tokens)
    prefill = config.prefill_seconds(gen.prompt_tokens - _prefix_cache_hit(sim, gen))
    await wait(asyncio.sleep(prefill + fault.slow_first_token))
    last = seq.arrival
    for i in range(gen.max_tokens):
        if i:
            await wait(asyncio.sleep(config.inter_token_seconds(sim.engine.num_running)))
        seq.generated += 1
        now = time.monotonic()
        metrics.observe_token(gen.model, now - last, first=i == 0)
        last = now
        yield token_text(gen.key, gen.start + i)
    seq.finish_reason = FINISH_LENGTH
    metrics.observe_finish(gen.model, FINISH_LENGTH, time.monotonic() - seq.arrival)


def _prefix_cache_hit(sim: Sim, gen: GenerationRequest) -> int:
    """Prompt tokens whose prefill the prefix cache saves; the prompt's blocks are cached now.

    At most `prompt_tokens`: the chat roles the cache also sees are not counted as tokens.
    """
    if not sim.prefix_cache.enabled:
        return 0
    hit = min(sim.prefix_cache.admit(gen.prompt, salt=gen.model), gen.prompt_tokens)
    sim.metrics.observe_prefix_cache(gen.model, gen.prompt_tokens, hit)
    return hit


class SseWriter:
    """Writes `data:` events; while waiting, sends `: keep-alive` comments if configured."""

    def __init__(self, response: web.StreamResponse, keep_alive: float | None) -> None:
        self._response = response
        self._keep_alive = keep_alive

    async def send(self, payload: shapes.Json) -> None:
        await self._response.write(b"data: " + orjson.dumps(payload) + b"\n\n")

    async def send_raw(self, data: bytes) -> None:
        await self._response.write(data)

    async def done(self) -> None:
        await self._response.write(b"data: [DONE]\n\n")

    async def wait(self, awaitable: Awaitable[None]) -> None:
        if self._keep_alive is None:
            await awaitable
            return
        task = asyncio.ensure_future(awaitable)
        try:
            while not (await asyncio.wait({task}, timeout=self._keep_alive))[0]:
                await self._response.write(b": keep-alive\n\n")
            task.result()
        finally:
            task.cancel()


async def _stream_tokens(
    request: web.Request,
    sim: Sim,
    gen: GenerationRequest,
    fault: FaultSpec,
    header: shapes.Header,
    seq: Seq,
    sse: SseWriter,
) -> None:
    async with aclosing(decode(sim, gen, seq, fault, sse.wait)) as tokens:
        if await _stream_fault(0, fault, request, sse):
            return
        sent = 0
        async for text in tokens:
            if sent == 0 and gen.kind == "chat":
                await sse.send(shapes.role_chunk(header))
            sent += 1
            finish = FINISH_LENGTH if sent == gen.max_tokens else None
            chunk = shapes.token_chunk(header, text, finish)
            if gen.continuous_usage:
                chunk["usage"] = shapes.usage(gen.prompt_tokens, sent)
            await sse.send(chunk)
            if await _stream_fault(sent, fault, request, sse):
                return
    if gen.include_usage:
        await sse.send(shapes.usage_chunk(header, shapes.usage(gen.prompt_tokens, sent)))
    await sse.done()


async def _stream_fault(sent: int, fault: FaultSpec, request: web.Request, sse: SseWriter) -> bool:
    """Apply the faults due after `sent` tokens; True when the stream must end here."""
    if fault.malformed_after == sent:
        await sse.send_raw(MALFORMED_EVENT)
    if fault.error_after == sent:
        await sse.send(_generation_error(sent).body())
        await sse.done()
        return True
    if fault.cut_after == sent:
        _cut(request)
        return True
    if fault.stall_after == sent:
        await sse.wait(forever())
    return False


async def _whole_fault(sent: int, fault: FaultSpec, request: web.Request) -> web.Response | None:
    """The non-streaming forms of the in-flight faults: a response that replaces the answer."""
    if fault.malformed_after == sent:
        return web.Response(body=MALFORMED_EVENT[6:-2], content_type="application/json")
    if fault.error_after == sent:
        return _generation_error(sent).response()
    if fault.cut_after == sent:
        _cut(request)
        return web.Response()  # never sent: the connection is already closing
    if fault.stall_after == sent:
        await forever()
    return None


def _generation_error(sent: int) -> SimError:
    return SimError(500, f"Simulated generation error after {sent} tokens (fault error_after).")


def _cut(request: web.Request) -> None:
    """Close the connection abruptly (no terminating chunk, no [DONE]); written data is flushed."""
    if request.transport is not None:
        request.transport.close()


async def _plain_wait(awaitable: Awaitable[None]) -> None:
    await awaitable


@contextmanager
def _submitted(sim: Sim, gen: GenerationRequest) -> Iterator[Seq]:
    """Hand the request to the engine; admission control rejects it with a 503 before any
    response starts."""
    try:
        with sim.engine.submit(gen.model, gen.prompt_tokens, gen.max_tokens) as seq:
            yield seq
    except QueueFull:
        sim.metrics.observe_rejection(gen.model, "max_num_queued_reqs")
        raise overloaded() from None
