"""Rate limits shared by gateway replicas through a real Redis (Debian's redis-server, started
here on 127.0.0.1; `make redis-tools` installs it, and without it these tests fail).

1. Two gateway processes share one key's limit: together they admit exactly the limit.
2. Redis stops: both keep serving on local limits, and their metric and log say so.
3. Redis comes back: the limit is shared again.
"""

from __future__ import annotations

import http.client
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

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


def start_redis(port: int) -> Proc:
    server = shutil.which("redis-server")
    assert server is not None, "redis-server is not installed: run `make redis-tools`"
    proc = Proc(
        [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        name="redis-server",
    )
    poll_until(lambda: _pong(port), 10.0, "redis answers PING")
    return proc


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


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


def shared_again(gw: GatewayProc) -> bool:
    return chat(gw.url, ROOMY) == 200 and metric(gw.url, "gateway_ratelimit_redis_up") == 1


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[int, Proc, list[GatewayProc]]]:
    redis_port = free_port()
    redis = start_redis(redis_port)
    worker = start_simulator("--itl", "0", "--ttft", "0")
    gateways: list[GatewayProc] = []
    try:
        keys = [
            {"name": "shared", "key": KEY, "rpm": 10},
            {"name": "roomy", "key": ROOMY, "rpm": 1000},
        ]
        for i in range(2):
            config = write_config(
                tmp_path / f"gateway-{i}.yaml",
                [worker.url],
                auth={"keys": keys},
                redis={"url": f"redis://{HOST}:{redis_port}/0", "timeout": 0.2},
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
    statuses = [chat(gw.url, KEY) for _ in range(15) for gw in (one, two)]
    assert statuses.count(200) == 10, statuses  # not 10 per replica: 10 in all
    assert set(statuses) == {200, 429}
    assert metric(one.url, "gateway_ratelimit_redis_up") == 1

    redis.kill()
    served = [chat(gw.url, ROOMY) for _ in range(5) for gw in (one, two)]
    assert served == [200] * 10  # no request fails because Redis is gone
    for gw in (one, two):
        assert metric(gw.url, "gateway_ratelimit_redis_up") == 0
        assert (metric(gw.url, "gateway_ratelimit_redis_errors_total") or 0) >= 1
        gw.proc.wait_line(r"redis unreachable .*rate limits are local", 5.0)
    # Local limits still hold: each replica allows the shared key its own 10 a minute.
    local = [chat(one.url, KEY) for _ in range(12)]
    assert local.count(200) == 10

    redis = start_redis(redis_port)
    try:
        poll_until(
            lambda: (
                chat(one.url, ROOMY) == 200 and metric(one.url, "gateway_ratelimit_redis_up") == 1
            ),
            10.0,
            "redis in use again",
        )
        one.proc.wait_line(r"redis reachable again", 5.0)
        # Shared again, and Redis starts from nothing: 10 in all for the shared key.
        again = [chat(gw.url, KEY) for _ in range(8) for gw in (one, two)]
        assert again.count(200) == 10
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
                redis={"url": f"redis://{HOST}:{redis_port}/0", "timeout": 0.2},
            )
            gateways.append(start_gateway(config))
        one, two = gateways
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(chat, one.url, KEY) for _ in range(2)]
            poll_until(lambda: in_flight(one.url) == 2, 10.0, "two requests running")
            assert chat(two.url, KEY) == 429
            assert [f.result(timeout=20) for f in slow] == [200, 200]
        assert chat(two.url, KEY) == 200
    finally:
        for gw in gateways:
            gw.proc.kill()
        worker.proc.kill()
        redis.kill()


def in_flight(url: str) -> float:
    return metric(url, "gateway_requests_in_flight") or 0.0
