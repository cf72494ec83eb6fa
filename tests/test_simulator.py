"""The simulated vLLM worker, over real sockets: shapes, determinism, batching, faults."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.simulator import ENGINE, FaultSpec, FaultSpecError, SimConfig, create_app, parse_fault
from gateway.simulator.__main__ import build_parser, config_from_args, main
from gateway.simulator.app import SIM
from gateway.simulator.prefix_cache import PrefixCache
from gateway.simulator.protocol import parse_chat, parse_completion
from tests.helpers import wait_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "what is continuous batching"}]


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient) -> MakeClient:
    async def make(**knobs: Any) -> Client:
        return await aiohttp_client(create_app(SimConfig(**knobs)))

    return make


def chat(stream: bool = False, **fields: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": QUESTION, "stream": stream, **fields}


async def read_events(resp: aiohttp.ClientResponse) -> list[str]:
    """All SSE lines of a response that are not blank, without their line endings."""
    return [line.decode().rstrip("\n") async for line in resp.content if line.strip()]


def data_of(events: list[str]) -> list[Any]:
    """Parsed `data:` payloads; `[DONE]` stays a string."""
    payloads = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def token_texts(payloads: list[Any]) -> list[str]:
    texts = []
    for p in payloads:
        if isinstance(p, dict) and p.get("choices"):
            choice = p["choices"][0]
            text = choice.get("text", choice.get("delta", {}).get("content"))
            if text:
                texts.append(text)
    return texts


async def stream_tokens(client: Client, path: str, body: dict[str, Any]) -> list[str]:
    async with client.post(path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        return token_texts(data_of(await read_events(resp)))


async def post_json(client: Client, path: str, body: Any, status: int = 200) -> Any:
    async with client.post(path, json=body) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


def assert_error(body: Any, status: int, type_: str, param: str | None = None) -> None:
    error = body["error"]
    assert (error["code"], error["type"], error["param"]) == (status, type_, param)
    assert isinstance(error["message"], str) and error["message"]


# --- shapes -------------------------------------------------------------------------------


async def test_chat_stream_shape(make_client: MakeClient) -> None:
    client = await make_client()
    body = chat(stream=True, max_tokens=4, stream_options={"include_usage": True})
    async with client.post(CHAT, json=body, headers={"X-Request-Id": "req-7"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert resp.headers["X-Request-Id"] == "req-7"
        events = await read_events(resp)
    payloads = data_of(events)
    assert payloads[-1] == "[DONE]"
    first, *tokens, usage_chunk, _ = payloads
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(tokens) == 4
    for chunk in [first, *tokens, usage_chunk]:
        assert chunk["id"] == "chatcmpl-req-7"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "sim-model"
        assert isinstance(chunk["created"], int)
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None, None, None, "length"]
    assert all(t["choices"][0]["delta"]["content"].startswith(" ") for t in tokens)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 4
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["total_tokens"] == 8


async def test_continuous_usage_stats_on_every_chunk(make_client: MakeClient) -> None:
    client = await make_client()
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = chat(stream=True, max_tokens=3, stream_options=options)
    async with client.post(CHAT, json=body) as resp:
        payloads = data_of(await read_events(resp))
    counts = [p["usage"]["completion_tokens"] for p in payloads[1:-1]]
    assert counts == [1, 2, 3, 3]


async def test_chat_non_stream_shape(make_client: MakeClient) -> None:
    client = await make_client(default_max_tokens=5)
    body = await post_json(client, CHAT, chat())
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": None,
    }


async def test_stream_and_non_stream_give_the_same_text(make_client: MakeClient) -> None:
    client = await make_client()
    whole = await post_json(client, CHAT, chat(max_tokens=6))
    streamed = await stream_tokens(client, CHAT, chat(max_tokens=6))
    assert "".join(streamed) == whole["choices"][0]["message"]["content"]


async def test_completions_stream_and_non_stream(make_client: MakeClient) -> None:
    client = await make_client()
    request = {"model": "sim-model", "prompt": "once upon a time", "max_tokens": 3}
    whole = await post_json(client, "/v1/completions", request)
    assert whole["object"] == "text_completion"
    assert whole["id"].startswith("cmpl-")
    assert whole["usage"]["prompt_tokens"] == 4
    async with client.post("/v1/completions", json={**request, "stream": True}) as resp:
        payloads = data_of(await read_events(resp))
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert "".join(token_texts(chunks)) == whole["choices"][0]["text"]


async def test_completions_accept_token_ids(make_client: MakeClient) -> None:
    client = await make_client()
    body = await post_json(client, "/v1/completions", {"prompt": [[1, 2, 3]], "max_tokens": 2})
    assert body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("given", "count", "tokens"),
    [("a b c", 1, 3), (["a", "b c"], 2, 3), ([5, 6], 1, 2), ([[5, 6], [7]], 2, 3)],
)
async def test_embeddings(make_client: MakeClient, given: Any, count: int, tokens: int) -> None:
    client = await make_client(embedding_dim=8)
    body = await post_json(client, "/v1/embeddings", {"model": "sim-model", "input": given})
    assert body["object"] == "list" and body["model"] == "sim-model"
    assert [d["index"] for d in body["data"]] == list(range(count))
    for item in body["data"]:
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == 8
        assert math.isclose(math.hypot(*item["embedding"]), 1.0, rel_tol=1e-9)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    again = await post_json(client, "/v1/embeddings", {"input": given})
    assert again["data"] == body["data"]


async def test_embeddings_base64_matches_floats(make_client: MakeClient) -> None:
    client = await make_client(embedding_dim=4)
    floats = await post_json(client, "/v1/embeddings", {"input": "x"})
    packed = await post_json(client, "/v1/embeddings", {"input": "x", "encoding_format": "base64"})
    decoded = struct.unpack("<4f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)


async def test_models_version_health(make_client: MakeClient) -> None:
    client = await make_client(models=("a", "b"), max_model_len=2048)
    async with client.get("/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a", "b"]
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == "a" and card["max_model_len"] == 2048
    assert isinstance(card["created"], int)
    async with client.get("/version") as resp:
        assert "version" in await resp.json()
    async with client.get("/health") as resp:
        assert resp.status == 200
        assert await resp.read() == b""


# --- determinism and continuation -----------------------------------------------------------


async def test_same_request_same_text_and_seed_changes_it(make_client: MakeClient) -> None:
    client = await make_client()
    first = await stream_tokens(client, CHAT, chat(max_tokens=12, seed=1))
    again = await stream_tokens(client, CHAT, chat(max_tokens=12, seed=1))
    other_seed = await stream_tokens(client, CHAT, chat(max_tokens=12, seed=2))
    assert first == again
    assert first != other_seed
    other_question = {"messages": [{"role": "user", "content": "why"}], "max_tokens": 12}
    assert first != await stream_tokens(client, CHAT, {**other_question, "seed": 1})


async def test_continue_final_message_yields_the_rest_of_the_answer(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    answer = await stream_tokens(client, CHAT, chat(max_tokens=8))
    partial = {"role": "assistant", "content": "".join(answer[:3])}
    continued = await stream_tokens(
        client,
        CHAT,
        {
            "messages": [*QUESTION, partial],
            "max_tokens": 5,
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
    )
    assert continued == answer[3:]


# --- batching -------------------------------------------------------------------------------


async def test_second_request_waits_for_the_only_slot(make_client: MakeClient) -> None:
    """1. Request A takes the only slot. 2. B waits. 3. A ends, B runs to completion."""
    client = await make_client(max_num_seqs=1, itl_base=0.01)
    engine = client.app[ENGINE]
    async with client.post(CHAT, json=chat(stream=True, max_tokens=20)) as first:
        await first.content.readline()  # role chunk: A holds the slot
        second = asyncio.create_task(stream_tokens(client, CHAT, chat(max_tokens=3)))
        await wait_for(lambda: engine.num_waiting == 1, timeout=1.0)
        assert engine.num_running == 1
        async with client.get("/metrics") as resp:
            text = await resp.text()
        assert 'vllm:num_requests_waiting{engine="0",model_name="sim-model"} 1.0' in text
        assert not second.done()
    assert len(await asyncio.wait_for(second, timeout=2)) == 3
    assert (engine.num_running, engine.num_waiting) == (0, 0)


async def test_full_kv_cache_makes_requests_wait(make_client: MakeClient) -> None:
    client = await make_client(kv_cache_tokens=40, max_model_len=40, itl_base=0.01)
    engine = client.app[ENGINE]
    async with client.post(CHAT, json=chat(stream=True, max_tokens=30)) as first:
        await first.content.readline()
        assert engine.kv_cache_usage() > 0
        second = asyncio.create_task(stream_tokens(client, CHAT, chat(max_tokens=30)))
        await wait_for(lambda: engine.num_waiting == 1, timeout=1.0)
        assert engine.num_running == 1
    assert len(await asyncio.wait_for(second, timeout=2)) == 30


async def test_queue_limit_answers_503_before_the_stream(make_client: MakeClient) -> None:
    client = await make_client(max_num_seqs=1, max_num_queued_reqs=0, itl_base=0.01)
    async with client.post(CHAT, json=chat(stream=True, max_tokens=20)) as first:
        await first.content.readline()
        body = await post_json(client, CHAT, chat(stream=True), status=503)
        assert_error(body, 503, "ServiceUnavailableError")
        async with client.get("/metrics") as resp:
            assert 'reason="max_num_queued_reqs"} 1.0' in await resp.text()


async def test_stream_disconnect_frees_the_slot_at_once(make_client: MakeClient) -> None:
    client = await make_client(itl_base=0.05)
    engine = client.app[ENGINE]
    resp = await client.post(CHAT, json=chat(stream=True, max_tokens=50))
    await resp.content.readline()  # role chunk
    await resp.content.readline()  # blank line
    await resp.content.readline()  # first token
    assert engine.num_running == 1
    resp.close()
    await wait_for(lambda: engine.num_running == 0, timeout=0.1)
    assert engine.aborted == 1
    async with client.get("/metrics") as metrics:
        text = await metrics.text()
    assert 'vllm:num_requests_running{engine="0",model_name="sim-model"} 0.0' in text


async def test_non_stream_disconnect_frees_the_slot_at_once(make_client: MakeClient) -> None:
    client = await make_client(itl_base=0.05)
    engine = client.app[ENGINE]
    request = asyncio.create_task(client.post(CHAT, json=chat(max_tokens=50)))
    await wait_for(lambda: engine.num_running == 1, timeout=1.0)
    request.cancel()
    await wait_for(lambda: engine.num_running == 0, timeout=0.1)
    assert engine.aborted == 1
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_keep_alive_comments_while_waiting(make_client: MakeClient) -> None:
    client = await make_client(sse_keep_alive=0.02)
    headers = {"X-Sim-Fault": "slow_first_token=0.15"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=2), headers=headers) as resp:
        events = await read_events(resp)
    assert events[0] == ": keep-alive"
    first_data = next(i for i, e in enumerate(events) if e.startswith("data:"))
    assert set(events[:first_data]) == {": keep-alive"}
    assert data_of(events)[-1] == "[DONE]"


# --- metrics --------------------------------------------------------------------------------


async def test_metrics_use_vllm_names(make_client: MakeClient) -> None:
    client = await make_client()
    await post_json(client, CHAT, chat(max_tokens=3))
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    labels = '{engine="0",model_name="sim-model"}'
    for line in [
        f"vllm:num_requests_running{labels} 0.0",
        f"vllm:num_requests_waiting{labels} 0.0",
        f"vllm:kv_cache_usage_perc{labels} 0.0",
        f"vllm:prompt_tokens_total{labels} 4.0",
        f"vllm:generation_tokens_total{labels} 3.0",
        'vllm:request_success_total{engine="0",finished_reason="length",'
        'model_name="sim-model"} 1.0',
        f"vllm:time_to_first_token_seconds_count{labels} 1.0",
        f"vllm:inter_token_latency_seconds_count{labels} 2.0",
        f"vllm:e2e_request_latency_seconds_count{labels} 1.0",
    ]:
        assert line in text.splitlines()


# --- faults ---------------------------------------------------------------------------------


def test_parse_fault_grammar() -> None:
    spec = parse_fault(" status=503 , slow_first_token=2.5,stall_after=3,hang")
    assert spec == FaultSpec(status=503, slow_first_token=2.5, stall_after=3, hang=True)
    assert parse_fault("cut_after=0") == FaultSpec(cut_after=0)


@pytest.mark.parametrize(
    "spec",
    ["", "nope", "hang=1", "status", "status=200", "status=x", "cut_after=-1",
     "slow_first_token=nan", "dead,dead", "error_after=1,"],
)  # fmt: skip
def test_parse_fault_rejects(spec: str) -> None:
    with pytest.raises(FaultSpecError):
        parse_fault(spec)


@pytest.mark.parametrize(
    ("spec", "status", "type_"),
    [
        ("status=503", 503, "ServiceUnavailableError"),
        ("status=429", 429, "TooManyRequestsError"),
        ("status=500", 500, "InternalServerError"),
        ("overload", 503, "ServiceUnavailableError"),
        ("dead", 500, "InternalServerError"),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_faults_before_the_response(
    make_client: MakeClient, spec: str, status: int, type_: str, stream: bool
) -> None:
    client = await make_client()
    headers = {"X-Sim-Fault": spec}
    async with client.post(CHAT, json=chat(stream=stream), headers=headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert_error(await resp.json(), status, type_)


async def test_dead_fails_health_and_embeddings(make_client: MakeClient) -> None:
    client = await make_client(fault=parse_fault("dead"))
    async with client.get("/health") as resp:
        assert resp.status == 503
    body = await post_json(client, "/v1/embeddings", {"input": "x"}, status=500)
    assert_error(body, 500, "InternalServerError")


async def test_configured_fault_applies_and_header_wins(make_client: MakeClient) -> None:
    client = await make_client(fault=parse_fault("status=503"))
    await post_json(client, CHAT, chat(), status=503)
    headers = {"X-Sim-Fault": "slow_first_token=0"}
    async with client.post(CHAT, json=chat(), headers=headers) as resp:
        assert resp.status == 200


async def test_invalid_fault_header_is_400(make_client: MakeClient) -> None:
    client = await make_client()
    async with client.post(CHAT, json=chat(), headers={"X-Sim-Fault": "explode"}) as resp:
        assert resp.status == 400
        assert_error(await resp.json(), 400, "BadRequestError")


async def test_hang_never_sends_headers(make_client: MakeClient) -> None:
    client = await make_client()
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(TimeoutError):
        await client.post(
            CHAT, json=chat(stream=True), headers={"X-Sim-Fault": "hang"}, timeout=timeout
        )


async def test_slow_first_token_delays_content_not_headers(make_client: MakeClient) -> None:
    client = await make_client()
    started = time.monotonic()
    headers = {"X-Sim-Fault": "slow_first_token=0.3"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=2), headers=headers) as resp:
        assert time.monotonic() - started < 0.25
        await resp.content.readline()
        assert time.monotonic() - started >= 0.3
        assert data_of(await read_events(resp))[-1] == "[DONE]"


async def test_stall_after_keeps_the_stream_open_and_silent(make_client: MakeClient) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    headers = {"X-Sim-Fault": "stall_after=2"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=8), headers=headers) as resp:
        lines = [await resp.content.readline() for _ in range(6)]  # role + 2 tokens, blank lines
        assert len(token_texts(data_of([x.decode().strip() for x in lines]))) == 2
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readline(), timeout=0.2)
        assert engine.num_running == 1
    await wait_for(lambda: engine.num_running == 0, timeout=0.5)


async def test_cut_after_closes_without_done(make_client: MakeClient) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    headers = {"X-Sim-Fault": "cut_after=3"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=8), headers=headers) as resp:
        lines = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                lines.append(line.decode().strip())
    payloads = data_of([x for x in lines if x])
    assert "[DONE]" not in payloads
    assert len(token_texts(payloads)) == 3
    await wait_for(lambda: engine.num_running == 0, timeout=0.5)
    assert engine.aborted == 1


async def test_malformed_after_sends_bad_json_then_continues(make_client: MakeClient) -> None:
    client = await make_client()
    headers = {"X-Sim-Fault": "malformed_after=2"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=4), headers=headers) as resp:
        events = await read_events(resp)
    bad = events.index("data: {not json")
    good = [e for i, e in enumerate(events) if i != bad]
    assert len(token_texts(data_of(good[:bad]))) == 2
    assert len(token_texts(data_of(good))) == 4
    assert events[-1] == "data: [DONE]"


async def test_error_after_sends_in_band_error_then_done(make_client: MakeClient) -> None:
    client = await make_client()
    headers = {"X-Sim-Fault": "error_after=2"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=6), headers=headers) as resp:
        assert resp.status == 200
        payloads = data_of(await read_events(resp))
    assert len(token_texts(payloads)) == 2
    assert payloads[-1] == "[DONE]"
    assert_error(payloads[-2], 500, "InternalServerError")


@pytest.mark.parametrize(("spec", "status"), [("error_after=2", 500), ("malformed_after=2", 200)])
async def test_in_flight_faults_without_stream(
    make_client: MakeClient, spec: str, status: int
) -> None:
    client = await make_client()
    async with client.post(CHAT, json=chat(max_tokens=6), headers={"X-Sim-Fault": spec}) as resp:
        assert resp.status == status
        text = await resp.text()
    if status == 200:
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    else:
        assert_error(json.loads(text), 500, "InternalServerError")


async def test_cut_without_stream_closes_before_headers(make_client: MakeClient) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post(CHAT, json=chat(max_tokens=6), headers={"X-Sim-Fault": "cut_after=2"})
    await wait_for(lambda: engine.num_running == 0, timeout=0.5)
    assert engine.aborted == 1


async def test_stall_without_stream_never_answers(make_client: MakeClient) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    timeout = aiohttp.ClientTimeout(total=0.2)
    headers = {"X-Sim-Fault": "stall_after=1"}
    with pytest.raises(TimeoutError):
        await client.post(CHAT, json=chat(max_tokens=6), headers=headers, timeout=timeout)
    await wait_for(lambda: engine.num_running == 0, timeout=0.5)


# --- bad input ------------------------------------------------------------------------------


async def test_content_type_must_be_json(make_client: MakeClient) -> None:
    client = await make_client()
    async with client.post(
        CHAT, data=json.dumps(chat()), headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 400
        assert_error(await resp.json(), 400, "BadRequestError")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]"])
async def test_bad_json_is_400(make_client: MakeClient, raw: bytes) -> None:
    client = await make_client()
    headers = {"Content-Type": "application/json"}
    async with client.post(CHAT, data=raw, headers=headers) as resp:
        assert resp.status == 400
        assert_error(await resp.json(), 400, "BadRequestError")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "stream": "yes"}, "stream"),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream"),
        ({"messages": QUESTION, "max_tokens": 10_000}, None),
        ({"messages": QUESTION, "continue_final_message": True}, None),
    ],
)
async def test_invalid_chat_fields_are_400(
    make_client: MakeClient, body: dict[str, Any], param: str | None
) -> None:
    client = await make_client()
    assert_error(await post_json(client, CHAT, body, status=400), 400, "BadRequestError", param)


async def test_unknown_model_is_404(make_client: MakeClient) -> None:
    client = await make_client()
    body = await post_json(client, CHAT, {**chat(), "model": "gpt-9"}, status=404)
    assert_error(body, 404, "NotFoundError", "model")


async def test_unknown_fields_are_ignored(make_client: MakeClient) -> None:
    client = await make_client()
    body = await post_json(client, CHAT, chat(max_tokens=2, top_k=5, guided_json={}, foo=[1]))
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("given", [[], [1.5], [["a"]], None])
async def test_bad_embedding_input_is_400(make_client: MakeClient, given: Any) -> None:
    client = await make_client()
    body = await post_json(client, "/v1/embeddings", {"input": given}, status=400)
    assert_error(body, 400, "BadRequestError", "input")


# --- prefix cache -------------------------------------------------------------------------


def words(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def test_prefix_cache_hits_leading_full_blocks_only() -> None:
    cache = PrefixCache(capacity_blocks=8, block_tokens=4)
    prompt = words("w", 10)  # two full blocks and a partial one, which is never cached
    assert cache.admit(prompt) == 0
    assert len(cache) == 2
    assert cache.admit(prompt) == 8
    assert cache.match([*prompt[:8], "new"]) == 8
    assert cache.match([*prompt[:5], "new", *prompt[6:]]) == 4
    assert cache.match(["new", *prompt[1:]]) == 0


def test_prefix_cache_blocks_are_chained_to_their_prefix() -> None:
    """The same block text matches only behind the same prefix, and within the same salt."""
    cache = PrefixCache(capacity_blocks=8, block_tokens=2)
    cache.admit(["a", "a", "b", "b"], salt="m1")
    assert cache.match(["b", "b"], salt="m1") == 0
    assert cache.match(["x", "x", "b", "b"], salt="m1") == 0
    assert cache.match(["a", "a", "b", "b"], salt="m2") == 0
    assert cache.match(["a", "a", "b", "b", "c"], salt="m1") == 4


def test_prefix_cache_evicts_least_recently_used() -> None:
    cache = PrefixCache(capacity_blocks=2, block_tokens=2)
    first, second, third = ["a", "a"], ["b", "b"], ["c", "c"]
    cache.admit(first)
    cache.admit(second)
    assert cache.admit(first) == 2  # touched: now `second` is the least recently used
    cache.admit(third)
    assert (cache.match(first), cache.match(second), cache.match(third)) == (2, 0, 2)


def test_prefix_cache_too_small_for_a_prompt_keeps_its_head() -> None:
    cache = PrefixCache(capacity_blocks=2, block_tokens=2)
    prompt = words("w", 6)
    cache.admit(prompt)
    assert len(cache) == 2
    assert cache.match(prompt) == 4


def test_prefix_cache_disabled_at_zero_blocks() -> None:
    cache = PrefixCache(capacity_blocks=0, block_tokens=2)
    assert not cache.enabled
    assert cache.admit(["a", "a"]) == 0
    assert cache.admit(["a", "a"]) == 0
    assert len(cache) == 0


def test_prompt_tokens_of_chat_include_roles_and_of_token_ids_their_numbers() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    gen = parse_chat({"messages": messages}, SimConfig())
    assert gen.prompt == ("system", "be", "brief", "user", "hi")
    assert gen.prompt_tokens == 3
    assert parse_completion({"prompt": [7, 8]}, SimConfig()).prompt == ("7", "8")


async def metric_value(client: Client, name: str) -> float:
    """One sample of `/metrics` for the default model; 0 while the series does not exist."""
    async with client.get("/metrics") as resp:
        text = await resp.text()
    prefix = f'{name}{{engine="0",model_name="sim-model"}} '
    values = [
        float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)
    ]
    return values[0] if values else 0.0


async def seconds_to_first_token(client: Client, body: dict[str, Any]) -> float:
    started = time.monotonic()
    async with client.post("/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                elapsed = time.monotonic() - started
                break
        assert data_of(await read_events(resp))[-1] == "[DONE]"
    return elapsed


async def test_shared_prefix_hits_the_cache_and_skips_its_prefill(
    make_client: MakeClient,
) -> None:
    """1. A 400-token prompt is prefilled at 1 ms a token. 2. A longer prompt starting with it
    finds all 400 tokens cached (25 blocks of 16), is prefilled for its 8 new tokens only, and
    `/metrics` counts the hits."""
    client = await make_client(
        prefix_cache_blocks=100, block_tokens=16, ttft_base=0.0, prefill_per_token=0.001
    )
    shared = " ".join(words("w", 400))
    cold = await seconds_to_first_token(client, {"prompt": shared, "max_tokens": 1})
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 0
    longer = {"prompt": f"{shared} and now eight more words of a question", "max_tokens": 1}
    warm = await seconds_to_first_token(client, longer)
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 400
    assert await metric_value(client, "vllm:prefix_cache_queries_total") == 400 + 408
    assert cold >= 0.4
    assert warm < cold - 0.2  # 8 ms of prefill left; the margin absorbs a loaded machine


async def test_chat_turns_share_their_history_in_the_cache(make_client: MakeClient) -> None:
    client = await make_client(prefix_cache_blocks=100, block_tokens=4)
    history = [{"role": "user", "content": " ".join(words("w", 11))}]  # 12 words with the role
    await post_json(client, CHAT, {"messages": history, "max_tokens": 1})
    answer = {"role": "assistant", "content": "sure"}
    follow_up = [*history, answer, {"role": "user", "content": "and then"}]
    await post_json(client, CHAT, {"messages": follow_up, "max_tokens": 1})
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 12
    assert await metric_value(client, "vllm:prefix_cache_queries_total") == 11 + 14


async def test_prefix_cache_metrics_stay_zero_when_disabled(make_client: MakeClient) -> None:
    client = await make_client()
    await post_json(client, CHAT, chat(max_tokens=1))
    await post_json(client, CHAT, chat(max_tokens=1))
    assert await metric_value(client, "vllm:prefix_cache_queries_total") == 0
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 0


# --- slowdown -------------------------------------------------------------------------------


def test_slowdown_multiplies_every_latency() -> None:
    knobs = {"ttft_base": 0.01, "prefill_per_token": 0.001, "itl_base": 0.02, "itl_per_seq": 0.003}
    fast, slow = SimConfig(**knobs), SimConfig(**knobs, slowdown=3.0)
    assert slow.prefill_seconds(100) == pytest.approx(3 * fast.prefill_seconds(100))
    assert fast.prefill_seconds(100) == pytest.approx(0.01 + 0.1)
    assert slow.inter_token_seconds(4) == pytest.approx(3 * fast.inter_token_seconds(4))
    assert fast.inter_token_seconds(4) == pytest.approx(0.02 + 0.012)


@pytest.mark.parametrize(
    "knobs",
    [{"slowdown": 0.0}, {"slowdown": -1.0}, {"slowdown": math.nan}, {"slowdown": math.inf},
     {"prefix_cache_blocks": -1}, {"block_tokens": 0}],
)  # fmt: skip
def test_speed_and_cache_knobs_are_validated(knobs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(knobs))):
        SimConfig(**knobs)


async def test_slow_worker_answers_slower_side_by_side(make_client: MakeClient) -> None:
    """The same request on two workers at once: the one at slowdown=3 needs at least its
    computed 0.6 s and, with 0.4 s of margin, more than the one at slowdown=1."""
    knobs: dict[str, Any] = {"ttft_base": 0.1, "prefill_per_token": 0.0, "itl_base": 0.025}
    fast = await make_client(**knobs)
    slow = await make_client(**knobs, slowdown=3.0)
    config = slow.app[SIM].config
    slow_minimum = config.prefill_seconds(4) + 4 * config.inter_token_seconds(0)
    assert slow_minimum == pytest.approx(0.6)

    async def timed(client: Client) -> float:
        started = time.monotonic()
        await post_json(client, CHAT, chat(max_tokens=5))
        return time.monotonic() - started

    fast_seconds, slow_seconds = await asyncio.gather(timed(fast), timed(slow))
    assert slow_seconds >= slow_minimum
    assert slow_seconds > fast_seconds


# --- command line ---------------------------------------------------------------------------


def test_cli_rejects_an_invalid_fault(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--fault", "cut_after=soon"])
    assert exited.value.code == 2
    assert "--fault: cut_after needs an integer" in capsys.readouterr().err


def test_cli_flags_for_prefix_cache_and_slowdown() -> None:
    argv = ["--prefix-cache-blocks", "512", "--block-tokens", "32", "--slowdown", "2.5"]
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.prefix_cache_blocks, config.block_tokens, config.slowdown) == (512, 32, 2.5)
    default = config_from_args(build_parser().parse_args([]))
    assert (default.prefix_cache_blocks, default.block_tokens, default.slowdown) == (0, 16, 1.0)


def test_cli_rejects_a_zero_slowdown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--slowdown", "0"])
    assert exited.value.code == 2
    assert "slowdown must be a finite number > 0" in capsys.readouterr().err
