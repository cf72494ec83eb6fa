"""Per-key rate limits on one replica: the GCRA arithmetic on a fake clock, then over real
sockets the 429s, their headers, usage corrections, in-flight slots given back however a
request ends, and the OpenAI SDK waiting out Retry-After."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.auth import Client
from gateway.errors import Overloaded, RateLimited
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter, caps_for, rates_for
from gateway.ratelimit_local import LocalLimits, Rate, duration, headers
from gateway.settings import RateLimits, RedisSettings
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, scripted_worker, wait_for
from tests.processes import free_port

KEY = "sk-test-limits-000001"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, registry: CollectorRegistry | None = None) -> RateLimiter:
    metrics = GatewayMetrics(registry or CollectorRegistry())
    return RateLimiter(RedisSettings(), metrics, clock=clock)


def key(name: str = "a", **limits: Any) -> Client:
    models = limits.pop("models", {})
    return Client(name, RateLimits(**limits), models)


async def refused(rl: RateLimiter, client: Client, model: str = "m", tokens: int = 1) -> Any:
    with pytest.raises(RateLimited) as info:
        await rl.acquire(client, model, tokens)
    return info.value


# --- the arithmetic, on a fake clock ------------------------------------------------------


@pytest.mark.parametrize("rpm", [1, 3, 7, 60, 1000])
async def test_rpm_admits_exactly_the_limit_at_once_then_one_per_interval(rpm: int) -> None:
    clock = Clock()
    rl = limiter(clock)
    for _ in range(rpm):
        await rl.acquire(key(rpm=rpm), "m", 10)
    error = await refused(rl, key(rpm=rpm))
    assert error.type == "requests"
    interval = 60 / rpm
    assert error.headers()["retry-after-ms"] == str(math.ceil(round(interval * 1000, 6)))
    clock.now += interval * 0.99
    await refused(rl, key(rpm=rpm))
    clock.now += interval * 0.02
    await rl.acquire(key(rpm=rpm), "m", 10)  # exactly one came back...
    await refused(rl, key(rpm=rpm))  # ...not two


async def test_a_quiet_minute_gives_the_whole_allowance_back() -> None:
    clock = Clock()
    rl = limiter(clock)
    for _ in range(10):
        await rl.acquire(key(rpm=10), "m", 1)
    clock.now += 30  # half a minute: half of it
    for _ in range(5):
        await rl.acquire(key(rpm=10), "m", 1)
    await refused(rl, key(rpm=10))
    clock.now += 60
    for _ in range(10):
        await rl.acquire(key(rpm=10), "m", 1)
    await refused(rl, key(rpm=10))


async def test_retry_after_is_when_the_request_would_be_admitted() -> None:
    clock = Clock()
    rl = limiter(clock)
    for _ in range(6):
        await rl.acquire(key(rpm=6), "m", 1)
    clock.now += 4
    error = await refused(rl, key(rpm=6))  # one comes back every 10 s: 6 s to go
    assert error.retry_after == 6
    assert error.headers()["Retry-After"] == "6"
    assert error.headers()["retry-after-ms"] == "6000"
    clock.now += 5.9
    await refused(rl, key(rpm=6))
    clock.now += 0.1
    await rl.acquire(key(rpm=6), "m", 1)
    # Tokens: 600 of 1000 spent, 600 more wanted: 200 over, at 16.7 a second, is 12 s.
    await rl.acquire(key("t", tpm=1000), "m", 600)
    error = await refused(rl, key("t", tpm=1000), tokens=600)
    assert error.type == "tokens"
    assert error.headers()["Retry-After"] == "12"
    assert error.headers()["retry-after-ms"] == "12000"
    clock.now += 11.99
    await refused(rl, key("t", tpm=1000), tokens=600)
    clock.now += 0.01
    await rl.acquire(key("t", tpm=1000), "m", 600)


async def test_per_model_limits_apply_on_top_of_the_keys_own() -> None:
    clock = Clock()
    rl = limiter(clock)
    c = key(rpm=5, models={"big": RateLimits(rpm=2)})
    await rl.acquire(c, "big", 1)
    await rl.acquire(c, "big", 1)
    error = await refused(rl, c, "big")  # the model's limit
    assert error.headers()["x-ratelimit-limit-requests"] == "2"  # the one that refused
    for _ in range(3):
        await rl.acquire(c, "small", 1)  # other models: only the key's limit...
    await refused(rl, c, "small")  # ...which counted the big model's requests too
    clock.now += 30  # one request back for "big" (every 30 s), two for the key (every 12 s)
    grant = await rl.acquire(c, "big", 1)
    assert grant.headers["x-ratelimit-limit-requests"] == "2"  # the tighter one is shown
    assert grant.headers["x-ratelimit-remaining-requests"] == "0"
    grant = await rl.acquire(c, "small", 1)
    assert grant.headers["x-ratelimit-limit-requests"] == "5"
    assert grant.headers["x-ratelimit-remaining-requests"] == "0"
    await refused(rl, c, "small")


async def test_tokens_are_charged_at_the_estimate_and_corrected_by_the_usage() -> None:
    clock = Clock()
    rl = limiter(clock)
    grant = await rl.acquire(key(tpm=1000), "m", 900)
    error = await refused(rl, key(tpm=1000), tokens=200)
    assert error.type == "tokens"
    await grant.settle(100)  # it cost far less: 800 tokens come back
    grant = await rl.acquire(key(tpm=1000), "m", 200)
    assert grant.headers["x-ratelimit-remaining-tokens"] == "700"
    await grant.settle(None)  # usage unknown: the estimate stands
    grant = await rl.acquire(key(tpm=1000), "m", 100)
    assert grant.headers["x-ratelimit-remaining-tokens"] == "600"
    await grant.settle(3100)  # it cost 3000 more than estimated: charged, never refused
    error = await refused(rl, key(tpm=1000))
    # 3400 spent of 1000: 2401 tokens too many for one more, at 60 s per 1000 tokens.
    assert error.retry_after == 145
    assert error.headers()["x-ratelimit-remaining-tokens"] == "0"
    assert error.headers()["x-ratelimit-reset-tokens"] == "3m24s"


async def test_a_request_bigger_than_the_whole_allowance_costs_the_allowance() -> None:
    clock = Clock()
    rl = limiter(clock)
    await rl.acquire(key(tpm=100), "m", 10_000)  # would never fit otherwise
    error = await refused(rl, key(tpm=100))
    assert error.retry_after == 1  # 0.6 s for one token
    assert error.headers()["x-ratelimit-reset-tokens"] == "1m0s"


async def test_in_flight_slots_are_held_until_settled_whatever_happened() -> None:
    rl = limiter(Clock())
    c = key(max_concurrent=2, models={"m": RateLimits(max_concurrent=1)})
    first = await rl.acquire(c, "m", 1)
    error = await refused(rl, c, "m")  # the model's cap
    assert error.type == "concurrency"
    assert error.headers()["Retry-After"] == "1"
    other = await rl.acquire(c, "other", 1)
    await refused(rl, c, "other")  # the key's cap: both of its requests are running
    await first.settle(None)  # failed, cut or cancelled: no usage, the slot comes back
    await first.settle(None)  # a second settle gives back nothing more
    await rl.acquire(c, "m", 1)
    await refused(rl, c, "other")
    await other.settle(10)
    await rl.acquire(c, "other", 1)


async def test_a_refused_request_holds_nothing() -> None:
    """Refused by its rate, a request must not keep the in-flight slot it was given."""
    clock = Clock()
    rl = limiter(clock)
    c = key(rpm=1, max_concurrent=1)
    grant = await rl.acquire(c, "m", 1)
    await grant.settle(None)
    error = await refused(rl, c)
    assert error.type == "requests"
    clock.now += 60
    await rl.acquire(c, "m", 1)


async def test_a_key_without_limits_is_never_limited_and_gets_no_headers() -> None:
    rl = limiter(Clock())
    for _ in range(100):
        grant = await rl.acquire(key(), "m", 10**6)
        assert grant.headers == {}
        await grant.settle(10**6)


def test_state_is_kept_only_for_configured_keys_and_models_and_dropped_when_idle() -> None:
    clock = Clock()
    local = LocalLimits(clock)
    c = key(rpm=10, models={"big": RateLimits(rpm=2)})
    for model in (f"model-{i}" for i in range(1000)):  # clients choose model names
        clock.now += 6  # the key's allowance comes back as fast as it is spent
        assert local.acquire(rates_for(c, model, 1), caps_for(c, model)).admitted
    assert len(local) == 1  # the key's rpm only: unconfigured models keep no state
    for name in (f"k{i}" for i in range(100)):  # e.g. keys come and go through keys_file
        local.acquire(rates_for(key(name, rpm=10), "m", 1), [])
    assert len(local) == 101
    clock.now += 61  # all idle for a minute: their state means nothing any more
    local.acquire(rates_for(key("k0", rpm=10), "m", 1), [])
    assert len(local) == 1


def test_headers_have_openais_names_and_formats() -> None:
    local = LocalLimits(Clock())
    rates = rates_for(key(rpm=60, tpm=6000), "m", 1500)
    assert headers(rates, local.acquire(rates, []).ahead) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "4500",
        "x-ratelimit-reset-tokens": "15s",
    }
    assert headers(rates_for(key(tpm=10), "m", 1), [0.0]) == {
        "x-ratelimit-limit-tokens": "10",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "0s",
    }


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0s"),
        (0.0001, "1ms"),
        (0.12, "120ms"),
        (0.9999, "1s"),
        (1.0, "1s"),
        (1.2, "2s"),  # rounded up: never earlier than true
        (59.5, "1m0s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
        (3725.0, "1h2m5s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_rates_cost_what_the_request_may_spend_capped_at_the_allowance() -> None:
    c = key(rpm=5, tpm=100, models={"m": RateLimits(tpm=50)})
    assert rates_for(c, "m", 80) == [
        Rate("{a}:rpm", "requests", 5, 1),
        Rate("{a}:tpm", "tokens", 100, 80),
        Rate("{a}:m:tpm", "tokens", 50, 50),
    ]
    assert rates_for(c, "m", 0)[1].cost == 1  # an estimate of nothing still costs a token


async def test_unreachable_redis_open_limits_locally_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens on the port: every Redis call fails at once."""
    registry = CollectorRegistry()
    settings = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    rl = RateLimiter(settings, GatewayMetrics(registry))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            await rl.start()
            for _ in range(3):
                grant = await rl.acquire(key(rpm=3), "m", 1)  # served on this replica's limits
                await grant.settle(1)
            with pytest.raises(RateLimited):
                await rl.acquire(key(rpm=3), "m", 1)
        assert not rl.shared
        assert registry.get_sample_value("gateway_ratelimit_redis_up") == 0
        assert (registry.get_sample_value("gateway_ratelimit_redis_errors_total") or 0) >= 1
        warnings = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
        assert len(warnings) == 1, caplog.text  # once per outage, not once per request
    finally:
        await rl.close()


