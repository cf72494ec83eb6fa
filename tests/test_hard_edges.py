"""Edges where blame matters: a slow client is not a sick worker, a half-finished multi-choice
stream is not complete, a slow request body is bounded, busy workers are not ejected."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.simulator import parse_fault
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, scripted_worker, sse_data, wait_for

TIMEOUTS = {"queue": 0.5, "connect": 1.0, "first_token": 5.0, "idle": 0.3, "total": 20.0}
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 65_000 + b'"}}]}\n\n'


async def test_a_client_that_stops_reading_is_cut_without_blaming_the_worker(
    gateway: GatewayFactory,
) -> None:
    async def firehose(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(600):  # ~40 MB: more than every socket buffer on the way holds
            await resp.write(CHUNK)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with TestServer(scripted_worker(firehose)) as upstream:
        url = str(upstream.make_url("")).rstrip("/")
        gw = await gateway({"url": url, "models": ["m"]}, timeouts=TIMEOUTS)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        host, port = gw.server.host, gw.server.port
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        _, writer = await asyncio.open_connection(sock=sock)
        body = orjson.dumps({"model": "m", "messages": [], "stream": True})
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        try:
            labels = {"model": "m", "route": "chat_completions", "status": "200"}
            await wait_for(
                lambda: gw.metric("gateway_requests_total", code="client_too_slow", **labels) == 1,
                15,
                "the gateway gave up on the client",
            )
        finally:
            writer.close()
        worker = gw.fleet.workers[0]
        assert worker.healthy and worker.consecutive_failures == 0
        assert gw.metric("gateway_upstream_errors_total", worker=url, kind="idle_timeout") == 0


async def test_one_finished_choice_of_two_is_not_a_complete_stream(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """With n=2, a finish_reason on choice 0 while choice 1 is mid-answer must not be taken
    for a complete answer whose [DONE] got lost."""

    async def half_done(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for index, delta, finish in ((0, "Hello", None), (1, "Hel", None), (0, "", "stop")):
            event = {"choices": [{"index": index, "delta": {"content": delta},
                                  "finish_reason": finish}]}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        return resp  # ends cleanly, without [DONE]

    async with TestServer(scripted_worker(half_done)) as upstream:
        gw = await gateway({"url": str(upstream.make_url("")), "models": ["m"]})
        body = {"model": "m", "messages": [], "stream": True, "n": 2}
        async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "upstream_stream_truncated"


async def test_a_request_body_that_never_finishes_is_408(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    gw = await gateway(await sim(), timeouts=TIMEOUTS)
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model":'
    )
    await writer.drain()
    try:
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 408")
        await wait_for(lambda: gw.app_lifecycle_active() == 0, 2, "handler released")
    finally:
        writer.close()


async def test_busy_workers_are_not_ejected(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """503 (vLLM's overload answer) means busy: ejecting would cascade over the fleet."""
    busy = await sim(fault=parse_fault("overload"))
    gw = await gateway(busy, health={"interval": 60, "timeout": 1, "failures_to_eject": 1})
    for _ in range(3):
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 503
    assert gw.fleet.workers[0].healthy
    # Each request tried the only worker twice (retry.max_attempts: nowhere else to go).
    assert (
        gw.metric("gateway_upstream_errors_total", worker=busy.url, kind="upstream_unavailable")
        == 6
    )


async def test_a_cut_4xx_body_is_not_retried(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """The status decides retryability: a 400 whose body is cut short is still the client's."""
    calls: list[str] = []

    async def cut_400(request: web.Request) -> web.StreamResponse:
        calls.append("first")
        await request.read()
        resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"error": {')
        assert request.transport is not None
        request.transport.close()
        return resp

    async def fine(request: web.Request) -> web.Response:
        calls.append("second")
        return web.json_response({"choices": []})

    second = scripted_worker(fine)
    async with TestServer(scripted_worker(cut_400)) as one, TestServer(second) as two:
        gw = await gateway(
            {"url": str(one.make_url("")), "models": ["m"]},
            {"url": str(two.make_url("")), "models": ["m"]},
        )
        body = {"model": "m", "messages": []}
        async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            data = await resp.json()
        assert resp.status == 400
        assert data["error"]["code"] == "upstream_http_400"
    assert calls == ["first"]
