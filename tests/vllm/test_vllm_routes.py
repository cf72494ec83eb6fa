"""vLLM's routes beyond chat and completions (issue 17), real vLLM direct and through the
gateway: equal answers apart from ids and times. The pooling routes (score, rerank, pooling,
classify) need a pooling worker, which this session does not start: they are tested against
scripted workers in ``tests/test_routes.py``."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.vllm.compare import TIMEOUT, mask
from tests.vllm.conftest import VLLMFleet, worker_entry
from tests.vllm.fleet import MODEL

pytestmark = pytest.mark.timeout(300)


async def _both(
    vllm: VLLMFleet, gateway: GatewayFactory, method: str, path: str, body: Any
) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    gw = await gateway(worker_entry(vllm.plain))
    answers = []
    async with aiohttp.ClientSession() as session:
        for url in (vllm.plain.url, gw.url):
            async with session.request(method, url + path, json=body, timeout=TIMEOUT) as resp:
                answers.append((resp.status, await resp.read()))
    return answers[0], answers[1]


def _events(raw: bytes) -> list[Any]:
    """A typed event stream's events, masked (vLLM's own ids inside them too), with runs of
    text deltas merged: vLLM puts several tokens in one delta when its API server falls behind,
    so two greedy runs split the same text differently. Sequence numbers, checked to count up
    from 0 without a gap, are renumbered after the merge."""
    events: list[tuple[list[str], dict[str, Any]]] = []
    for block in raw.decode().split("\n\n"):
        lines = block.splitlines()
        data = [line[6:] for line in lines if line.startswith("data: ")]
        kinds = [line for line in lines if line.startswith("event: ")]
        if data:
            events.append((kinds, orjson.loads(data[0])))
    numbers = [e["sequence_number"] for _, e in events if "sequence_number" in e]
    assert numbers == list(range(len(numbers))), numbers
    merged: list[tuple[list[str], dict[str, Any]]] = []
    for kinds, event in events:
        if merged and _merge_delta(merged[-1][1], event):
            continue
        merged.append((kinds, event))
    for number, (_, event) in enumerate(e for e in merged if "sequence_number" in e[1]):
        event["sequence_number"] = number
    return [(kinds, _masked(event)) for kinds, event in merged]


def _merge_delta(into: dict[str, Any], event: dict[str, Any]) -> bool:
    """Appends ``event`` to ``into`` when both are text deltas of the same content part (a
    Responses ``response.output_text.delta`` or a Messages ``text_delta``)."""
    kind = event.get("type")
    if kind != into.get("type"):
        return False
    if kind == "response.output_text.delta":
        place = ("item_id", "output_index", "content_index")
        if any(into.get(k) != event.get(k) for k in place):
            return False
        into["delta"] += event["delta"]
        into["logprobs"] = (into.get("logprobs") or []) + (event.get("logprobs") or [])
        return True
    if kind == "content_block_delta" and into.get("index") == event.get("index"):
        a, b = into["delta"], event["delta"]
        if a.get("type") == b.get("type") == "text_delta":
            a["text"] += b["text"]
            return True
    return False


def _masked(value: Any) -> Any:
    value = mask(value)
    if isinstance(value, dict):
        return {k: "<id>" if k in ("id", "item_id", "response_id") else _masked(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"model": MODEL, "prompt": "A gateway is"}),
        ("/tokenize", {"prompt": "no model named"}),
        ("/detokenize", {"model": MODEL, "tokens": [5, 6, 7]}),
        ("/v1/responses", {"model": MODEL, "input": "A gateway", "max_output_tokens": 8,
                           "temperature": 0}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8, "temperature": 0,
                          "messages": [{"role": "user", "content": "hi"}]}),
        # Refused by the gateway before issue 17; vLLM serves them.
        ("/v1/completions", {"model": MODEL, "prompt": "A gateway", "max_tokens": 0,
                             "echo": True, "logprobs": 1}),
        ("/v1/completions", {"model": MODEL, "prompt": "A gateway", "max_tokens": 4, "n": 1.0,
                             "temperature": 0}),
        ("/v1/completions", {"prompt": "No model", "max_tokens": 4, "temperature": 0}),
        ("/v1/completions", {"model": MODEL, "prompt": "Wide", "max_tokens": 2,
                             "temperature": 0, "n": 9}),
    ],
)  # fmt: skip
async def test_json_equals_direct(
    vllm: VLLMFleet, gateway: GatewayFactory, path: str, body: dict[str, Any]
) -> None:
    direct, through = await _both(vllm, gateway, "POST", path, body)
    assert direct[0] == through[0], (direct, through)
    assert _masked(orjson.loads(through[1])) == _masked(orjson.loads(direct[1]))


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
async def test_typed_event_streams_equal_direct(
    vllm: VLLMFleet, gateway: GatewayFactory, path: str
) -> None:
    body: dict[str, Any] = {"model": MODEL, "temperature": 0, "stream": True}
    if path == "/v1/responses":
        body |= {"input": "A gateway", "max_output_tokens": 8}
    else:
        body |= {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    direct, through = await _both(vllm, gateway, "POST", path, body)
    assert direct[0] == through[0] == 200
    assert _events(through[1]) == _events(direct[1])


async def test_the_event_comparison_sees_through_vllms_merged_deltas(vllm: VLLMFleet) -> None:
    """``chunky`` merges every three tokens into one delta: its stream and ``plain``'s differ
    in events and sequence numbers, and compare equal once runs of deltas are merged."""
    body = {"model": MODEL, "temperature": 0, "stream": True, "input": "A gateway",
            "max_output_tokens": 8}  # fmt: skip
    raw = []
    async with aiohttp.ClientSession() as session:
        for worker in (vllm.plain, vllm.chunky):
            url = worker.url + "/v1/responses"
            async with session.post(url, json=body, timeout=TIMEOUT) as resp:
                raw.append(await resp.read())
    assert raw[0].count(b"output_text.delta") > raw[1].count(b"output_text.delta")
    assert _events(raw[0]) == _events(raw[1])


async def test_version_and_an_unknown_stored_response(
    vllm: VLLMFleet, gateway: GatewayFactory
) -> None:
    direct, through = await _both(vllm, gateway, "GET", "/version", None)
    assert direct == through
    direct, through = await _both(vllm, gateway, "GET", "/v1/responses/resp_unknown", None)
    assert direct[0] == through[0] == 404
    assert orjson.loads(through[1])["error"]["param"] == "response_id"


async def test_a_route_the_worker_does_not_serve_says_so(
    vllm: VLLMFleet, gateway: GatewayFactory
) -> None:
    """vLLM answers a route it does not serve (rerank, on a generative model) with FastAPI's
    ``{"detail": "Not Found"}``: through the gateway the status is the same, and the OpenAI-
    shaped error it becomes carries the worker's word, not only a generic message."""
    body = {"model": MODEL, "query": "a", "documents": ["b", "c"]}
    direct, through = await _both(vllm, gateway, "POST", "/v1/rerank", body)
    assert direct[0] == through[0] == 404
    assert orjson.loads(direct[1]) == {"detail": "Not Found"}
    error = orjson.loads(through[1])["error"]
    assert error["code"] == "upstream_http_404"
    assert error["message"] == "The model worker answered 404: Not Found"
