"""Every timeout phase with tiny budgets: each fails with its own status and code, before
commit as an OpenAI-shaped error status, after it as one in-band error event."""

from __future__ import annotations

import socket

import aiohttp
import orjson

from gateway.simulator import parse_fault
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, sse_data, wait_for

ONE_TRY = {"max_attempts": 1}


def timeouts(**phases: float) -> dict[str, float]:
    base = {"queue": 0.5, "connect": 1.0, "first_token": 5.0, "idle": 5.0, "total": 20.0}
    return {**base, **phases}


async def test_first_token_timeout_is_504_before_commit(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), timeouts=timeouts(first_token=0.2), retry=ONE_TRY)
    headers = {"X-Sim-Fault": "slow_first_token=10"}
    async with client.post(
        f"{gw.url}/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as resp:
        body = await resp.json()
    assert resp.status == 504
    assert body["error"]["code"] == "first_token_timeout"
    assert body["error"]["type"] == "timeout_error"


async def test_keep_alive_comments_do_not_count_as_a_first_token(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim(sse_keep_alive=0.02, fault=parse_fault("slow_first_token=10"))
    gw = await gateway(worker, timeouts=timeouts(first_token=0.3), retry=ONE_TRY)
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True)) as resp:
        body = await resp.json()
    assert resp.status == 504
    assert body["error"]["code"] == "first_token_timeout"


async def test_hang_before_headers_on_a_stream_is_a_first_token_timeout(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), timeouts=timeouts(first_token=0.2), retry=ONE_TRY)
    async with client.post(
        f"{gw.url}/v1/chat/completions", json=chat(stream=True), headers={"X-Sim-Fault": "hang"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 504
    assert body["error"]["code"] == "first_token_timeout"


async def test_idle_timeout_after_commit_is_one_in_band_error(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), timeouts=timeouts(idle=0.2), retry=ONE_TRY)
    headers = {"X-Sim-Fault": "stall_after=3"}
    async with client.post(
        f"{gw.url}/v1/chat/completions", json=chat(stream=True, max_tokens=10), headers=headers
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "idle_timeout"
    assert set(error) == {"message", "type", "param", "code"}
    assert sum(1 for e in events if '"error"' in e) == 1
    assert not any('"finish_reason":"length"' in e for e in events)  # never looks complete


async def test_total_timeout_non_stream_is_504(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(
        await sim(),
        timeouts=timeouts(total=0.3, first_token=0.3, idle=0.3, queue=0.1, connect=0.2),
        retry=ONE_TRY,
    )
    async with client.post(
        f"{gw.url}/v1/chat/completions", json=chat(), headers={"X-Sim-Fault": "hang"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 504
    assert body["error"]["code"] == "request_timeout"


async def test_total_timeout_mid_stream_is_in_band(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim(itl_base=0.05, itl_per_seq=0.0)
    gw = await gateway(
        worker, timeouts=timeouts(total=0.4, first_token=0.4, idle=0.4, queue=0.1, connect=0.2)
    )
    async with client.post(
        f"{gw.url}/v1/chat/completions", json=chat(stream=True, max_tokens=100)
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "request_timeout"


async def test_connect_timeout_is_504_and_counts_against_the_worker(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A listener whose accept queue is full drops new SYNs: connecting hangs, as to a host
    that vanished, and the connect phase bounds it."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        port = blackhole.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue; never accepted
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            url = f"http://127.0.0.1:{port}"
            gw = await gateway(
                {"url": url, "models": ["sim-model"]},
                timeouts=timeouts(connect=0.3),
                retry=ONE_TRY,
            )
            gw.fleet.workers[0].healthy = True  # the start-up probe could not reach it either
            async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
                body = await resp.json()
            assert resp.status == 504
            assert body["error"]["code"] == "connect_timeout"
            assert (
                gw.metric("gateway_upstream_errors_total", worker=url, kind="connect_timeout") == 1
            )
        finally:
            for filler in fillers:
                filler.close()


async def test_worker_at_its_connection_cap_sheds_instead_of_queueing_in_the_pool(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """With one connection per worker, a second request is not parked in the connector's wait
    (a hidden queue that would look like a connect timeout and eject a healthy worker): it is
    shed at once with 503 + Retry-After."""
    worker = await sim()
    gw = await gateway(
        worker,
        timeouts=timeouts(connect=0.2),
        limits={"max_in_flight": 2, "pool_size": 2, "pool_per_worker": 1},
        retry=ONE_TRY,
    )
    stalled = await client.post(
        f"{gw.url}/v1/chat/completions",
        json=chat(stream=True),
        headers={"X-Sim-Fault": "stall_after=1"},
    )
    try:
        await wait_for(lambda: worker.engine.num_running == 1, 5, "first request running")
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            body = await resp.json()
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        assert body["error"]["code"] == "gateway_overloaded"
        assert gw.fleet.workers[0].consecutive_failures == 0
        assert worker.engine.num_running == 1
    finally:
        stalled.close()


async def test_connect_refused_is_502(
    gateway: GatewayFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    dead = {"url": f"http://127.0.0.1:{unused_tcp_port}", "models": ["sim-model"]}
    gw = await gateway(dead, retry=ONE_TRY)
    gw.fleet.workers[0].healthy = True  # the start-up probe saw it down; try it anyway
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
        body = await resp.json()
    assert resp.status == 502
    assert body["error"]["code"] == "upstream_connect_error"
    assert (
        gw.metric(
            "gateway_upstream_errors_total",
            worker=f"http://127.0.0.1:{unused_tcp_port}",
            kind="upstream_connect_error",
        )
        == 1
    )
