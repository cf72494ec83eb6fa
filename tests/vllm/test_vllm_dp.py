"""Cache-aware routing to a real data-parallel vLLM worker (``--data-parallel-size 2`` behind one
API server): each engine has its own prefix cache and publishes on the event port plus its
rank, which the gateway learns from the worker (``endpoint: auto``). A prompt held by engine 1
is sent there with ``X-data-parallel-rank``, where vLLM's own balancer, choosing among idle
engines, starts from engine 0. vLLM's per-engine hit counters confirm it."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.app import KV_INDEX
from gateway.kvindex import source
from tests.conftest import GatewayFactory
from tests.helpers import wait_for
from tests.processes import free_port_with
from tests.vllm.compare import TIMEOUT
from tests.vllm.fleet import MODEL, VLLMWorker

pytestmark = pytest.mark.timeout(300)

EVENTS, REPLAY = 1000, 2000  # rank r publishes on the worker's HTTP port plus these plus r
BLOCK = 128  # the CPU build's block size
PREFIX = 4 * BLOCK
_COUNTER = re.compile(
    r'^vllm:prefix_cache_(hits|queries)_total\{engine="(\d+)",model_name="[^"]*"\} ([0-9.eE+]+)$',
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def dp_worker() -> Iterator[VLLMWorker]:
    port = free_port_with(EVENTS, EVENTS + 1, REPLAY, REPLAY + 1)
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port + EVENTS}",
        "replay_endpoint": f"tcp://*:{port + REPLAY}",
        "topic": "kv",
    }
    args = [
        "--data-parallel-size", "2",
        "--enable-prefix-caching", "--kv-events-config", json.dumps(config),
    ]  # fmt: skip
    worker = VLLMWorker("dp", args, port=port)
    worker.start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


async def counters(
    session: aiohttp.ClientSession, worker: VLLMWorker
) -> dict[tuple[str, str], float]:
    """vLLM's prefix-cache counters per engine: {(hits|queries, engine): tokens}."""
    async with session.get(worker.url + "/metrics", timeout=TIMEOUT) as response:
        text = await response.text()
    return {(kind, engine): float(value) for kind, engine, value in _COUNTER.findall(text)}


async def test_a_prefix_goes_to_the_engine_that_holds_it(
    dp_worker: VLLMWorker, gateway: GatewayFactory
) -> None:
    rng = random.Random(22)
    prefix = [rng.randrange(10, 2000) for _ in range(PREFIX)]
    # The worker says where each engine publishes (GET /kv_event_sources: tcp://*:port+rank).
    kv_events = {"enabled": True, "endpoint": "auto"}
    worker = {"url": dp_worker.url, "models": [MODEL]}
    gw = await gateway(worker, routing={"kv_events": kv_events})
    index = gw.app[KV_INDEX]
    engines = [source(dp_worker.url, rank) for rank in (0, 1)]
    await wait_for(lambda: all(index.live(e) for e in engines), 30, "subscribed to both engines")

    def body(tail: int) -> dict[str, object]:
        prompt = prefix + [rng.randrange(10, 2000) for _ in range(tail)]
        return {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}

    async with aiohttp.ClientSession() as session:
        # Seeded on engine 1, straight to vLLM: four full blocks of the prefix stored there.
        async with session.post(
            dp_worker.url + "/v1/completions",
            json=body(100),
            headers={"X-data-parallel-rank": "1"},
            timeout=TIMEOUT,
        ) as response:
            assert response.status == 200, await response.text()
        keys = index.keys(prefix, BLOCK)
        await wait_for(
            lambda: index.match(keys, engines) == {engines[0]: 0, engines[1]: 4}, 10, "stored"
        )
        before = await counters(session, dp_worker)
        for tail in (50, 150, 250):
            async with session.post(
                gw.url + "/v1/completions", json=body(tail), timeout=TIMEOUT
            ) as r:
                assert r.status == 200, await r.text()
        after = await counters(session, dp_worker)
    # Each request reused the whole prefix on engine 1; engine 0 was not asked at all.
    assert after["hits", "1"] - before["hits", "1"] == 3 * PREFIX
    assert after["queries", "0"] == before["queries", "0"]
    assert gw.metric("gateway_kv_predicted_hit_tokens_total", worker=dp_worker.url) == 3 * PREFIX
