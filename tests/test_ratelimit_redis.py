"""Rate limits shared through a real Redis (Debian's redis-server, started here on 127.0.0.1 on a
free port; `make redis-tools` installs it, and without it these tests fail).

In process, limiters standing for replicas:

1. Two limiters asking at once admit exactly the limit between them.
2. Token charges are corrected in Redis; a debt outlives the minute it was run up in.
3. A Redis that forgot the scripts (restarted, SCRIPT FLUSH) is taught them again, silently.
4. A live request's in-flight lease is renewed; a dead replica's expires.
5. Settles cancelled midway (the client hung up) still give their slots back; a settle while
   Redis is away is given back when it returns.

With gateway processes:

6. Two gateways share one key's limit: together they admit exactly the limit.
7. Redis stops: both keep serving on local limits, their metric and log say so (once); Redis
   comes back: they notice by themselves, say so, and share the limit again.
8. An in-flight cap holds across gateways.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.auth import Client
from gateway.errors import RateLimited
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import Grant, RateLimiter
from gateway.ratelimit_redis import MAX_CONNECTIONS
from gateway.settings import RateLimits, RedisSettings
from tests.processes import (
    HOST,
    GatewayProc,
    Proc,
    free_port,
    poll_until,
    start_gateway,
    start_simulator,
    write_config,
)

KEY = "sk-test-shared-0001"
ROOMY = "sk-test-roomy-00001"
TIMEOUT = 0.5  # generous per Redis call: a slow call would fall back and spoil the counts


def start_redis(port: int) -> Proc:
    server = shutil.which("redis-server")
    assert server is not None, "redis-server is not installed: run `make redis-tools`"
    proc = Proc(
        [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        name="redis-server",
    )
    try:
        poll_until(lambda: _pong(port), 10.0, "redis answers PING")
    except BaseException:
        proc.kill()
        raise
    return proc


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_url() -> Iterator[str]:
    port = free_port()
    server = start_redis(port)
    try:
        yield f"redis://{HOST}:{port}/0"
    finally:
        server.kill()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[RateLimiter, CollectorRegistry]]:
    """A started limiter on the test's Redis, and its registry (more: ``limiter_on``)."""
    registry = CollectorRegistry()
    first = RateLimiter(RedisSettings(url=redis_url, timeout=TIMEOUT), GatewayMetrics(registry))
    await first.start()
    try:
        yield first, registry
    finally:
        await first.close()


async def limiter_on(url: str, lease_seconds: float = 30.0) -> RateLimiter:
    metrics = GatewayMetrics(CollectorRegistry())
    settings = RedisSettings(url=url, timeout=TIMEOUT)
    limiter = RateLimiter(settings, metrics, lease_seconds=lease_seconds)
    await limiter.start()
    return limiter


def key(**limits: Any) -> Client:
    return Client("team", RateLimits(**limits))


async def outcome(limiter: RateLimiter, client: Client, tokens: int = 1) -> Grant | RateLimited:
    try:
        return await limiter.acquire(client, "m", tokens)
    except RateLimited as exc:
        return exc


# --- in process ---------------------------------------------------------------------------


async def test_two_limiters_asking_at_once_admit_exactly_the_limit(
    redis_url: str, replicas: tuple[RateLimiter, CollectorRegistry]
) -> None:
    one, registry = replicas
    two = await limiter_on(redis_url)
    try:
        tries = [outcome(lim, key(rpm=10)) for _ in range(15) for lim in (one, two)]
        results = await asyncio.gather(*tries)
    finally:
        await two.close()
    grants = [r for r in results if isinstance(r, Grant)]
    assert len(grants) == 10  # not 10 each: one allowance
    assert sorted(int(g.headers["x-ratelimit-remaining-requests"]) for g in grants) == list(
        range(10)
    )
    assert all(g.shared for g in grants)
    refusals = [r for r in results if isinstance(r, RateLimited)]
    assert all(5 <= r.retry_after <= 6 for r in refusals)  # one back every 6 s
    assert registry.get_sample_value("gateway_ratelimit_redis_up") == 1
    assert registry.get_sample_value("gateway_ratelimit_redis_errors_total") == 0


async def test_token_charges_are_corrected_in_redis_and_a_debt_outlives_the_minute(
    replicas: tuple[RateLimiter, CollectorRegistry], raw: aioredis.Redis
) -> None:
    one, _ = replicas
    grant = await one.acquire(key(tpm=1000), "m", 900)
    refused = await outcome(one, key(tpm=1000), 200)
    assert isinstance(refused, RateLimited)
    assert refused.type == "tokens"
    await grant.settle(100)  # 800 back
    grant = await one.acquire(key(tpm=1000), "m", 200)
    assert grant.headers["x-ratelimit-remaining-tokens"] in ("700", "701")
    await grant.settle(3200)  # 3000 more than estimated: ~3300 spent, 200 s of allowance
    refused = await outcome(one, key(tpm=1000), 1)
    assert isinstance(refused, RateLimited)
    assert 137 <= refused.retry_after <= 139
    assert refused.headers()["x-ratelimit-reset-tokens"] in ("3m17s", "3m18s")
    # The state must live as long as the debt, not expire with the minute.
    assert await raw.pttl("vllm-gateway:{team}:tpm") > 190_000


