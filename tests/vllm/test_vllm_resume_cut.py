"""A stream cut inside a character resumes on real vLLM with the right text (gateway/cutpoint.py).

The first worker is a recording: it replays real vLLM's own stream of the answer (with the
token ids the gateway asks for) up to an event after which the answer so far ends inside a
character, then drops the connection. The gateway resumes on the real worker. Without the step
back to a whole character, vLLM's first continuation text was the whole prompt and answer
decoded again (chat template included).
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory
from tests.helpers import sse_data
from tests.vllm.compare import TIMEOUT, text_of
from tests.vllm.conftest import VLLMFleet, worker_entry
from tests.vllm.fleet import MODEL

pytestmark = pytest.mark.timeout(300)

PROMPT = [{"role": "user", "content": "Tell me a long story about a gateway and its workers"}]
BODY = {"model": MODEL, "messages": PROMPT, "max_tokens": 300, "temperature": 0,
        "ignore_eos": True, "stream": True}  # fmt: skip


def low_port() -> int:
    """A free port whose URL sorts before any ephemeral port's (32768 and up): round-robin
    picks the recording first."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 30000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 10000-29999")


async def detokenize(session: aiohttp.ClientSession, url: str, tokens: list[int]) -> str:
    body = {"model": MODEL, "tokens": tokens}
    async with session.post(url + "/detokenize", json=body, timeout=TIMEOUT) as response:
        assert response.status == 200
        text = orjson.loads(await response.read())["prompt"]
        assert isinstance(text, str)
        return text


async def cut_inside_a_character(
    session: aiohttp.ClientSession, url: str, events: list[dict[str, Any]]
) -> int:
    """The index of the first event after which the answer so far ends inside a character."""
    prompt = events[0]["prompt_token_ids"]
    answer: list[int] = []
    for index, event in enumerate(events):
        for choice in event.get("choices") or ():
            answer.extend(choice.get("token_ids") or ())
        if not answer or index >= len(events) - 2:
            continue
        if (await detokenize(session, url, prompt + answer)).endswith("\ufffd"):
            return index
    raise AssertionError("the answer never ends inside a character: pick another prompt")


@pytest.fixture
async def recording() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A worker that replays the events put in its list, then drops the connection."""
    events: list[bytes] = []

    async def replay(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        assert request.transport is not None
        request.transport.close()  # cut: no end of the chunked body, no [DONE]
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", replay)

    async def healthy(_: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/health", healthy)
    runner = web.AppRunner(app)
    await runner.setup()
    port = low_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", events
    finally:
        await runner.cleanup()


async def test_a_cut_inside_a_character_resumes_with_the_right_text(
    vllm: VLLMFleet, gateway: GatewayFactory, recording: tuple[str, list[bytes]]
) -> None:
    url, replayed = recording
    assert url < vllm.plain.url
    async with aiohttp.ClientSession() as session:
        async with session.post(
            vllm.plain.url + "/v1/chat/completions",
            json={**BODY, "return_token_ids": True},
            timeout=TIMEOUT,
        ) as response:
            reference = await response.read()
        events = [orjson.loads(d) for d in sse_data(reference) if d != "[DONE]"]
        cut = await cut_inside_a_character(session, vllm.plain.url, events)
        replayed.extend(b"data: " + orjson.dumps(e) + b"\n\n" for e in events[: cut + 1])
        gw = await gateway(
            {"url": url, "models": [MODEL]},
            worker_entry(vllm.plain),
            routing={"policy": "round_robin"},
            resume={"enabled": True},
        )
        async with session.post(
            gw.url + "/v1/chat/completions", json=BODY, timeout=TIMEOUT
        ) as response:
            assert response.status == 200
            raw = await response.read()
    assert text_of(raw) == text_of(reference)
    chunks = [orjson.loads(d) for d in sse_data(raw) if d != "[DONE]"]
    reasons = [c.get("finish_reason") for e in chunks for c in e.get("choices") or ()]
    assert [r for r in reasons if r is not None] == ["length"]
    assert sse_data(raw)[-1] == "[DONE]"
    assert gw.metric("gateway_stream_resumes_total", model=MODEL, outcome="resumed") == 1
