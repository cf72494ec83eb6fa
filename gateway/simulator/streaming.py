"""Streaming one chat or completions answer as vLLM does: SSE events in vLLM's chunk shapes
(`shapes.py`), the role chunks first, tokens grouped as `--stream-interval` groups them, the
usage chunk and `[DONE]` last, and the in-flight faults and vLLM's abort ending in band.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from contextlib import aclosing, suppress

import orjson
from aiohttp import web

from . import shapes
from .config import FaultSpec
from .engine import Seq
from .faults import Faults
from .generate import (
    FINISH_ABORT,
    MALFORMED_EVENT,
    Sim,
    Step,
    cut,
    decode,
    echo_logprobs,
    generation_error,
    ids_of,
    joined_text,
    logprobs_of,
    submitted,
)
from .protocol import GenerationRequest
from .text import Token

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"


async def stream(
    request: web.Request, sim: Sim, gen: GenerationRequest, fault: FaultSpec, header: shapes.Header
) -> web.StreamResponse:
    with submitted(sim, gen) as seq:
        response = web.StreamResponse(
            headers={"Content-Type": SSE_CONTENT_TYPE, "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        sse = SseWriter(response, sim.config.sse_keep_alive)
        with suppress(ConnectionResetError):  # the client left; leaving the block aborts
            await Streamer(request, sim, gen, header, sse, Faults(fault)).run(seq)
        return response


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


class Streamer:
    """One streaming response: buffers each choice's tokens into chunks as vLLM's
    `--stream-interval` does (the first token alone, then `stream_interval` at a time, and
    whatever is left when the choice finishes), and writes the chunks in vLLM's shapes."""

    def __init__(
        self,
        request: web.Request,
        sim: Sim,
        gen: GenerationRequest,
        header: shapes.Header,
        sse: SseWriter,
        faults: Faults,
    ) -> None:
        self._request = request
        self._sim = sim
        self._gen = gen
        self._header = header
        self._sse = sse
        self._faults = faults
        self._interval = sim.config.stream_interval
        self._pending: list[list[Token]] = [[] for _ in range(gen.n)]
        self._sent = [0] * gen.n  # tokens sent, per choice
        self._finished = [False] * gen.n
        self._offsets = [0] * gen.n  # completions logprobs' text_offset, per choice
        self._started = False

    async def run(self, seq: Seq) -> None:
        gen = self._gen
        async with aclosing(
            decode(self._sim, gen, seq, self._faults.spec, self._sse.wait)
        ) as steps:
            ending = await self._apply_faults(0)
            if ending is None:
                async for step in steps:
                    ending = await self._step(step)
                    if ending is not None:
                        break
        if ending == "ended":
            return
        if not all(self._finished):
            await self._abort()
        if gen.include_usage:
            usage = shapes.final_usage(gen.prompt_tokens, sum(self._sent))
            await self._sse.send(shapes.usage_chunk(self._header, usage))
        await self._sse.done()

    async def _step(self, step: Step) -> str | None:
        before = sum(self._sent) + sum(map(len, self._pending))
        for token in step:
            self._pending[token.choice].append(token)
        await self._start()
        # A fault strikes after exactly its number of tokens, however they are chunked.
        boundary = self._faults.boundary(before, before + len(step))
        for choice in range(self._gen.n):
            if self._pending[choice] and (boundary or self._due(choice)):
                await self._flush(choice)
        return await self._apply_faults(sum(self._sent))

    def _due(self, choice: int) -> bool:
        sent, pending = self._sent[choice], len(self._pending[choice])
        return sent == 0 or pending >= self._interval or sent + pending == self._gen.max_tokens

    async def _start(self) -> None:
        """The chat role chunks, one per choice, before the first output (or the abort)."""
        if self._started:
            return
        self._started = True
        gen = self._gen
        if gen.kind != "chat":
            return
        ids = gen.prompt_ids if gen.return_token_ids else None
        for choice in range(gen.n):
            usage = self._running_usage(0)
            await self._sse.send(shapes.role_chunk(self._header, choice, ids, usage))

    async def _flush(self, choice: int) -> None:
        tokens, self._pending[choice] = self._pending[choice], []
        first = self._sent[choice] == 0
        self._sent[choice] += len(tokens)
        last = self._sent[choice] == self._gen.max_tokens
        finish = self._gen.finish_reason if last else None
        self._finished[choice] = last
        await self._send_piece(choice, tokens, first, finish)

    async def _abort(self) -> None:
        await self._start()
        for choice in range(self._gen.n):
            if self._finished[choice]:
                continue
            if self._pending[choice]:
                await self._flush(choice)
            await self._send_piece(choice, [], self._sent[choice] == 0, FINISH_ABORT)

    async def _send_piece(
        self, choice: int, tokens: Sequence[Token], first: bool, finish: str | None
    ) -> None:
        gen = self._gen
        if gen.kind == "chat":
            chunk = shapes.chat_chunk(self._header, self._chat_piece(choice, tokens, finish))
        else:
            piece = self._completion_piece(choice, tokens, first, finish)
            chunk = shapes.completion_chunk(self._header, piece)
        if gen.continuous_usage:
            chunk["usage"] = self._running_usage(self._sent[choice])
        elif finish is not None and not gen.include_usage:
            chunk["system_fingerprint"] = self._header.fingerprint
        await self._sse.send(chunk)

    def _chat_piece(self, choice: int, tokens: Sequence[Token], finish: str | None) -> shapes.Piece:
        gen = self._gen
        logprobs = None
        if gen.logprobs is not None:
            logprobs = shapes.chat_logprobs(logprobs_of(gen, tokens), gen.logprobs)
        return shapes.Piece(
            choice, joined_text(tokens), logprobs, ids_of(gen, tokens), finish_reason=finish
        )

    def _completion_piece(
        self, choice: int, tokens: Sequence[Token], first: bool, finish: str | None
    ) -> shapes.Piece:
        gen = self._gen
        echo = first and gen.echo
        text = (gen.prompt_text if echo else "") + ("" if gen.echo_only else joined_text(tokens))
        logprobs = None
        if gen.logprobs is not None:
            entries = echo_logprobs(gen) if echo else []
            if not gen.echo_only:
                entries += logprobs_of(gen, tokens)
            logprobs = shapes.completion_logprobs(entries, gen.logprobs, self._offsets[choice])
            if entries:
                self._offsets[choice] = logprobs["text_offset"][-1] + len(entries[-1].token)
        # vLLM sends the prompt's ids with a choice's first chunk when it echoes the prompt
        # (even without return_token_ids) or when asked for token ids.
        prompt_ids = gen.prompt_ids if first and (gen.echo or gen.return_token_ids) else None
        return shapes.Piece(choice, text, logprobs, ids_of(gen, tokens), finish, prompt_ids)

    def _running_usage(self, completion_tokens: int) -> shapes.Json | None:
        if not self._gen.continuous_usage:
            return None
        return shapes.running_usage(self._gen.kind, self._gen.prompt_tokens, completion_tokens)

    async def _apply_faults(self, sent: int) -> str | None:
        """Apply the faults due after `sent` tokens: "ended" when the stream ended here,
        "abort" when it must end with vLLM's abort, None to go on."""
        for name in self._faults.due(sent):
            if name == "malformed_after":
                await self._sse.send_raw(MALFORMED_EVENT)
            elif name == "error_after":
                await self._sse.send(generation_error(sent).body())
                await self._sse.done()
                return "ended"
            elif name == "cut_after":
                cut(self._request)
                return "ended"
            elif name == "abort_after":
                return FINISH_ABORT
            elif name == "stall_after":
                await self._sse.wait(self._sim.shutdown.forever())
        return None
