"""Data-parallel workers (vLLM ``--data-parallel-size`` behind one API server): every engine has
its own cache and publishes on the endpoints' port + its rank. The gateway subscribes to each
engine, and sends a prompt to the worker holding it with ``X-data-parallel-rank`` naming the
engine that holds it, where the worker's own balancer would have taken turns."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import KV_INDEX
from gateway.kvevents import Endpoints, KVEvents, KVSourcesError, sources_plan
from gateway.kvindex import source
from gateway.kvwire import BlockStored, rank_endpoint
from gateway.simulator import SimConfig, create_app
from gateway.simulator.app import SIM
from gateway.simulator.kvpublish import EventPublisher
from gateway.upstream import with_rank
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import wait_for
from tests.processes import free_port_with
from tests.test_kvevents import BLOCK, PROMPT, WatchedIndex

pytestmark = pytest.mark.timeout(20)
WORKER = "http://127.0.0.1:8001"


@pytest.mark.parametrize(
    ("endpoint", "rank", "expected"),
    [
        ("tcp://*:5557", 0, "tcp://*:5557"),
        ("tcp://*:5557", 3, "tcp://*:5560"),
        ("tcp://[::1]:5557", 1, "tcp://[::1]:5558"),
        ("tcp://*:0", 2, "tcp://*:0"),  # any port: left to the system, as vLLM leaves it
        ("inproc://cache", 1, "inproc://cache_dp1"),
    ],
)
def test_each_rank_publishes_on_the_port_plus_its_rank(
    endpoint: str, rank: int, expected: str
) -> None:
    assert rank_endpoint(endpoint, rank) == expected


def test_the_gateway_s_rank_replaces_the_client_s() -> None:
    headers = b"Content-Type: application/json\r\nx-data-parallel-rank: 5\r\nX-Request-Id: r\r\n"
    assert with_rank(headers, 1) == (
        b"Content-Type: application/json\r\nX-Request-Id: r\r\nX-data-parallel-rank: 1\r\n"
    )


@pytest.mark.parametrize("endpoint", ["templates", "auto"])
async def test_a_prompt_goes_to_the_engine_that_holds_it(
    gateway: GatewayFactory, client: aiohttp.ClientSession, endpoint: str
) -> None:
    """With the endpoints configured, or (auto) as the worker gives them at
    /kv_event_sources."""
    port = free_port_with(1000, 1001, 2000, 2001)
    config = SimConfig(
        prefix_cache_blocks=64,
        block_tokens=BLOCK,
        data_parallel_size=2,
        kv_events_endpoint=f"tcp://127.0.0.1:{port + 1000}",
        kv_events_replay_endpoint=f"tcp://127.0.0.1:{port + 2000}",
    )
    server = TestServer(create_app(config), port=port)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        kv_events: dict[str, object] = {
            "enabled": True,
            "endpoint": "tcp://{host}:{port+1000}",
            "replay_endpoint": "tcp://{host}:{port+2000}",
            "data_parallel_size": 2,
        }
        if endpoint == "auto":
            kv_events = {"enabled": True, "endpoint": "auto"}
        gw = await gateway(url, routing={"kv_events": kv_events})
        index = gw.app[KV_INDEX]
        engines = [source(url, 0), source(url, 1)]
        await wait_for(lambda: all(index.live(e) for e in engines), 10, "both engines live")

        async def complete(prompt: list[int]) -> None:
            body = {"model": "sim-model", "prompt": prompt, "max_tokens": 1}
            async with client.post(f"{gw.url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()

        # Nobody holds either prompt: the worker's own turns put the first on engine 0 and
        # the second on engine 1.
        other = list(range(500, 516))
        await complete(other)
        await complete(PROMPT)
        keys = index.keys(PROMPT, BLOCK)
        await wait_for(lambda: index.match(keys, engines) == {engines[0]: 0, engines[1]: 4}, 5)
        for _ in range(4):  # the worker's turns would alternate; the gateway names engine 1
            await complete(PROMPT)
        registry = server.app[SIM].registry

        def counter(name: str, engine: str) -> float | None:
            labels = {"model_name": "sim-model", "engine": engine}
            return registry.get_sample_value(f"vllm:prefix_cache_{name}_total", labels)

        assert counter("hits", "1") == 4 * len(PROMPT)
        assert counter("queries", "1") == 5 * len(PROMPT)
        assert counter("queries", "0") == len(other)  # engine 0 never saw PROMPT
        predicted = gw.metric("gateway_kv_predicted_hit_tokens_total", worker=url)
        assert predicted == 4 * len(PROMPT)
    finally:
        await server.close()


async def test_an_engine_publishing_as_another_rank_is_left_out() -> None:
    """Rank 1's port reaches a publisher of rank 0 (workers on one host whose event ports are
    closer than the data-parallel size): its batches are counted as bad, never indexed."""
    port = free_port_with(1)
    wrong = EventPublisher(f"tcp://127.0.0.1:{port + 1}", rank=0)
    index = WatchedIndex()
    events = KVEvents(index, f"tcp://{{host}}:{port}", None, "", ranks=2)
    try:
        await events.sync([WORKER])
        subscriber = events.subscribers[source(WORKER, 1)]
        await wait_for(lambda: index.live(source(WORKER, 1)), 10, "rank 1 connected")
        stored = BlockStored([1], None, list(range(BLOCK)), BLOCK, None)
        while subscriber.counts.bad_messages == 0:  # a PUB socket drops what is sent early
            wrong.publish([stored])
            await asyncio.sleep(0.01)
        assert index.blocks(source(WORKER, 1)) == 0
        assert subscriber.counts.batches == 0
    finally:
        await events.close()
        await wrong.close()


def test_a_worker_s_own_answer_gives_each_engine_s_sockets() -> None:
    """vLLM's /kv_event_sources: a bound wildcard host is the worker's; ranks in order."""
    answer = {
        "1": {"endpoint": "tcp://*:5558", "replay_endpoint": "tcp://*:5568", "topic": "kv"},
        "0": {"endpoint": "tcp://0.0.0.0:5557", "replay_endpoint": None, "topic": "kv"},
    }
    assert sources_plan(answer, "http://10.0.0.7:8000") == [
        Endpoints("tcp://10.0.0.7:5557", None, "kv"),
        Endpoints("tcp://10.0.0.7:5558", "tcp://10.0.0.7:5568", "kv"),
    ]
    assert sources_plan({"0": {"endpoint": "tcp://10.1.1.1:5557"}}, "http://[::1]:80") == [
        Endpoints("tcp://10.1.1.1:5557", None, "")  # a concrete host is kept
    ]
    assert sources_plan({"0": {"endpoint": "tcp://*:5557"}}, "http://[::1]:80") == [
        Endpoints("tcp://[::1]:5557", None, "")
    ]
    for bad in ({}, [], {"1": {"endpoint": "tcp://*:1"}}, {"x": {}}, {"0": {"endpoint": ""}}):
        with pytest.raises(KVSourcesError):
            sources_plan(bad, "http://10.0.0.7:8000")


async def test_a_worker_without_events_gets_no_subscriber(sim: SimFactory) -> None:
    """Asked with endpoint: auto, a worker whose events are off answers {}: nothing to
    subscribe to, and it is asked again only after a pause."""
    worker = await sim()
    index = WatchedIndex()
    events = KVEvents(index, "auto", None, "")
    try:
        await events.sync([worker.url])
        asking = events._asking[worker.url]
        await asyncio.wait([asking], timeout=10)
        await events.sync([worker.url])
        assert isinstance(asking.exception(), KVSourcesError)
        assert events.subscribers == {}
        assert worker.url not in events._asking  # not asked again at once
    finally:
        await events.close()
