"""Input limits: what no worker should be sent is a 400 naming the field; spoofable identity
headers never reach a worker; only the OpenAI routes are forwarded at all."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.request import CHAT, check_input_limits, parse_request
from gateway.settings import InputLimitSettings, RoutingSettings
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, header_recorder

LIMITS = {"max_tokens": 100, "max_n": 2, "max_messages": 3, "max_json_depth": 8}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 101}, "max_tokens"),
        ({"max_completion_tokens": 1000}, "max_completion_tokens"),
        ({"max_tokens": "101"}, "max_tokens"),  # pydantic reads "101" as 101: capped too
        ({"n": 3}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}] * 4}, "messages"),
        ({"metadata": nested(10)}, None),
    ],
)
async def test_over_the_limits_is_a_400_naming_the_field(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    fields: dict[str, Any],
    param: str | None,
) -> None:
    worker = await sim()
    gw = await gateway(worker, input=LIMITS)
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(**fields)) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert worker.engine.finished == 0


@pytest.mark.parametrize(
    "fields", [{"max_tokens": -1}, {"max_tokens": True}, {"n": 0}, {"n": "x"}, {"stream": 3}]
)
async def test_a_value_of_the_wrong_type_is_the_workers_to_refuse(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, fields: dict[str, Any]
) -> None:
    """No cap applies to what is not a number: the worker's own answer reaches the client."""
    worker = await sim()
    gw = await gateway(worker, input=LIMITS)
    answers = []
    for url in (gw.url, worker.url):
        async with client.post(f"{url}/v1/chat/completions", json=chat(**fields)) as resp:
            answers.append((resp.status, (await resp.json())["error"]["type"]))
    assert answers[0] == answers[1]


async def test_within_the_limits_passes(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), input=LIMITS)
    body = chat(max_tokens=100, n=1, metadata=nested(5))
    async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200


def test_depth_check_counts_nesting_not_size() -> None:
    wide = {"model": "m", "input": [[1, 2, 3]] * 5000}
    body = orjson.dumps(wide)
    assert check_input_limits(wide, body, InputLimitSettings(max_json_depth=3)) == 0
    deep = {"model": "m", "x": nested(3)}
    with pytest.raises(Exception, match="nested deeper than 3"):
        check_input_limits(deep, orjson.dumps(deep), InputLimitSettings(max_json_depth=3))


def _depth(value: object) -> int:
    """The nesting depth by definition: a container is one deeper than its deepest child."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _random_nest(rng: random.Random, budget: int) -> object:
    roll = rng.random()
    if budget <= 0 or roll < 0.3:
        return rng.choice([1, "s", None, True, 2.5, "[{"])
    items = [_random_nest(rng, budget - rng.randint(1, 3)) for _ in range(rng.randint(0, 4))]
    if roll < 0.65:
        return items
    return {f"k{i}": item for i, item in enumerate(items)}


def test_depth_check_agrees_with_the_definition_on_random_bodies() -> None:
    """3,000 random nests of dicts, lists and scalars (strings holding brackets among them),
    each held to limits around its own depth: refused exactly when deeper than the limit."""
    rng = random.Random(21)
    for _ in range(3000):
        data = {"model": "m", "x": _random_nest(rng, rng.randint(1, 14))}
        depth = _depth(data)
        body = orjson.dumps(data)
        for limit in (max(depth - 1, 1), depth, depth + 1):
            refused = False
            try:
                check_input_limits(data, body, InputLimitSettings(max_json_depth=limit))
            except InvalidRequest:
                refused = True
            assert refused == (depth > limit), (data, limit)


def test_token_estimate_is_body_bytes_over_four_plus_the_completion_asked() -> None:
    body = orjson.dumps(chat(max_tokens=50, n=2))
    meta = parse_request(body, CHAT, RoutingSettings(), InputLimitSettings())
    assert meta.token_estimate == len(body) // 4 + 100


async def test_spoofable_and_credential_headers_never_reach_a_worker(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    async with header_recorder() as (url, seen):
        gw = await gateway({"url": url, "models": ["sim-model"]})
        spoofed = {
            "X-Forwarded-For": "10.0.0.1",
            "Forwarded": "for=10.0.0.1",
            "X-Real-IP": "10.0.0.1",
            "X-Forwarded-Host": "evil",
            "Cookie": "session=1",
            "X-Api-Key": "k",
            "X-Custom": "kept",
        }
        async with client.post(
            f"{gw.url}/v1/chat/completions", json=chat(), headers=spoofed
        ) as resp:
            assert resp.status == 200
    [headers] = seen
    for name in spoofed:
        if name != "X-Custom":
            assert name not in headers
    assert headers["X-Custom"] == "kept"


@pytest.mark.parametrize(
    "path",
    [
        "/sleep",
        "/wake_up",
        "/reset_prefix_cache",
        "/collective_rpc",
        "/v1/../sleep",
        "/%2e%2e/sleep",
    ],
)
async def test_no_path_reaches_vllms_admin_routes(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, path: str
) -> None:
    gw = await gateway(await sim())
    async with client.post(f"{gw.url}{path}", json={}) as resp:
        assert resp.status in (404, 405)
        assert "error" in await resp.json()


async def test_header_bytes_reach_the_worker_as_the_client_sent_them(
    gateway: GatewayFactory,
) -> None:
    """Forwarded headers are the client's bytes (``request.raw_headers``): a value that is not
    ASCII, or not even UTF-8, arrives unchanged, and a dropped name matches in any case."""
    value = b"caf\xc3\xa9 \xff"
    async with header_recorder() as (url, seen):
        gw = await gateway({"url": url, "models": ["sim-model"]})
        body = orjson.dumps(chat())
        host = gw.url.removeprefix("http://")
        reader, writer = await asyncio.open_connection(*host.rsplit(":", 1))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Content-Type: application/json\r\nX-Note: " + value + b"\r\n"
            b"x-FORWARDED-for: 10.0.0.1\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [headers] = seen
    assert headers["X-Note"].encode("utf-8", "surrogateescape") == value
    assert "X-Forwarded-For" not in headers
