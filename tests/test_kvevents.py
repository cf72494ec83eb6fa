"""The KV-event subscriber against a real ZeroMQ publisher (the simulator's, on the wire format
of `gateway.kvwire`): batches reach the index in order, a subscriber that joins late gets the
history from the replay socket, gaps are replayed, a publisher restart resets the worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio
from aiohttp.test_utils import TestServer

from gateway.app import KV_INDEX
from gateway.kvevents import Endpoints, KVEvents, Subscriber, endpoint_for
from gateway.kvindex import KVIndex
from gateway.kvwire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    WireError,
    decode_message,
    decode_payload,
    encode_batch,
    encode_seq,
)
from gateway.loadsignals import LoadSignals
from gateway.simulator import ENGINE, SimConfig, create_app
from gateway.simulator.app import SIM
from gateway.simulator.kvpublish import EventPublisher
from tests.conftest import GatewayFactory
from tests.helpers import wait_for
from tests.processes import free_port, free_port_with
from tests.test_tokenizer import model_dir

pytestmark = pytest.mark.timeout(20)

WORKER = "http://127.0.0.1:8001"
BLOCK = 4


class WatchedIndex(KVIndex):
    """The real index, telling waiting tests each time it changes."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Condition()
        self.applied = 0

    def apply(self, worker: str, events: Iterable[Event]) -> None:
        super().apply(worker, events)
        self.applied += 1
        self._notify()

    def reset(self, worker: str, live: bool) -> None:
        super().reset(worker, live)
        self._notify()

    def _notify(self) -> None:
        async def notify() -> None:
            async with self.changed:
                self.changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def until(self, condition: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(condition)


def stored(first: int, tokens: list[int], parent: int | None = None) -> BlockStored:
    count = len(tokens) // BLOCK
    return BlockStored(list(range(first, first + count)), parent, tokens, BLOCK)


def held(index: KVIndex, tokens: list[int]) -> int:
    return index.match(index.keys(tokens, BLOCK), [WORKER])[WORKER]


PROMPT = list(range(100, 116))  # four blocks


@pytest.fixture
async def publisher() -> AsyncIterator[EventPublisher]:
    pub = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv")
    pub.start()
    yield pub
    await pub.close()


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def subscribe(
    pub: EventPublisher, index: KVIndex, ctx: zmq.asyncio.Context, replay: bool = True
) -> tuple[Subscriber, asyncio.Task[None]]:
    endpoints = Endpoints(pub.endpoint, pub.replay_endpoint if replay else None, "kv")
    subscriber = Subscriber(WORKER, endpoints, index, ctx, replay_timeout=2.0)
    task = asyncio.create_task(subscriber.run())
    await asyncio.wait_for(subscriber.synced.wait(), 10)
    return subscriber, task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_late_subscriber_gets_the_history_from_replay(publisher, ctx) -> None:
    """1. Batches published before the subscriber connected arrive through the replay socket,
    then live batches follow in order."""
    publisher.publish([stored(1, PROMPT[:8])])
    publisher.publish([stored(3, PROMPT[8:], parent=2)])
    index = WatchedIndex()
    subscriber, task = await subscribe(publisher, index, ctx)
    assert held(index, PROMPT) == 4
    assert index.live(WORKER)
    # Synced through replay, the live subscription may not have reached the PUB socket yet:
    # a batch published now would be dropped, and with none after it nothing reveals the gap.
    await asyncio.wait_for(wait_joined(publisher, index), 10)
    # The empty batches wait_joined publishes before the subscription reaches the PUB socket
    # are dropped, and the first that arrives reveals that gap: counted from here on.
    gaps = subscriber.counts.gaps
    publisher.publish([BlockRemoved([4])])
    await index.until(lambda: held(index, PROMPT) == 3)
    assert subscriber.counts.gaps == gaps
    await stop(task)
    assert not index.live(WORKER)
    assert held(index, PROMPT) == 0


async def test_a_gap_is_filled_from_the_replay_socket(publisher, ctx) -> None:
    """2. A batch missing from the live stream is fetched by sequence number."""
    index = WatchedIndex()
    subscriber, task = await subscribe(publisher, index, ctx)
    await asyncio.wait_for(wait_joined(publisher, index), 10)
    publisher.skip_live = 1
    gaps, replays = subscriber.counts.gaps, subscriber.counts.replays
    publisher.publish([stored(1, PROMPT[:8])])  # replay only
    publisher.publish([stored(3, PROMPT[8:], parent=2)])  # live: reveals the gap
    await index.until(lambda: held(index, PROMPT) == 4)
    assert subscriber.counts.gaps == gaps + 1
    assert subscriber.counts.replays == replays + 1
    assert subscriber.counts.resets == 1  # the connect's only
    await stop(task)


async def test_a_gap_without_replay_resets_the_worker(publisher, ctx) -> None:
    """3. With no replay socket, what came before a gap cannot be trusted: the worker's entries
    are dropped and the index rebuilds from the next batch on."""
    index = WatchedIndex()
    subscriber, task = await subscribe(publisher, index, ctx, replay=False)
    await asyncio.wait_for(wait_joined(publisher, index), 10)
    publisher.publish([stored(1, PROMPT[:8])])
    await index.until(lambda: held(index, PROMPT) == 2)
    publisher.skip_live = 1
    publisher.publish([BlockRemoved([1])])  # lost
    publisher.publish([stored(10, [7, 7, 7, 7])])
    await index.until(lambda: subscriber.counts.gaps == 1)
    assert held(index, PROMPT) == 0
    assert held(index, [7, 7, 7, 7]) == 1
    await stop(task)


async def wait_joined(pub: EventPublisher, index: WatchedIndex) -> None:
    """A PUB socket drops batches until the subscription has reached it, some time after the
    handshake: publish empty batches until one arrives live (with a replay socket, the next
    batch would reveal the loss; a test that stops publishing must wait instead)."""
    applied = index.applied
    while index.applied == applied:
        pub.publish([])
        await asyncio.sleep(0.01)


async def test_a_restarted_publisher_resets_the_worker(ctx) -> None:
    """4. A worker restart: the connection drops (entries reset, not live), the new engine's
    sequence starts at 0 again and its history comes from its own replay socket."""
    first = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv")
    first.start()
    first.publish([stored(1, PROMPT)])
    index = WatchedIndex()
    subscriber, task = await subscribe(first, index, ctx)
    assert held(index, PROMPT) == 4
    endpoint, replay = first.endpoint, first.replay_endpoint
    assert replay is not None
    subscriber.synced.clear()
    await first.close()
    await index.until(lambda: not index.live(WORKER))
    assert held(index, PROMPT) == 0
    second = EventPublisher(endpoint, replay, topic="kv")
    second.start()
    second.publish([stored(50, PROMPT[:4])])
    try:
        await asyncio.wait_for(subscriber.synced.wait(), 15)
        await index.until(lambda: held(index, PROMPT) == 1)
        assert index.live(WORKER)
        assert subscriber.counts.connects == 2
    finally:
        await stop(task)
        await second.close()


async def test_all_blocks_cleared_and_bad_messages(publisher, ctx) -> None:
    """5. AllBlocksCleared empties the worker; a malformed message is counted and skipped."""
    index = WatchedIndex()
    subscriber, task = await subscribe(publisher, index, ctx)
    await asyncio.wait_for(wait_joined(publisher, index), 10)  # ZeroMQ drops until joined
    publisher.publish([stored(1, PROMPT)])
    await index.until(lambda: held(index, PROMPT) == 4)
    seq = publisher._next_seq  # after the batches wait_joined sent
    publisher._pub.send_multipart([b"kv", encode_seq(seq), b"\xc1"])  # never valid msgpack
    publisher._next_seq = seq + 1
    publisher.publish([AllBlocksCleared()])
    await index.until(lambda: held(index, PROMPT) == 0)
    assert subscriber.counts.bad_messages == 1
    assert index.live(WORKER)
    await stop(task)


async def test_kvevents_follows_the_fleet(publisher) -> None:
    """6. Subscribers start and stop with the fleet's membership; a worker that leaves is
    forgotten."""
    index = WatchedIndex()
    events = KVEvents(index, publisher.endpoint, publisher.replay_endpoint, "kv")
    publisher.publish([stored(1, PROMPT)])
    await events.sync([WORKER])
    await asyncio.wait_for(events.subscribers[WORKER].synced.wait(), 10)
    assert held(index, PROMPT) == 4
    await events.sync([])
    assert not events.subscribers
    assert index.blocks(WORKER) == 0
    await events.close()


def test_endpoint_templates() -> None:
    assert endpoint_for("tcp://{host}:5557", "http://10.0.0.7:8000") == "tcp://10.0.0.7:5557"
    assert endpoint_for("tcp://{host}:{port+1000}", "http://h:8001/") == "tcp://h:9001"
    assert endpoint_for("tcp://{host}:{port}", "https://[::1]") == "tcp://[::1]:443"


def test_wire_format_as_vllm_encodes_it() -> None:
    """The payload as vLLM's msgspec encoder writes it: an array batch, events as maps tagged
    by `type`, optional fields left out, 64-bit integer hashes."""
    vllm_payload = msgpack.packb(
        [
            1.5,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [2**63 + 5],
                    "parent_block_hash": None,
                    "token_ids": [1, 2, 3, 4],
                    "block_size": 4,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                },
                {"type": "BlockRemoved", "block_hashes": [b"\x01" * 32], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
                {"type": "SomethingNewer", "x": 1},
            ],
            0,
        ]
    )
    ts, events = decode_payload(vllm_payload)
    assert ts == 1.5
    assert events == [
        BlockStored([2**63 + 5], None, [1, 2, 3, 4], 4, None, "GPU"),
        BlockRemoved([b"\x01" * 32], "GPU"),
        AllBlocksCleared(),
    ]
    batch = decode_message([b"kv", encode_seq(7), encode_batch(2.0, events)])
    assert (batch.seq, batch.events) == (7, events)
    for bad in (
        [b"kv", encode_seq(1)],
        [b"kv", b"\x00", vllm_payload],
        [b"", encode_seq(0), b"\x93"],
    ):
        with pytest.raises(WireError):
            decode_message(bad)


