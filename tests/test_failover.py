"""Failover before commit, and none after it.

The balancer breaks ties in configuration order for the first pick, so the first worker listed
is the one tried first: each test makes that one fail.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from gateway.simulator import parse_fault
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, sse_data, stream_text


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("status=503", "upstream_unavailable"), ("cut_after=0", "upstream_disconnected")],
    ids=["worker-503", "cut-before-first-token"],
)
async def test_failure_before_commit_fails_over_to_another_worker(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    fault: str,
    reason: str,
) -> None:
    bad = await sim(fault=parse_fault(fault))
    good = await sim()
    gw = await gateway(bad, good)
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True)) as resp:
        raw = await resp.read()
    assert resp.status == 200
    assert sse_data(raw)[-1] == "[DONE]"
    assert gw.metric("gateway_retries_total", reason=reason) == 1
    assert good.engine.finished == 1


async def test_first_token_timeout_fails_over(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    slow = await sim(fault=parse_fault("slow_first_token=30"))
    good = await sim()
    timeouts = {"queue": 0.5, "connect": 1, "first_token": 0.3, "idle": 5, "total": 20}
    gw = await gateway(slow, good, timeouts=timeouts)
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True)) as resp:
        raw = await resp.read()
    assert resp.status == 200
    assert stream_text(raw)
    assert gw.metric("gateway_retries_total", reason="first_token_timeout") == 1
    assert slow.engine.num_running == 0  # the abandoned attempt was cancelled on the worker


async def test_connect_error_fails_over(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    good = await sim()
    gw = await gateway(
        {"url": f"http://127.0.0.1:{unused_tcp_port}", "models": ["sim-model"]}, good
    )
    gw.fleet.workers[0].healthy = True  # as if it died after the last probe
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    assert gw.metric("gateway_retries_total", reason="upstream_connect_error") == 1


async def test_no_retry_after_commit_ends_in_band(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    cut = await sim(fault=parse_fault("cut_after=3"))
    other = await sim()
    gw = await gateway(cut, other)
    async with client.post(
        f"{gw.url}/v1/chat/completions", json=chat(stream=True, max_tokens=10)
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "upstream_stream_truncated"
    assert len(stream_text(raw).split()) == 3
    assert other.engine.finished == 0  # never retried once the client had bytes
    assert gw.metric("gateway_retries_total", reason="upstream_disconnected") == 0


async def test_client_errors_are_not_retried_and_pass_through_unchanged(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    first = await sim()
    second = await sim()
    gw = await gateway(first, second)
    bad = {"model": "sim-model", "messages": "not a list"}
    async with client.post(f"{first.url}/v1/chat/completions", json=bad) as direct:
        expected = await direct.read()
        assert direct.status == 400
    async with client.post(f"{gw.url}/v1/chat/completions", json=bad) as resp:
        assert resp.status == 400
        assert await resp.read() == expected
    assert gw.metric("gateway_retries_total", reason="upstream_http_400") == 0
    assert gw.fleet.workers[0].consecutive_failures == 0  # the client's fault, not the worker's
    assert gw.fleet.workers[1].consecutive_failures == 0


async def test_all_workers_overloaded_relays_the_workers_503(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    a = await sim(fault=parse_fault("overload"))
    b = await sim(fault=parse_fault("overload"))
    gw = await gateway(a, b)
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True)) as resp:
        body = await resp.json()
    assert resp.status == 503
    assert isinstance(body["error"]["message"], str)
    assert gw.metric("gateway_retries_total", reason="upstream_unavailable") == 1


async def test_the_only_worker_is_tried_again_up_to_max_attempts(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """Nowhere else to go: the same worker again, after a backoff, ``max_attempts`` in all;
    then its 503 with our stable code and a Retry-After the client can honour."""
    only = await sim(fault=parse_fault("status=503"))
    gw = await gateway(only, retry={"max_attempts": 3})
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
    assert (
        gw.metric("gateway_upstream_errors_total", worker=only.url, kind="upstream_unavailable")
        == 3
    )
    assert gw.metric("gateway_retries_total", reason="upstream_unavailable") == 2


async def test_failing_worker_is_ejected_and_skipped(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    bad = await sim(fault=parse_fault("status=502"))
    good = await sim()
    gw = await gateway(bad, good, health={"interval": 60, "timeout": 1, "failures_to_eject": 2})
    for _ in range(6):
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
    assert not gw.fleet.workers[0].in_rotation
    assert gw.metric("gateway_worker_healthy", worker=bad.url) == 0
    assert gw.metric("gateway_retries_total", reason="upstream_unavailable") == 2
