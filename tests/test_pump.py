"""The committed stream's protocol-level relay (``gateway/pump.py``) as a client sees it on the
wire. (A client that stops reading is in ``test_hard_edges.py``; ending, failing and resuming
streams everywhere else: the pump carries every committed stream.)"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import TestServer

from gateway.relay import SSE_HEADERS, EventStream
from tests.conftest import GatewayFactory
from tests.helpers import scripted_worker

BODY = orjson.dumps({"model": "m", "messages": [], "stream": True})


def event(text: str) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(delta) + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def next_chunk(reader: asyncio.StreamReader) -> bytes:
    """The next chunk of a chunked body, as the gateway framed it; b"" at the last."""
    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
    return (await asyncio.wait_for(reader.readexactly(size + 2), 10))[:-2]


async def test_what_one_read_brought_leaves_as_one_chunk(gateway: GatewayFactory) -> None:
    """The worker writes twenty events, each its own HTTP chunk, in one send; the gateway
    reads them in one read and writes them in one chunk (a first version wrote one per event:
    twenty syscalls where one does). Half an event is held until its end arrives."""
    first_seen, burst_seen = asyncio.Event(), asyncio.Event()
    tokens = [f"t{i}" for i in range(20)]
    half = event("half")

    async def worker(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(event("first"))
        await first_seen.wait()  # the stream is committed: what follows goes through the pump
        transport = request.transport
        assert transport is not None
        # One send: twenty events, each its own HTTP chunk, and the first bytes of another.
        transport.write(b"".join(chunk(event(t)) for t in tokens) + chunk(half[:10]))
        await burst_seen.wait()
        transport.write(chunk(half[10:]) + chunk(b"data: [DONE]\n\n"))
        await resp.write_eof()
        return resp

    async with TestServer(scripted_worker(worker)) as upstream:
        gw = await gateway({"url": str(upstream.make_url("")).rstrip("/"), "models": ["m"]})
        reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
            assert await next_chunk(reader) == event("first")
            first_seen.set()
            burst = await next_chunk(reader)
            burst_seen.set()
            rest = []
            while piece := await next_chunk(reader):
                rest.append(piece)
        finally:
            writer.close()
    # Twenty events and a half came in one read: the twenty leave in one chunk, the half
    # waits for its end.
    assert burst == b"".join(event(t) for t in tokens)
    assert rest == [half + b"data: [DONE]\n\n"]


async def test_an_event_streams_head_leaves_with_its_first_events() -> None:
    """``EventStream`` keeps its head until the first events, so both leave in one write
    (aiohttp's ``StreamResponse`` writes the head alone at ``prepare``). The writer's count of
    bytes handed to the transport says which: none after ``prepare``, the head and the event
    after the first write. Should aiohttp stop honouring the attribute, this fails."""
    sizes: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = EventStream(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        writer = request.writer
        assert isinstance(writer, StreamWriter)
        sizes.append(writer.output_size)
        await resp.write(event("first"))
        sizes.append(writer.output_size)
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"text/event-stream" in head
            assert await next_chunk(reader) == event("first")
            assert await next_chunk(reader) == b"data: [DONE]\n\n"
            assert await next_chunk(reader) == b""
        finally:
            writer.close()
    assert sizes[0] == 0, "the head was written at prepare"
    assert sizes[1] > len(head)