async def test_the_simulator_publishes_its_prefix_cache(aiohttp_server, aiohttp_client) -> None:
    """7. A simulated worker's prefix cache, as seen through its events, is what it holds:
    stored blocks with their token ids, then the blocks evicted for a new prompt."""
    port, replay = free_port(), free_port()
    config = SimConfig(
        prefix_cache_blocks=6,
        block_tokens=BLOCK,
        kv_events_endpoint=f"tcp://127.0.0.1:{port}",
        kv_events_replay_endpoint=f"tcp://127.0.0.1:{replay}",
        kv_events_topic="kv",
    )
    app = create_app(config)
    client = await aiohttp_client(await aiohttp_server(app))
    index = WatchedIndex()
    events = KVEvents(index, f"tcp://{{host}}:{port}", f"tcp://{{host}}:{replay}", "kv")
    await events.sync([WORKER])
    try:
        await asyncio.wait_for(events.subscribers[WORKER].synced.wait(), 10)

        async def complete(prompt: list[int]) -> None:
            body = {"model": "sim-model", "prompt": prompt, "max_tokens": 1}
            async with client.post("/v1/completions", json=body) as response:
                assert response.status == 200

        await complete([*PROMPT, 1, 2])  # four full blocks, a partial one never cached
        await index.until(lambda: held(index, PROMPT) == 4)
        other = list(range(500, 516))
        await complete(other)  # four more blocks: two of the first prompt's are evicted
        await index.until(lambda: held(index, other) == 4)
        assert index.blocks(WORKER) == len(app[SIM].prefix_caches[0]) == 6
        assert held(index, PROMPT) == 2  # the cache drops a prefix's end first
    finally:
        await events.close()