async def test_a_redis_that_forgot_the_scripts_is_taught_them_again(
    replicas: tuple[RateLimiter, CollectorRegistry], raw: aioredis.Redis
) -> None:
    one, registry = replicas
    await one.acquire(key(rpm=10), "m", 1)
    await raw.script_flush()
    grant = await one.acquire(key(rpm=10), "m", 1)
    assert grant.shared
    assert grant.headers["x-ratelimit-remaining-requests"] == "8"
    assert registry.get_sample_value("gateway_ratelimit_redis_errors_total") == 0
    assert registry.get_sample_value("gateway_ratelimit_redis_up") == 1


async def test_a_live_lease_is_renewed_and_a_dead_replicas_lease_expires(redis_url: str) -> None:
    """Leases of 1 s: a request running for 2.5 s keeps its slot (renewed); when its replica
    dies without settling, the slot comes back within about a second."""
    one, two = await limiter_on(redis_url, 1.0), await limiter_on(redis_url, 1.0)
    try:
        held = await one.acquire(key(max_concurrent=1), "m", 1)
        assert held.shared
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            refused = await outcome(two, key(max_concurrent=1))
            assert isinstance(refused, RateLimited), "a running request lost its slot"
            assert refused.type == "concurrency"
            await asyncio.sleep(0.05)
        await one.close()  # dies mid-request: no settle, no more renewals
        died = time.monotonic()
        while isinstance(await outcome(two, key(max_concurrent=1)), RateLimited):
            assert time.monotonic() - died < 3.0, "the dead replica's lease never expired"
            await asyncio.sleep(0.02)
    finally:
        await one.close()
        await two.close()


async def test_settles_cancelled_midway_still_give_their_slots_back(redis_url: str) -> None:
    """aiohttp cancels a handler when its client hangs up, which clients do the moment they
    have the answer: the slots must come back in Redis anyway, not when the leases expire.
    More requests end at once than the Redis pool has connections, so some settles are still
    waiting for one, before their command went out, when they are cancelled."""
    many = 3 * MAX_CONNECTIONS
    one, two = await limiter_on(redis_url), await limiter_on(redis_url)
    try:
        held = [await one.acquire(key(max_concurrent=many), "m", 1) for _ in range(many)]
        settling = [asyncio.create_task(grant.settle(None)) for grant in held]
        await asyncio.sleep(0)
        for task in settling:
            task.cancel()
        await asyncio.gather(*settling, return_exceptions=True)
        since = time.monotonic()
        while True:
            probes = [await outcome(two, key(max_concurrent=many)) for _ in range(many)]
            admitted = [p for p in probes if isinstance(p, Grant)]
            for grant in admitted:
                await grant.settle(None)
            if len(admitted) == many:
                assert two.shared, "admitted on local limits (a Redis call failed), not in Redis"
                break
            assert time.monotonic() - since < 2.0, f"{many - len(admitted)} slots lost"
            await asyncio.sleep(0.02)
    finally:
        await one.close()
        await two.close()


async def wait_admitted(limiter: RateLimiter, failure: str, within: float = 2.0) -> None:
    """Until ``limiter`` admits a max_concurrent=1 request (given back at once)."""
    since = time.monotonic()
    while isinstance(probe := await outcome(limiter, key(max_concurrent=1)), RateLimited):
        assert time.monotonic() - since < within, failure
        await asyncio.sleep(0.02)
    await probe.settle(None)
    assert limiter.shared, "admitted on local limits (a Redis call failed), not in Redis"


async def test_a_settle_while_redis_is_away_is_given_back_when_it_returns() -> None:
    """Redis stalls (SIGSTOP) while a request ends: its slot is given back as soon as Redis
    answers again, not 30 s later when the lease would have expired."""
    port = free_port()
    server = start_redis(port)
    url = f"redis://{HOST}:{port}/0"
    one, two = await limiter_on(url), await limiter_on(url)
    try:
        held = await one.acquire(key(max_concurrent=1), "m", 1)
        os.kill(server.popen.pid, signal.SIGSTOP)
        try:
            await held.settle(None)  # times out after TIMEOUT: Redis is away for `one`
        finally:
            os.kill(server.popen.pid, signal.SIGCONT)
        await wait_admitted(two, "the slot stayed taken after Redis returned", within=5.0)
    finally:
        await one.close()
        await two.close()
        server.kill()


# --- gateway processes --------------------------------------------------------------------


