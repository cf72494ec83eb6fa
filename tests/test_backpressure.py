"""Backpressure: past the in-flight limit and a bounded wait, 503 + Retry-After at once; slots
return whatever way a request ends."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory
from tests.helpers import chat, wait_for

STALL = {"X-Sim-Fault": "stall_after=1"}


async def open_stalled_stream(client: aiohttp.ClientSession, gw: Gateway) -> aiohttp.ClientResponse:
    resp = await client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True), headers=STALL)
    assert resp.status == 200
    await resp.content.readline()  # committed: the first event arrived
    return resp


async def start(sim: SimFactory, gateway: GatewayFactory, queue: float) -> tuple[Sim, Gateway]:
    worker = await sim()
    gw = await gateway(
        worker,
        limits={"max_in_flight": 1, "pool_size": 4, "pool_per_worker": 4, "retry_after": 3},
        timeouts={"queue": queue, "connect": 1, "first_token": 5, "idle": 5, "total": 20},
    )
    return worker, gw


async def test_full_gateway_answers_503_with_retry_after_at_once(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker, gw = await start(sim, gateway, queue=0)
    held = await open_stalled_stream(client, gw)
    started = time.monotonic()
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
        body = await resp.json()
    elapsed = time.monotonic() - started
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"
    assert body["error"]["code"] == "gateway_overloaded"
    assert body["error"]["type"] == "server_error"
    assert elapsed < 2.0  # not queued: shed without waiting for the held request
    assert gw.metric("gateway_rejections_total", reason="gateway_overloaded") == 1
    assert worker.engine.num_running == 1  # the shed request never reached the worker

    held.close()
    await wait_for(lambda: gw.metric("gateway_requests_in_flight") == 0, 2, "permit returned")
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200


async def test_bounded_wait_admits_when_a_slot_frees(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    _, gw = await start(sim, gateway, queue=5)
    held = await open_stalled_stream(client, gw)
    waiting = asyncio.create_task(client.post(f"{gw.url}/v1/chat/completions", json=chat()))
    await wait_for(lambda: gw.proxy.admission.waiting == 1, 2, "second request queued")
    assert not waiting.done()
    held.close()
    resp = await asyncio.wait_for(waiting, 5)
    async with resp:
        assert resp.status == 200
    assert gw.metric("gateway_queue_wait_seconds_count") == 2
    assert gw.metric("gateway_rejections_total", reason="gateway_overloaded") == 0


async def test_bounded_wait_sheds_after_the_queue_timeout(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    _, gw = await start(sim, gateway, queue=0.2)
    held = await open_stalled_stream(client, gw)
    try:
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "gateway_overloaded"
    finally:
        held.close()


async def test_permits_and_counters_return_after_every_kind_of_ending(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    _, gw = await start(sim, gateway, queue=0)
    endings = [
        (chat(stream=True), {}),  # success
        (chat(), {"X-Sim-Fault": "status=500"}),  # worker error
        (chat(stream=True, max_tokens=10), {"X-Sim-Fault": "cut_after=3"}),  # cut after commit
        (chat(stream=True), {"X-Sim-Fault": "malformed_after=1"}),
        ({"model": "sim-model", "messages": "nope"}, {}),  # worker says 400
    ]
    for body, headers in endings:
        async with client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
        assert gw.metric("gateway_requests_in_flight") == 0
        assert gw.fleet.workers[0].in_flight == 0
        assert gw.proxy.admission.in_flight == 0
    held = await open_stalled_stream(client, gw)
    held.close()  # client disconnect
    await wait_for(lambda: gw.proxy.admission.in_flight == 0, 2, "permit after disconnect")
    assert gw.fleet.workers[0].in_flight == 0
