"""Streams of every shape SSE allows, through the gateway: what the client gets equals what
the worker wrote, byte for byte (usage stripped by the module's rule when the gateway asked
for it), whatever the events look like and wherever the worker's writes end.

A worker on a real socket writes each request's stream as the test scripted it: vLLM's
compact events, comment lines, CRLF and stray blank lines, multi-line ``data:`` events, ``id``,
``event`` and ``retry`` fields, ``data:`` with no space, a BOM, the finishing event, usage,
``[DONE]``, cut into writes at random places. The first token may come
after any of the odd shapes, so the hold-back before the commit and the pump after it both see
them.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import GatewayFactory
from tests.helpers import scripted_worker
from tests.test_framing import _one_at_a_time


def _event(delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + orjson.dumps({**body, "choices": [choice]})


ROLE = _event({"role": "assistant", "content": ""})
USAGE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":3,"total_tokens":7,"completion_tokens":4},'
    b'"system_fingerprint":"fp-1"}'
)  # the fingerprint moves onto the finishing event when the gateway drops this chunk
DONE = b"data: [DONE]"
# What may come between the role chunk and the finish: tokens, and the odd shapes.
MIDDLE = (
    _event({"content": "a"}),
    _event({"content": " h\u00e9"}),
    _event({"content": "\u65e5\u672c"}),
    b": keep-alive",
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",\n'
    b'data: "choices":[{"index":0,"delta":{"content":"m"},"finish_reason":null}]}',
    b"id: 7\nevent: message\n" + _event({"content": "x"}),
    b"data:" + _event({"content": "y"})[6:],  # no space after the colon
    b"retry: 1000\n" + _event({"content": "z"}),
    b":" + b"p" * 300,  # a long comment
)


def _stream(rng: random.Random, usage: bool) -> bytes:
    """A whole stream: role, a random middle, the finish, usage when asked, [DONE]; each
    event ends in LF LF, CRLF CRLF or LF LF and a stray LF."""
    events = [ROLE, *rng.choices(MIDDLE, k=rng.randint(1, 12))]
    events += [_event({}, rng.choice(["stop", "length"]))]
    events += [USAGE] if usage else []
    events += [DONE]
    out = b""
    for event in events:
        end = rng.choice([b"\n\n"] * 6 + [b"\n\n\n", b"\n\n\n\n", b"\r\n\r\n"])
        if end == b"\r\n\r\n":
            event = event.replace(b"\n", b"\r\n")
        out += event + end
    while out.endswith(b"\n\n\n"):
        out = out[:-1]  # stray line breaks between events only, not after the last
    return (b"\xef\xbb\xbf" if rng.random() < 0.1 else b"") + out  # a BOM may open the stream


def _writes(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut anywhere, and as often just after a line break (where a read ending in a
    blank line, or in one LF more, tests the most)."""
    breaks = [i + 1 for i in range(len(data) - 1) if data[i] == 10]
    anywhere = rng.sample(range(1, len(data)), k=rng.randint(0, 3))
    cuts = sorted({*anywhere, *rng.sample(breaks, k=min(rng.randint(0, 4), len(breaks)))})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client_asks_usage", [True, False], ids=["usage-asked", "usage-added"])
async def test_random_stream_shapes_reach_the_client_unchanged(
    gateway: GatewayFactory, client: aiohttp.ClientSession, client_asks_usage: bool
) -> None:
    rng = random.Random(2026 + client_asks_usage)
    script: list[bytes] = []

    async def worker(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in script:
            await resp.write(piece)
            # Two turns of the loop: the gateway reads this piece before the next is written
            # (else they would reach it in one read). Coverage only: no result depends on it.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    body: dict[str, object] = {"model": "m", "messages": [], "stream": True}
    if client_asks_usage:
        body["stream_options"] = {"include_usage": True}
    async with TestServer(scripted_worker(worker)) as upstream:
        gw = await gateway({"url": str(upstream.make_url("")), "models": ["m"]})
        for _ in range(1000):
            # The gateway asks for usage either way: the worker always sends it.
            sent = _stream(rng, usage=True)
            script[:] = _writes(rng, sent)
            async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
                got = await resp.read()
                assert resp.status == 200, got
            expected = sent if client_asks_usage else _one_at_a_time(sent)
            assert got == expected, sent
