"""An outage of a model's only worker, with a fallback model configured: during it, every
request is served by the fallback and none waits on the dead worker; after it, the primary is
used again within one probe interval. Real sockets, simulated workers (model ``a`` on its own
server, ``b`` on another)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim_app
from tests.conftest import GatewayFactory
from tests.processes import HOST, free_port

pytestmark = pytest.mark.timeout(60)

PROBE_INTERVAL = 0.5
CONNECT_TIMEOUT = 1.0


async def answered_by(client: aiohttp.ClientSession, url: str) -> tuple[str, float]:
    """The model that answered a request for ``a``, and how long the request took."""
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    started = time.monotonic()
    async with client.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    return answer["model"], time.monotonic() - started


async def start_primary(port: int) -> TestServer:
    server = TestServer(create_sim_app(SimConfig(models=("a",))), host=HOST, port=port)
    await server.start_server()
    return server


async def test_an_outage_of_the_only_primary_is_served_by_the_fallback(
    gateway: GatewayFactory, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    primary = await start_primary(port)
    fallback = TestServer(create_sim_app(SimConfig(models=("b",))), host=HOST)
    await fallback.start_server()
    gw = await gateway(
        {"url": f"http://{HOST}:{port}", "models": ["a"]},
        {"url": str(fallback.make_url("")).rstrip("/"), "models": ["b"]},
        fallbacks={"a": ["b"]},
        health={"interval": PROBE_INTERVAL, "timeout": 0.5},
        timeouts={"queue": 0.5, "connect": CONNECT_TIMEOUT, "first_token": 5.0, "idle": 5.0,
                  "total": 20.0},
        logging={"level": "INFO"},
    )  # fmt: skip
    try:
        assert (await answered_by(client, gw.url))[0] == "a"

        await primary.close()
        caplog.set_level(logging.INFO, logger="gateway.access")
        outage_end = time.monotonic() + 3 * PROBE_INTERVAL
        during = []
        while time.monotonic() < outage_end:
            during.append(await answered_by(client, gw.url))
        assert {model for model, _ in during} == {"b"}
        # Nobody waited on the dead worker: a refused connect costs no timeout, and once a
        # probe saw it down no attempt goes there at all.
        assert max(seconds for _, seconds in during) < CONNECT_TIMEOUT
        attempts = [r.attempts for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
        assert len(attempts) == len(during)
        assert attempts[-1] == 1
        assert sum(a - 1 for a in attempts) <= 2  # at most the requests before the first probe

        primary = await start_primary(port)
        back = time.monotonic()
        while (await answered_by(client, gw.url))[0] != "a":
            assert time.monotonic() - back < PROBE_INTERVAL + 1.0, "the primary is not used"
            await asyncio.sleep(0.05)
    finally:
        await primary.close()
        await fallback.close()