async def test_unreachable_redis_closed_answers_503_but_not_for_keys_without_limits() -> None:
    registry = CollectorRegistry()
    settings = RedisSettings(
        url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, on_error="closed"
    )
    rl = RateLimiter(settings, GatewayMetrics(registry))
    await rl.start()
    try:
        for _ in range(3):
            with pytest.raises(Overloaded):
                await rl.acquire(key(rpm=3), "m", 1)
        await rl.acquire(key(), "m", 1)  # nothing to check
        assert registry.get_sample_value("gateway_ratelimit_redis_up") == 0
    finally:
        await rl.close()


# --- over real sockets --------------------------------------------------------------------


def auth(**limits: Any) -> dict[str, Any]:
    return {"keys": [{"name": "team-a", "key": KEY, **limits}]}


BEARER = {"Authorization": f"Bearer {KEY}"}


async def test_the_fourth_request_in_a_minute_gets_a_429_with_the_headers(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim()
    gw = await gateway(worker, auth=auth(rpm=3))
    remaining = []
    for stream in (False, True, False):
        async with client.post(
            f"{gw.url}/v1/chat/completions", json=chat(stream=stream), headers=BEARER
        ) as resp:
            assert resp.status == 200
            await resp.read()
            assert resp.headers["x-ratelimit-limit-requests"] == "3"
            assert "x-ratelimit-limit-tokens" not in resp.headers  # no token limit
            remaining.append(resp.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(), headers=BEARER) as resp:
        assert resp.status == 429
        body = await resp.json()
        # 3 a minute: one back 20 s after the first request (less the time the three took).
        assert 15 <= int(resp.headers["Retry-After"]) <= 20
        assert 14_000 < int(resp.headers["retry-after-ms"]) <= 20_000
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert resp.headers["x-ratelimit-reset-requests"] in ("59s", "1m0s")
    assert body == {
        "error": {
            "message": body["error"]["message"],
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert "Rate limit reached on requests" in body["error"]["message"]
    assert worker.engine.finished == 3
    assert gw.metric("gateway_rate_limited_total", key="team-a", kind="requests") == 1
    assert gw.proxy.admission.in_flight == 0


async def test_token_charges_are_corrected_by_the_usage_the_worker_reports(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """tpm 1000; each request asks for 900 tokens. The worker says they cost 5: without the
    refunds the second would be refused. Then one costs 5000: it was served, the next is not."""
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    async def answer(request: web.Request) -> web.Response:
        completion = {"id": "x", "object": "chat.completion", "choices": [], "usage": usage}
        return web.json_response(completion)

    async with TestServer(scripted_worker(answer)) as upstream:
        worker = {"url": str(upstream.make_url("")), "models": ["sim-model"]}
        gw = await gateway(worker, auth=auth(tpm=1000))
        url = f"{gw.url}/v1/chat/completions"
        for _ in range(3):
            async with client.post(url, json=chat(max_tokens=900), headers=BEARER) as resp:
                assert resp.status == 200, await resp.text()
                assert int(resp.headers["x-ratelimit-remaining-tokens"]) < 100
        usage["total_tokens"] = 5000
        async with client.post(url, json=chat(max_tokens=900), headers=BEARER) as resp:
            assert resp.status == 200
        async with client.post(url, json=chat(max_tokens=1), headers=BEARER) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["type"] == "tokens"
            # ~5015 tokens spent, ~4045 too many for one more, at 60 s per 1000: ~243 s.
            assert 235 <= int(resp.headers["Retry-After"]) <= 250
    assert gw.metric("gateway_rate_limited_total", key="team-a", kind="tokens") == 1


async def test_in_flight_slots_come_back_however_a_request_ends(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """max_concurrent 1: a worker error, a stream cut after its headers, and a client hanging
    up mid-stream each leave the slot free for the next request."""
    worker = await sim()
    gw = await gateway(worker, auth=auth(max_concurrent=1))
    url = f"{gw.url}/v1/chat/completions"

    async def status(body: dict[str, Any], fault: str = "") -> int:
        faults = {"X-Sim-Fault": fault} if fault else {}
        async with client.post(url, json=body, headers={**BEARER, **faults}) as resp:
            await resp.read()
            return resp.status

    assert await status(chat(), "status=500") == 500
    assert await status(chat()) == 200
    assert await status(chat(stream=True, max_tokens=10), "cut_after=3") == 200  # committed
    assert await status(chat()) == 200

    stalled = await client.post(
        url, json=chat(stream=True), headers={**BEARER, "X-Sim-Fault": "stall_after=1"}
    )
    assert stalled.status == 200
    await stalled.content.readline()
    async with client.post(url, json=chat(), headers=BEARER) as resp:
        assert resp.status == 429  # the stalled stream holds the only slot
        assert (await resp.json())["error"]["type"] == "concurrency"
        assert resp.headers["Retry-After"] == "1"
    stalled.close()  # the client hangs up
    await wait_for(lambda: worker.engine.num_running == 0, 5, "worker aborted")
    deadline = time.monotonic() + 5
    while (code := await status(chat())) == 429 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # the handler notices the hang-up on its own schedule
    assert code == 200
    assert gw.metric("gateway_rate_limited_total", key="team-a", kind="concurrency") >= 1


async def test_the_openai_sdk_waits_out_retry_after_and_then_succeeds(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    """rpm 60: the minute's 60 requests at once, then one more each second. Calls go on until
    one meets a 429 (whatever the machine's speed, calls soon outpace one a second); the SDK
    must then wait what the 429 said and get through on its one retry."""
    gw = await gateway(await sim(), auth=auth(rpm=60))
    sent: list[float] = []
    answered: list[tuple[float, int, Any]] = []

    async def on_request(request: Any) -> None:
        sent.append(time.monotonic())

    async def on_response(response: Any) -> None:
        answered.append((time.monotonic(), response.status_code, response.headers))

    hooks = {"request": [on_request], "response": [on_response]}
    http = openai.DefaultAsyncHttpxClient(event_hooks=hooks)
    sdk = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=1, http_client=http)
    async with sdk:
        for _ in range(300):
            before = len(answered)
            answer = await sdk.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            assert answer.choices[0].message.content
            if len(answered) > before + 1:
                break
        else:
            pytest.fail("no call was ever refused")
    assert [status for _, status, _ in answered[before:]] == [429, 200]
    refused_at, _, refusal = answered[before]
    assert refusal["Retry-After"] == "1"
    wait = int(refusal["retry-after-ms"]) / 1000
    assert 0 < wait <= 1
    assert sent[-1] - refused_at >= wait - 0.005  # it waited as told before retrying
    assert gw.metric("gateway_rate_limited_total", key="team-a", kind="requests") == 1
