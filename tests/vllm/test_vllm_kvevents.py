"""Cache-aware routing against real vLLM: two CPU workers publishing their KV-cache events
(``--kv-events-config``), a gateway subscribed to both.

1. The gateway's index holds exactly the blocks the worker that ran a prompt reported, at the
   block size the worker uses, and nothing for the other worker.
2. A repeated long prefix (new tails each time) goes to the worker holding it, every time, and
   vLLM's own ``vllm:prefix_cache_hits_total`` on that worker counts the reused prefix.
3. A subscriber that joins afterwards rebuilds the same index from the replay sockets.
4. Chat prompts tokenized in the gateway (the model's tokenizer and chat template) are routed
   the same way: the ids match what vLLM computes, or no block would ever match.

The pair is started for this module alone (about 40 s more suite time): the session's workers
run without events, as vLLM does by default.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.app import KV_INDEX
from gateway.kvevents import KVEvents
from gateway.kvindex import KVIndex
from gateway.tokenizer import PromptTokenizer
from tests.conftest import GatewayFactory
from tests.helpers import wait_for
from tests.processes import free_port_with
from tests.vllm.compare import TIMEOUT
from tests.vllm.fleet import MODEL, MODEL_DIR, VLLMWorker, start_all

pytestmark = pytest.mark.timeout(300)

EVENTS, REPLAY = 1000, 2000  # event ports: the worker's HTTP port plus these
BLOCK = 128  # the CPU build's block size
PREFIX = 4 * BLOCK
_HITS = re.compile(r"^vllm:prefix_cache_hits_total(?:\{[^}]*\})? ([0-9.eE+]+)$", re.MULTILINE)


def kv_worker(name: str) -> VLLMWorker:
    port = free_port_with(EVENTS, REPLAY)
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # A wildcard host binds; a concrete one would make vLLM connect out instead.
        "endpoint": f"tcp://*:{port + EVENTS}",
        "replay_endpoint": f"tcp://*:{port + REPLAY}",
        "topic": "kv",
    }
    args = ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)]
    return VLLMWorker(name, args, port=port)


@pytest.fixture(scope="module")
def kv_pair() -> Iterator[tuple[VLLMWorker, VLLMWorker]]:
    pair = (kv_worker("kv-a"), kv_worker("kv-b"))
    start_all(pair)
    yield pair
    for worker in pair:
        worker.stop()


async def prefix_hits(session: aiohttp.ClientSession, worker: VLLMWorker) -> float:
    async with session.get(worker.url + "/metrics", timeout=TIMEOUT) as response:
        return sum(float(value) for value in _HITS.findall(await response.text()))


async def test_index_matches_the_workers_and_a_long_prefix_goes_to_its_holder(
    kv_pair: tuple[VLLMWorker, VLLMWorker], gateway: GatewayFactory
) -> None:
    rng = random.Random(20)
    prefix = [rng.randrange(10, 2000) for _ in range(PREFIX)]
    kv_events = {
        "enabled": True,
        "endpoint": f"tcp://{{host}}:{{port+{EVENTS}}}",
        "replay_endpoint": f"tcp://{{host}}:{{port+{REPLAY}}}",
        "topic": "kv",
    }
    workers = [{"url": w.url, "models": [MODEL]} for w in kv_pair]
    gw = await gateway(*workers, routing={"kv_events": kv_events, "scrape_interval": 0.2})
    index = gw.app[KV_INDEX]
    urls = [w.url for w in kv_pair]
    await wait_for(lambda: all(index.live(url) for url in urls), 30, "subscribed to both")

    async with aiohttp.ClientSession() as session:
        before = {w.url: await prefix_hits(session, w) for w in kv_pair}

        async def complete(tail: int) -> None:
            prompt = prefix + [rng.randrange(10, 2000) for _ in range(tail)]
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
            async with session.post(gw.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
                assert r.status == 200, await r.text()

        await complete(100)  # 612 tokens: four full blocks stored by whichever worker ran it
        keys = index.keys(prefix, BLOCK)
        await wait_for(lambda: max(index.match(keys, urls).values()) == 4, 10, "BlockStored")
        [holder] = [url for url in urls if index.match(keys, [url])[url] == 4]
        [other] = [url for url in urls if url != holder]
        assert index.block_size([holder]) == BLOCK
        assert index.blocks(holder) == 4  # the prompt's full blocks; the partial one is not
        assert index.blocks(other) == 0
        assert index.skipped_blocks == 0

        for tail in (50, 150, 250):
            await complete(tail)
        after = {w.url: await prefix_hits(session, w) for w in kv_pair}
    # Each repeat reused the whole 512-token prefix on the holder; the other saw nothing; the
    # gateway predicted exactly those hits.
    assert after[holder] - before[holder] == 3 * PREFIX
    assert after[other] == before[other]
    assert gw.metric("gateway_kv_predicted_hit_tokens_total", worker=holder) == 3 * PREFIX
    assert index.blocks(other) == 0

    # A subscriber that joins now learns the same from each worker's replay socket.
    late = KVIndex()
    events = KVEvents(late, kv_events["endpoint"], kv_events["replay_endpoint"], "kv")
    await events.sync(urls)
    try:
        for url in urls:
            await asyncio.wait_for(events.subscribers[url].synced.wait(), 10)
        assert [late.blocks(url) for url in urls] == [index.blocks(url) for url in urls]
        assert late.match(keys, urls) == index.match(keys, urls) == {holder: 4, other: 0}
    finally:
        await events.close()


async def test_chat_prompts_tokenized_in_the_gateway_go_to_their_holder(
    kv_pair: tuple[VLLMWorker, VLLMWorker], gateway: GatewayFactory
) -> None:
    """4. With the model's tokenizer configured, chat messages are tokenized in the gateway
    (template and ids as vLLM makes them): a long shared system prompt with new questions goes
    to the worker holding it, and vLLM counts the hits there."""
    rng = random.Random(21)
    words = ["route", "cache", "block", "token", "prefix", "worker", "gateway", "event"]
    system = " ".join(rng.choice(words) for _ in range(220))
    kv_events = {
        "enabled": True,
        "endpoint": f"tcp://{{host}}:{{port+{EVENTS}}}",
        "replay_endpoint": f"tcp://{{host}}:{{port+{REPLAY}}}",
        "topic": "kv",
        "tokenizers": {MODEL: str(MODEL_DIR / "tokenizer.json")},
    }
    workers = [{"url": w.url, "models": [MODEL]} for w in kv_pair]
    gw = await gateway(*workers, routing={"kv_events": kv_events, "scrape_interval": 0.2})
    index = gw.app[KV_INDEX]
    urls = [w.url for w in kv_pair]
    await wait_for(lambda: all(index.live(url) for url in urls), 30, "subscribed to both")
    ours = PromptTokenizer(MODEL_DIR / "tokenizer.json")

    def body(question: str) -> dict[str, object]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}

    first = ours.chat_ids(body("which worker?"))
    assert first is not None and 3 * BLOCK < len(first) < 1000, len(first)
    shared = len(first) // BLOCK  # the full blocks every question shares (the system prompt)
    async with aiohttp.ClientSession() as session:

        async def ask(question: str) -> None:
            async with session.post(
                gw.url + "/v1/chat/completions", json=body(question), timeout=TIMEOUT
            ) as response:
                assert response.status == 200, await response.text()

        await ask("which worker?")
        keys = index.keys(first, BLOCK)
        await wait_for(lambda: max(index.match(keys, urls).values()) == shared, 10, "stored")
        [holder] = [url for url in urls if index.match(keys, [url])[url] == shared]
        [other] = [url for url in urls if url != holder]
        before = {w.url: await prefix_hits(session, w) for w in kv_pair}
        for question in ("and now?", "why this one?", "still there?"):
            await ask(question)
        after = {w.url: await prefix_hits(session, w) for w in kv_pair}
    assert after[holder] - before[holder] >= 3 * (shared - 1) * BLOCK
    assert after[other] == before[other]