async def test_the_gateway_routes_a_prefix_to_the_worker_holding_it(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """8. Two simulated workers publish their prefix caches; the gateway sends a repeated
    token-id prompt to the worker that holds it, and spills it over to the other when the
    holder is more than `weight` requests busier."""
    servers = []
    for _ in range(2):
        port = free_port_with(1000, 2000)
        config = SimConfig(
            prefix_cache_blocks=64,
            block_tokens=BLOCK,
            itl_base=0.01,
            kv_events_endpoint=f"tcp://127.0.0.1:{port + 1000}",
            kv_events_replay_endpoint=f"tcp://127.0.0.1:{port + 2000}",
        )
        server = TestServer(create_app(config), port=port)
        await server.start_server()
        servers.append(server)
    try:
        a, b = (str(server.make_url("")).rstrip("/") for server in servers)
        kv_events = {
            "enabled": True,
            "endpoint": "tcp://{host}:{port+1000}",
            "replay_endpoint": "tcp://{host}:{port+2000}",
            "weight": 2.0,
        }
        routing = {"kv_events": kv_events, "scrape_interval": 0.05}
        gw = await gateway(a, b, routing=routing)
        index = gw.app[KV_INDEX]
        await wait_for(lambda: index.live(a) and index.live(b), 10, "subscribers live")
        finished = {url: server.app[ENGINE] for url, server in zip((a, b), servers, strict=True)}

        async def complete(prompt: list[int]) -> None:
            body = {"model": "sim-model", "prompt": prompt, "max_tokens": 1}
            async with client.post(f"{gw.url}/v1/completions", json=body) as response:
                assert response.status == 200

        await complete(PROMPT)
        [holder] = [url for url in (a, b) if finished[url].finished == 1]
        other = b if holder == a else a
        await wait_for(lambda: index.match(index.keys(PROMPT, BLOCK), [holder])[holder] == 4, 5)
        for _ in range(4):  # round-robin's alternation is gone: all to the holder
            await complete(PROMPT)
        assert (finished[holder].finished, finished[other].finished) == (5, 0)
        # What the router predicted is what the worker's own counter says it hit.
        sim_hits = {
            url: server.app[SIM].registry.get_sample_value(
                "vllm:prefix_cache_hits_total", {"model_name": "sim-model", "engine": "0"}
            )
            for url, server in zip((a, b), servers, strict=True)
        }
        predicted = "gateway_kv_predicted_hit_tokens_total"
        assert gw.metric(predicted, worker=holder) == sim_hits[holder] == 4 * len(PROMPT)
        await wait_for(lambda: gw.metric("gateway_kv_events_live", worker=other) == 1, 5)
        assert gw.metric("gateway_kv_index_blocks", worker=holder) == 4
        assert gw.metric("gateway_kv_events_resets_total", worker=holder) == 1  # the connect

        # Three streams held straight on the holder: 3 - 2 * 1.0 > 0, the prompt spills.
        streams = await hold_streams(client, servers[(a, b).index(holder)], holder, 3)
        try:
            workers = {w.url: w for w in gw.fleet.workers}
            await wait_for(lambda: (workers[holder].load or LOAD0).running == 3, 5, "scrape")
            await complete(PROMPT)
            assert finished[other].finished == 1
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    finally:
        for server in servers:
            await server.close()


LOAD0 = LoadSignals(0, 0, 0)


async def hold_streams(
    client: aiohttp.ClientSession, server: TestServer, url: str, count: int
) -> list[asyncio.Task[bytes]]:
    async def one() -> bytes:
        body = {"model": "sim-model", "prompt": "busy", "max_tokens": 1000, "stream": True}
        async with client.post(f"{url}/v1/completions", json=body) as response:
            return await response.read()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await wait_for(lambda: server.app[ENGINE].num_running == count, 5, "streams running")
    return tasks


async def test_chat_prompts_meet_their_prefix_on_simulated_workers(
    gateway: GatewayFactory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """9. Simulated workers and the gateway share a model's tokenizer: chat requests with one
    long system prompt and new questions all go to the worker that cached it, and the hits the
    gateway predicted are the hits the worker counted."""
    tokenizer = model_dir(tmp_path) / "tokenizer.json"
    servers = []
    for _ in range(2):
        port = free_port_with(1000, 2000)
        config = SimConfig(
            prefix_cache_blocks=256,
            block_tokens=BLOCK,
            kv_events_endpoint=f"tcp://127.0.0.1:{port + 1000}",
            kv_events_replay_endpoint=f"tcp://127.0.0.1:{port + 2000}",
            tokenizer=str(tokenizer),
        )
        server = TestServer(create_app(config), port=port)
        await server.start_server()
        servers.append(server)
    try:
        urls = [str(server.make_url("")).rstrip("/") for server in servers]
        kv_events = {
            "enabled": True,
            "endpoint": "tcp://{host}:{port+1000}",
            "replay_endpoint": "tcp://{host}:{port+2000}",
            "tokenizers": {"sim-model": str(tokenizer)},
        }
        gw = await gateway(*urls, routing={"kv_events": kv_events, "policy": "round_robin"})
        index = gw.app[KV_INDEX]
        await wait_for(lambda: all(index.live(url) for url in urls), 10, "subscribers live")
        system = " ".join(["the lazy dog routes every request"] * 12)

        async def ask(question: str) -> None:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ]
            body = {"model": "sim-model", "messages": messages, "max_tokens": 1}
            async with client.post(f"{gw.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200

        await ask("a fox?")
        engines = [server.app[ENGINE] for server in servers]
        [holder] = [i for i, engine in enumerate(engines) if engine.finished == 1]
        await wait_for(lambda: index.blocks(urls[holder]) > 4, 5, "stored")
        for question in ("the quick fox?", "a dog?", "every block?"):
            await ask(question)  # round-robin alone would alternate
        assert [engine.finished for engine in engines][holder] == 4
        hits = (
            servers[holder]
            .app[SIM]
            .registry.get_sample_value(
                "vllm:prefix_cache_hits_total", {"model_name": "sim-model", "engine": "0"}
            )
        )
        predicted = gw.metric("gateway_kv_predicted_hit_tokens_total", worker=urls[holder])
        assert predicted == hits > 3 * 4 * BLOCK
    finally:
        for server in servers:
            await server.close()


async def test_a_failing_subscriber_is_retried_with_growing_pauses() -> None:
    """10. A worker whose endpoint cannot be used: its subscriber fails, is not started again
    before its pause is over, then is, and a second failure in a row doubles the pause."""
    index = WatchedIndex()
    events = KVEvents(index, "nope://{host}:5557", None, "kv")  # no such transport
    await events.sync([WORKER])
    with pytest.raises(zmq.ZMQError):
        await events._tasks[WORKER]
    await events.sync([WORKER])
    assert WORKER not in events.subscribers  # failed: paused
    count, retry_at = events._failures[WORKER]
    assert count == 1
    assert 1.0 < retry_at - asyncio.get_running_loop().time() <= 2.0
    await events.sync([WORKER])
    assert WORKER not in events.subscribers  # still paused
    events._failures[WORKER] = (count, 0.0)  # the pause is over
    await events.sync([WORKER])
    with pytest.raises(zmq.ZMQError):
        await events._tasks[WORKER]
    await events.sync([WORKER])
    count, later = events._failures[WORKER]
    assert count == 2
    assert 3.0 < later - asyncio.get_running_loop().time() <= 4.0  # twice as long
    await events.close()
