"""Failover on one-worker fleet shapes with real vLLM as the primary: its context-length 400
recognised and sent to a longer-context model, and an outage of its only worker served by the
fallback model until it is back. The fallback is a simulated worker serving another model name
(both real workers serve the one tiny model, and vLLM answers 404 for a name it does not
serve)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import wait_for
from tests.vllm.compare import TIMEOUT
from tests.vllm.conftest import VLLMFleet, worker_entry
from tests.vllm.fleet import MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.timeout(300)

LONG = "long-context"


def chat(content: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": MODEL, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0,
    }  # fmt: skip


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        return response.status, orjson.loads(await response.read())


async def test_vllms_context_length_error_goes_to_the_context_fallback(
    vllm: VLLMFleet, gateway: GatewayFactory, sim: SimFactory
) -> None:
    longer = await sim(models=(LONG,), max_model_len=8 * MAX_MODEL_LEN)
    too_long = chat("gateway " * (2 * MAX_MODEL_LEN))
    async with aiohttp.ClientSession() as session:
        status, direct = await post(session, vllm.plain.url, too_long)
        assert status == 400, direct  # vLLM's own refusal, as it words it
        plain = await gateway(worker_entry(vllm.plain), {"url": longer.url})
        assert await post(session, plain.url, too_long) == (400, direct)  # unchanged without

        gw = await gateway(
            worker_entry(vllm.plain), {"url": longer.url}, context_fallbacks={MODEL: [LONG]}
        )
        status, answer = await post(session, gw.url, too_long)
        assert status == 200, answer
        assert answer["model"] == LONG
        status, answer = await post(session, gw.url, chat("short"))  # fits: vLLM answers
        assert (status, answer["model"]) == (200, MODEL)
    assert gw.metric("gateway_retries_total", reason="context_length_exceeded") == 1


async def test_an_outage_of_the_only_vllm_is_served_by_the_fallback_model(
    vllm: VLLMFleet, gateway: GatewayFactory, sim: SimFactory
) -> None:
    fallback = await sim(models=(LONG,))
    interval = 0.5
    gw = await gateway(
        worker_entry(vllm.chunky),
        {"url": fallback.url},
        fallbacks={MODEL: [LONG]},
        health={"interval": interval, "timeout": 1.0},
    )
    primary = next(w for w in gw.fleet.pool(MODEL) if w.url == vllm.chunky.url)
    async with aiohttp.ClientSession() as session:
        assert (await post(session, gw.url, chat("hi")))[1]["model"] == MODEL
        # The whole process group: nothing listens at its address. Off the loop: a stop that
        # blocked it for over a probe's timeout failed the simulator's probe as well.
        await asyncio.to_thread(vllm.chunky.stop)
        for _ in range(10):
            started = time.monotonic()
            status, answer = await post(session, gw.url, chat("hi"))
            assert (status, answer["model"]) == (200, LONG), answer
            assert time.monotonic() - started < 1.0  # nobody waits on the dead worker
        assert not primary.in_rotation
        await asyncio.to_thread(vllm.chunky.start)
        await asyncio.to_thread(vllm.chunky.wait_ready)
        # Back within one probe interval of answering its /health again.
        await wait_for(lambda: primary.in_rotation, interval + 2.0, "the primary is back")
        assert (await post(session, gw.url, chat("hi")))[1]["model"] == MODEL
