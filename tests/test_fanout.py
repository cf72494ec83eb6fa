"""Embeddings fan-out: a large batch split across workers, sent at once, reassembled in order;
a failed shard is retried elsewhere, or the whole request fails (never a partial answer)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.errors import UpstreamBadResponse
from gateway.fanout import merge, plan_shards
from gateway.simulator import parse_fault
from tests.conftest import GatewayFactory, SimFactory


def embeddings(count: int, **fields: Any) -> dict[str, Any]:
    return {"model": "sim-model", "input": [f"text number {i}" for i in range(count)], **fields}


def shards(data: dict[str, Any], size: int, workers: int) -> list[list[Any]] | None:
    planned = plan_shards(orjson.dumps(data), size, workers)
    return None if planned is None else [orjson.loads(body)["input"] for body in planned]


def test_small_batches_and_single_workers_are_not_split() -> None:
    assert plan_shards(orjson.dumps(embeddings(10)), 10, 4) is None
    assert plan_shards(orjson.dumps(embeddings(100)), 10, 1) is None
    assert plan_shards(orjson.dumps(embeddings(100)), 0, 4) is None
    assert plan_shards(b'{"model": "m", "input": "one text"}', 1, 4) is None
    one_token_list = orjson.dumps({"model": "m", "input": list(range(100))})
    assert plan_shards(one_token_list, 10, 4) is None


def test_shards_are_contiguous_even_and_at_most_one_per_worker() -> None:
    data = embeddings(100, encoding_format="float")
    parts = shards(data, 10, 3)
    assert parts is not None
    assert [len(p) for p in parts] == [34, 34, 32]
    assert [text for part in parts for text in part] == data["input"]
    assert [len(p) for p in shards(data, 40, 8) or []] == [34, 34, 32]
    [first, *_] = plan_shards(orjson.dumps(data), 10, 3) or []
    assert orjson.loads(first)["encoding_format"] == "float"  # other fields ride along


def test_merge_renumbers_in_shard_order_and_sums_usage() -> None:
    def answer(vectors: list[float], tokens: int) -> bytes:
        data = [
            {"object": "embedding", "index": i, "embedding": [v]} for i, v in enumerate(vectors)
        ]
        data.reverse()  # a worker may list them in any order; index is what counts
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return orjson.dumps({"object": "list", "model": "m", "data": data, "usage": usage})

    merged = orjson.loads(merge([answer([0.0, 1.0], 4), answer([2.0], 3)]))
    assert [(d["index"], d["embedding"]) for d in merged["data"]] == [
        (0, [0.0]),
        (1, [1.0]),
        (2, [2.0]),
    ]
    assert merged["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert merged["model"] == "m"


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"data": 1}', b'{"data": [1]}'])
def test_merge_rejects_a_shard_that_is_not_an_embeddings_answer(body: bytes) -> None:
    with pytest.raises(UpstreamBadResponse):
        merge([body])


async def test_batch_is_split_across_workers_and_equals_the_unsplit_answer(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    workers = [await sim(), await sim(), await sim()]
    gw = await gateway(*workers, routing={"embedding_shard_size": 10})
    body = embeddings(50)
    async with client.post(f"{workers[0].url}/v1/embeddings", json=body) as resp:
        direct = await resp.json()
    async with client.post(f"{gw.url}/v1/embeddings", json=body) as resp:
        assert resp.status == 200
        merged = await resp.json()
    assert merged["data"] == direct["data"]
    assert merged["usage"] == direct["usage"]
    for w in workers:  # every worker took a shard: each got a connection from the gateway
        assert gw.metric("gateway_upstream_connect_seconds_count", worker=w.url) >= 1
    assert all(w.in_flight == 0 for w in gw.fleet.workers)


async def test_a_failed_shard_is_retried_on_another_worker(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    busy = await sim(fault=parse_fault("status=503"))
    workers = [busy, await sim(), await sim()]
    gw = await gateway(*workers, routing={"embedding_shard_size": 10})
    body = embeddings(30)
    async with client.post(f"{workers[1].url}/v1/embeddings", json=body) as resp:
        direct = await resp.json()
    for _ in range(3):  # whichever shard lands on the busy worker moves elsewhere
        async with client.post(f"{gw.url}/v1/embeddings", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"] == direct["data"]
    assert gw.metric("gateway_retries_total", reason="upstream_unavailable") >= 1


async def test_a_shard_that_cannot_be_served_fails_the_whole_request(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # 501 is not in retry.statuses: the shard fails where it was sent (a 500 is retried).
    broken = await sim(fault=parse_fault("status=501"))
    gw = await gateway(broken, await sim(), routing={"embedding_shard_size": 10})
    async with client.post(f"{gw.url}/v1/embeddings", json=embeddings(20)) as resp:
        assert resp.status == 501
        error = (await resp.json())["error"]
    assert set(error) >= {"message", "type", "code"}
    assert "data" not in error
    assert all(w.in_flight == 0 for w in gw.fleet.workers)
    assert gw.proxy.admission.in_flight == 0
