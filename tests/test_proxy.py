"""The request path over real sockets: pass-through, endpoints, bad inputs, request ids."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, scripted_worker, sse_data, stream_text


async def test_stream_passes_through_with_sse_headers(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim()
    gw = await gateway(worker)
    body = chat(stream=True, max_tokens=5, stream_options={"include_usage": True})
    async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        raw = await resp.read()
    async with client.post(f"{worker.url}/v1/chat/completions", json=body) as direct:
        expected = await direct.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["usage"]["completion_tokens"] == 5
    assert stream_text(raw) == stream_text(expected)
    assert len(stream_text(raw).split()) == 5


async def test_stream_bytes_are_relayed_unchanged_and_as_they_arrive(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A scripted worker with odd framing (CRLF, comments, split events): the client gets the
    same bytes, and gets the first token while the worker is still holding the rest back."""
    release = asyncio.Event()
    first = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\r\n\r\n'
    first += b': keep-alive\r\n\r\ndata: {"choices":[{"index":0,"delta":{"content":"Hel'
    second = b'lo"}}]}\r\n\r\n'
    rest = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
    rest += b"data: [DONE]\r\n\r\n"

    async def scripted(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(first)
        await resp.write(second)
        await release.wait()
        await resp.write(rest)
        return resp

    app = scripted_worker(scripted)
    async with TestServer(app) as upstream:
        gw = await gateway({"url": str(upstream.make_url("")), "models": ["m"]})
        body = {"model": "m", "messages": [], "stream": True}
        async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            received = b""
            while len(received) < len(first + second):
                chunk = await asyncio.wait_for(resp.content.readany(), 5)
                assert chunk, f"stream ended early after {received!r}"
                received += chunk
            assert received == first + second  # arrived before the worker sent the rest
            release.set()
            received += await resp.read()
    assert received == first + second + rest


async def test_non_stream_json_passes_through_unchanged(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim()
    gw = await gateway(worker)
    headers = {"X-Request-Id": "fixed-id-1"}
    body = chat(max_tokens=4)
    async with client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "fixed-id-1"
        via_gateway = await resp.read()
    async with client.post(
        f"{worker.url}/v1/chat/completions", json=body, headers=headers
    ) as direct:
        expected = await direct.read()
    a, b = orjson.loads(via_gateway), orjson.loads(expected)
    a.pop("created"), b.pop("created")
    assert a == b
    assert a["id"] == "chatcmpl-fixed-id-1"  # the worker saw our request id


async def test_completions_and_embeddings(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    body = {"model": "sim-model", "prompt": "Once upon", "max_tokens": 3, "stream": True}
    async with client.post(f"{gw.url}/v1/completions", json=body) as resp:
        raw = await resp.read()
    assert resp.status == 200
    assert len(stream_text(raw).split()) == 3
    body = {"model": "sim-model", "input": ["a", "b"]}
    async with client.post(f"{gw.url}/v1/embeddings", json=body) as resp:
        data = await resp.json()
    assert resp.status == 200
    assert [item["index"] for item in data["data"]] == [0, 1]


async def test_models_lists_the_union_over_healthy_workers(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    a = await sim(models=("alpha", "shared"))
    b = await sim(models=("beta", "shared"))
    gw = await gateway(a, b)
    async with client.get(f"{gw.url}/v1/models") as resp:
        data = await resp.json()
    assert data["object"] == "list"
    assert sorted(card["id"] for card in data["data"]) == ["alpha", "beta", "shared"]
    gw.fleet.workers[1].healthy = False
    async with client.get(f"{gw.url}/v1/models") as resp:
        data = await resp.json()
    assert sorted(card["id"] for card in data["data"]) == ["alpha", "shared"]


async def test_health_and_ready(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    async with client.get(f"{gw.url}/health") as resp:
        assert resp.status == 200
    async with client.get(f"{gw.url}/ready") as resp:
        assert resp.status == 200
    gw.fleet.workers[0].healthy = False
    async with client.get(f"{gw.url}/ready") as resp:
        assert resp.status == 503


async def test_ready_is_false_when_the_only_worker_is_down(
    gateway: GatewayFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    gw = await gateway({"url": f"http://127.0.0.1:{unused_tcp_port}", "models": ["m"]})
    async with client.get(f"{gw.url}/ready") as resp:
        assert resp.status == 503


async def test_metrics_count_requests_and_first_tokens(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True)) as resp:
        await resp.read()
    async with client.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    assert "gateway_requests_in_flight" in text
    labels = {"model": "sim-model", "route": "chat_completions", "status": "200", "code": ""}
    assert gw.metric("gateway_requests_total", **labels) == 1
    assert gw.metric("gateway_time_to_first_token_seconds_count", model="sim-model") == 1
    assert gw.metric("gateway_requests_in_flight") == 0


async def test_request_id_is_made_when_missing_or_unsafe(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
        made = resp.headers["X-Request-Id"]
        data = await resp.json()
    assert len(made) == 32
    assert data["id"] == f"chatcmpl-{made}"
    unsafe = {"X-Request-Id": "a b\tc" + "x" * 200}
    async with client.get(f"{gw.url}/health", headers=unsafe) as resp:
        assert resp.headers["X-Request-Id"] != unsafe["X-Request-Id"]


async def test_forwarded_headers_carry_tracing_but_no_credentials(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """W3C trace context reaches the worker, so vLLM's own traces join the caller's; the
    client's credentials and hop-by-hop headers do not."""
    seen: list[CIMultiDict[str]] = []

    async def capture(request: web.Request) -> web.Response:
        seen.append(request.headers.copy())
        await request.read()
        return web.json_response({"id": "x", "choices": [], "usage": {"prompt_tokens": 1}})

    app = scripted_worker(capture)
    async with TestServer(app) as upstream:
        gw = await gateway({"url": str(upstream.make_url("")), "models": ["m"]})
        headers = {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=abc",
            "Authorization": "Bearer secret-key",
            "Cookie": "session=1",
            "X-Request-Id": "trace-test-1",
        }
        body = {"model": "m", "messages": []}
        async with client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
    [forwarded] = seen
    assert forwarded["traceparent"] == headers["traceparent"]
    assert forwarded["tracestate"] == "vendor=abc"
    assert forwarded["X-Request-Id"] == "trace-test-1"
    assert "Authorization" not in forwarded
    assert "Cookie" not in forwarded