def chat(url: str, key: str) -> int:
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = orjson.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def metric(url: str, name: str) -> float | None:
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def burst(urls: list[str], rounds: int, key: str = KEY) -> tuple[list[int], float]:
    """``rounds`` requests to each URL, alternating; the statuses and the seconds it took."""
    started = time.monotonic()
    statuses = [chat(url, key) for _ in range(rounds) for url in urls]
    return statuses, time.monotonic() - started


def assert_admitted_10_a_minute(statuses: list[int], elapsed: float) -> None:
    # rpm 10: the whole 10 at once, then one more every 6 s. A burst takes well under 6 s, so
    # this is "exactly 10"; on a machine slow enough to take longer, the refills are allowed.
    assert 10 <= statuses.count(200) <= 10 + int(elapsed / 6), (statuses, elapsed)
    assert set(statuses) == {200, 429}, statuses


def count_lines(proc: Proc, pattern: str) -> int:
    return sum(1 for line in list(proc.lines) if re.search(pattern, line))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[int, Proc, list[GatewayProc]]]:
    redis_port = free_port()
    redis = start_redis(redis_port)
    worker = start_simulator("--itl", "0", "--ttft", "0")
    gateways: list[GatewayProc] = []
    try:
        keys = [
            {"name": "shared", "key": KEY, "rpm": 10},
            {"name": "roomy", "key": ROOMY, "rpm": 10_000},
        ]
        for i in range(2):
            config = write_config(
                tmp_path / f"gateway-{i}.yaml",
                [worker.url],
                auth={"keys": keys},
                redis={"url": f"redis://{HOST}:{redis_port}/0", "timeout": TIMEOUT},
            )
            gateways.append(start_gateway(config))
        yield redis_port, redis, gateways
    finally:
        for gw in gateways:
            gw.proc.kill()
        worker.proc.kill()
        redis.kill()


@pytest.mark.timeout(90)
def test_replicas_share_one_limit_and_survive_redis_going_away(
    stack: tuple[int, Proc, list[GatewayProc]],
) -> None:
    redis_port, redis, (one, two) = stack
    both = [one.url, two.url]
    assert_admitted_10_a_minute(*burst(both, 15))  # not 10 per replica: 10 in all
    assert metric(one.url, "gateway_ratelimit_redis_up") == 1

    redis.kill()
    served, _ = burst(both, 5, ROOMY)
    assert served == [200] * 10  # no request fails because Redis is gone
    for gw in (one, two):
        assert metric(gw.url, "gateway_ratelimit_redis_up") == 0
        assert (metric(gw.url, "gateway_ratelimit_redis_errors_total") or 0) >= 1
        gw.proc.wait_line(r"redis unreachable .*rate limits are local", 5.0)
    # Local limits still hold: each replica allows the shared key its own 10 a minute.
    assert_admitted_10_a_minute(*burst([one.url], 12))
    for gw in (one, two):
        assert count_lines(gw.proc, "redis unreachable") == 1  # once per outage

    redis = start_redis(redis_port)
    try:
        for gw in (one, two):  # no traffic needed: they look for it themselves
            gw.proc.wait_line(r"redis reachable again", 10.0)
            assert metric(gw.url, "gateway_ratelimit_redis_up") == 1
        # Shared again, and this Redis starts from nothing: 10 in all for the shared key.
        assert_admitted_10_a_minute(*burst(both, 8))
    finally:
        redis.kill()


@pytest.mark.timeout(60)
def test_requests_in_flight_are_capped_across_replicas(tmp_path: Path) -> None:
    """max_concurrent 2, shared: with two slow requests running on one replica, a third on the
    other is refused (429, concurrency); once they finish, it is admitted."""
    redis_port = free_port()
    redis = start_redis(redis_port)
    worker = start_simulator("--itl", "0.05", "--ttft", "0", "--default-max-tokens", "20")
    gateways: list[GatewayProc] = []
    try:
        for i in range(2):
            config = write_config(
                tmp_path / f"gateway-{i}.yaml",
                [worker.url],
                auth={"keys": [{"name": "capped", "key": KEY, "max_concurrent": 2}]},
                redis={"url": f"redis://{HOST}:{redis_port}/0", "timeout": TIMEOUT},
            )
            gateways.append(start_gateway(config))
        one, two = gateways
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(chat, one.url, KEY) for _ in range(2)]
            poll_until(lambda: in_flight(one.url) == 2, 10.0, "two requests running")
            assert chat(two.url, KEY) == 429
            assert [f.result(timeout=20) for f in slow] == [200, 200]
        # A client sees its answer a moment before its gateway gives the slot back.
        poll_until(lambda: chat(two.url, KEY) == 200, 5.0, "a slot free again")
    finally:
        for gw in gateways:
            gw.proc.kill()
        worker.proc.kill()
        redis.kill()


def in_flight(url: str) -> float:
    return metric(url, "gateway_requests_in_flight") or 0.0
