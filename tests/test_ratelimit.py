"""Per-key rate limits on one replica: the GCRA arithmetic on a fake clock, and over real
sockets the 429s, their headers, and the OpenAI SDK honouring Retry-After."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from gateway.auth import Client
from gateway.errors import Overloaded, RateLimited
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import LocalWindows, Rate, RateLimiter, duration, headers, rates_for
from gateway.settings import RateLimits, RedisSettings
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat

KEY = "sk-test-limits-000001"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock) -> RateLimiter:
    return RateLimiter(RedisSettings(), GatewayMetrics(CollectorRegistry()), clock=clock)


def client(**limits: Any) -> Client:
    models = limits.pop("models", {})
    return Client("a", RateLimits(**limits), models)


async def test_rpm_admits_the_whole_minute_at_once_then_refills_steadily() -> None:
    clock = Clock()
    rl = limiter(clock)
    for _ in range(6):
        await rl.acquire(client(rpm=6), "m", 10)
    with pytest.raises(RateLimited) as refused:
        await rl.acquire(client(rpm=6), "m", 10)
    assert refused.value.type == "requests"
    assert refused.value.retry_after == 10  # one request per 10 s comes back
    clock.now += 9.9
    with pytest.raises(RateLimited):
        await rl.acquire(client(rpm=6), "m", 10)
    clock.now += 0.2
    await rl.acquire(client(rpm=6), "m", 10)


async def test_tpm_charges_the_estimate_and_settles_on_the_usage() -> None:
    clock = Clock()
    rl = limiter(clock)
    grant = await rl.acquire(client(tpm=1000), "m", 900)
    with pytest.raises(RateLimited) as refused:
        await rl.acquire(client(tpm=1000), "m", 200)
    assert refused.value.type == "tokens"
    await grant.settle(100)  # it cost far less: 800 tokens come back
    await rl.acquire(client(tpm=1000), "m", 200)
    grant = await rl.acquire(client(tpm=1000), "m", 100)
    await grant.settle(2000)  # it cost more than the estimate: charged, never refused
    with pytest.raises(RateLimited):
        await rl.acquire(client(tpm=1000), "m", 1)


async def test_per_model_limits_apply_on_top_of_the_keys() -> None:
    clock = Clock()
    rl = limiter(clock)
    c = client(rpm=100, models={"big": RateLimits(rpm=2)})
    await rl.acquire(c, "big", 1)
    await rl.acquire(c, "big", 1)
    with pytest.raises(RateLimited):
        await rl.acquire(c, "big", 1)
    for _ in range(10):
        await rl.acquire(c, "small", 1)  # only the key's own limit


async def test_concurrency_is_released_by_settle_whatever_happened() -> None:
    rl = limiter(Clock())
    c = client(max_concurrent=2)
    first = await rl.acquire(c, "m", 1)
    await rl.acquire(c, "m", 1)
    with pytest.raises(RateLimited) as refused:
        await rl.acquire(c, "m", 1)
    assert refused.value.type == "concurrency"
    await first.settle(None)  # failed or cut: no usage, still released
    await rl.acquire(c, "m", 1)


async def test_a_key_without_limits_is_never_limited_and_gets_no_headers() -> None:
    rl = limiter(Clock())
    for _ in range(100):
        grant = await rl.acquire(client(), "m", 10**6)
        assert grant.headers == {}


def test_headers_have_openais_names_and_formats() -> None:
    clock = Clock()
    windows = LocalWindows(clock)
    rates = rates_for(client(rpm=60, tpm=6000), "m", 1500)
    verdict = windows.check(rates)
    assert headers(verdict.ahead) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "4500",
        "x-ratelimit-reset-tokens": "15s",
    }
    assert [duration(s) for s in (0.12, 1.0, 59.5, 360.0)] == ["120ms", "1s", "1m0s", "6m0s"]


def test_a_request_larger_than_the_whole_allowance_costs_the_allowance() -> None:
    windows = LocalWindows(Clock())
    assert windows.check([Rate("tpm:a", "tokens", 100, 10_000)]).admitted


# --- over real sockets ----------------------------------------------------------------------


def auth(**limits: Any) -> dict[str, Any]:
    return {"keys": [{"name": "team-a", "key": KEY, **limits}]}


async def test_the_fourth_request_in_a_minute_gets_a_429_with_the_headers(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim()
    gw = await gateway(worker, auth=auth(rpm=3))
    bearer = {"Authorization": f"Bearer {KEY}"}
    remaining = []
    for stream in (False, True, False):
        async with client.post(
            f"{gw.url}/v1/chat/completions", json=chat(stream=stream), headers=bearer
        ) as resp:
            assert resp.status == 200
            await resp.read()
            remaining.append(resp.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(), headers=bearer) as resp:
        assert resp.status == 429
        body = await resp.json()
        assert 15 <= int(resp.headers["Retry-After"]) <= 20
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert worker.engine.finished == 3
    assert gw.metric("gateway_rate_limited_total", key="team-a", kind="requests") == 1
    assert gw.proxy.admission.in_flight == 0


async def test_the_openai_sdk_waits_out_retry_after_and_succeeds(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    """rpm 60 gives one request back each second: the SDK's retry after the 429 lands."""
    gw = await gateway(await sim(), auth=auth(rpm=60))
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0) as sdk:
        for _ in range(60):
            await sdk.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=2) as sdk:
        started = time.monotonic()
        answer = await sdk.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        waited = time.monotonic() - started
    assert answer.choices[0].message.content
    assert 0.3 < waited < 10  # it waited for the Retry-After, then got through
    assert gw.metric("gateway_rate_limited_total", key="team-a", kind="requests") >= 2


async def test_redis_unreachable_fails_open_to_local_limits_or_closed_to_503() -> None:
    """Nothing listens on port 9: every Redis call fails fast."""
    url = "redis://127.0.0.1:9/0"
    registry = CollectorRegistry()
    open_ = RateLimiter(RedisSettings(url=url, timeout=0.2), GatewayMetrics(registry))
    await open_.start()
    try:
        for _ in range(3):
            await open_.acquire(client(rpm=3), "m", 1)  # served, on this replica's limits
        with pytest.raises(RateLimited):
            await open_.acquire(client(rpm=3), "m", 1)
        assert registry.get_sample_value("gateway_ratelimit_redis_up") == 0
        assert (registry.get_sample_value("gateway_ratelimit_redis_errors_total") or 0) >= 1
    finally:
        await open_.close()
    closed = RateLimiter(
        RedisSettings(url=url, timeout=0.2, on_error="closed"),
        GatewayMetrics(CollectorRegistry()),
    )
    try:
        with pytest.raises(Overloaded):
            await closed.acquire(client(rpm=3), "m", 1)
    finally:
        await closed.close()
