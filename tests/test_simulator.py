"""The simulated vLLM worker, over real sockets: shapes, determinism, batching, faults."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.kvindex import KVIndex
from gateway.simulator import ENGINE, FaultSpec, FaultSpecError, SimConfig, create_app, parse_fault
from gateway.simulator.__main__ import build_parser, config_from_args, main
from gateway.simulator.app import SIM
from gateway.simulator.prefix_cache import PrefixCache
from gateway.simulator.protocol import parse_chat, parse_completion
from gateway.simulator.text import HEADER_LEN, chat_header, text_ids, word_id
from tests.helpers import wait_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "what is continuous batching"}]
QUESTION_TOKENS = 1 + 4 + HEADER_LEN  # the role, 4 words, the generation prompt


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
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert "X-Request-Id" not in resp.headers  # adopted as the id, not echoed (as vLLM)
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
    assert usage_chunk["usage"] == {
        "prompt_tokens": QUESTION_TOKENS,
        "total_tokens": QUESTION_TOKENS + 4,
        "completion_tokens": 4,
    }


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
    assert choice["finish_reason"] == "stop"  # no max_tokens: the answer's own end
    assert body["usage"] == {
        "prompt_tokens": QUESTION_TOKENS,
        "total_tokens": QUESTION_TOKENS + 5,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
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
    assert QUESTION_TOKENS + 20 > 40 / 2  # two requests of 20 tokens do not fit together
    async with client.post(CHAT, json=chat(stream=True, max_tokens=20)) as first:
        await first.content.readline()
        assert engine.kv_cache_usage() > 0
        second = asyncio.create_task(stream_tokens(client, CHAT, chat(max_tokens=20)))
        await wait_for(lambda: engine.num_waiting == 1, timeout=1.0)
        assert engine.num_running == 1
    assert len(await asyncio.wait_for(second, timeout=2)) == 20


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
    # 1 s, far below the 2.5 s the request would run: 0.1 s failed on a busy machine.
    await wait_for(lambda: engine.num_running == 0, timeout=1.0)
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
    # 1 s, far below the 2.5 s the request would run: 0.1 s failed on a busy machine.
    await wait_for(lambda: engine.num_running == 0, timeout=1.0)
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
        f"vllm:prompt_tokens_total{labels} {QUESTION_TOKENS}.0",
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
    headers = {"X-Sim-Fault": "slow_first_token=1.0"}
    async with client.post(CHAT, json=chat(stream=True, max_tokens=2), headers=headers) as resp:
        assert time.monotonic() - started < 0.8  # wide: a busy machine is slow to answer too
        await resp.content.readline()
        assert time.monotonic() - started >= 1.0 - 0.002  # timers may round to the millisecond
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
        ({"messages": []}, None),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "stream": "yes"}, "stream"),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": QUESTION, "max_tokens": 10_000}, "max_tokens"),
        ({"messages": QUESTION, "max_completion_tokens": 10_000}, "max_completion_tokens"),
        ({"messages": QUESTION, "n": 0}, None),
        ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
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


def test_an_index_fed_the_prefix_caches_events_sees_the_cache_itself() -> None:
    """The gateway's index (``KVIndex``), fed nothing but the cache's events, matches every
    prompt exactly as the cache does, after every admission. Four growing sessions in a cache
    that holds about one of them: a session's own head is often the least recently used block
    when it comes back, and making room for its new blocks must not evict it (vLLM takes a
    request's cached blocks before it allocates), nor may the events say it did."""
    cache = PrefixCache(capacity_blocks=12, block_tokens=2)
    index = KVIndex()
    cache.on_events = lambda events: index.apply("w", events)
    rng = random.Random(3)
    sessions: list[list[int]] = [[] for _ in range(4)]
    for _ in range(500):
        session = sessions[rng.randrange(4)]
        if len(session) > 20:
            session.clear()
        session.extend(rng.randrange(50) for _ in range(rng.randrange(1, 6)))
        cache.admit(session, salt="m")
        for prompt in sessions:
            seen = index.match(index.keys(prompt, 2), ["w"]).get("w", 0) * 2
            assert seen == cache.match(prompt, salt="m"), prompt


def test_prefix_cache_disabled_at_zero_blocks() -> None:
    cache = PrefixCache(capacity_blocks=0, block_tokens=2)
    assert not cache.enabled
    assert cache.admit(["a", "a"]) == 0
    assert cache.admit(["a", "a"]) == 0
    assert len(cache) == 0


def test_prompt_tokens_of_chat_include_the_template_and_of_token_ids_their_number() -> None:
    """A chat prompt counts each message's role and words and the generation prompt (the
    marker and the answer key), as vLLM counts the chat template's tokens."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    gen = parse_chat({"messages": messages}, SimConfig())
    system, user = word_id("<|system|>"), word_id("<|user|>")
    assert gen.prompt_ids[:5] == (system, *text_ids("be brief"), user, word_id("hi"))
    assert gen.prompt_ids[5:] == tuple(chat_header(gen.key))
    assert gen.prompt_tokens == 5 + HEADER_LEN
    assert parse_completion({"prompt": [7, 8]}, SimConfig()).prompt_ids == (7, 8)


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
    """1. A 400-token prompt is prefilled at 2 ms a token. 2. A longer prompt starting with it
    finds all 400 tokens cached (25 blocks of 16), is prefilled for its 8 new tokens only, and
    `/metrics` counts the hits."""
    client = await make_client(
        prefix_cache_blocks=100, block_tokens=16, ttft_base=0.0, prefill_per_token=0.002
    )
    shared = " ".join(words("w", 400))
    cold = await seconds_to_first_token(client, {"prompt": shared, "max_tokens": 1})
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 0
    longer = {"prompt": f"{shared} and now eight more words of a question", "max_tokens": 1}
    warm = await seconds_to_first_token(client, longer)
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 400
    assert await metric_value(client, "vllm:prefix_cache_queries_total") == 400 + 408
    assert cold >= 0.8 - 0.002  # timers may round to the millisecond
    assert warm < cold - 0.4  # 16 ms of prefill left; the margin absorbs a loaded machine


async def test_chat_turns_share_their_history_in_the_cache(make_client: MakeClient) -> None:
    """The history (role and 11 words: 3 blocks of 4) is cached; the generation prompt that
    ended the first request differs from the second request's next message."""
    client = await make_client(prefix_cache_blocks=100, block_tokens=4)
    history = [{"role": "user", "content": " ".join(words("w", 11))}]
    await post_json(client, CHAT, {"messages": history, "max_tokens": 1})
    answer = {"role": "assistant", "content": "sure"}
    follow_up = [*history, answer, {"role": "user", "content": "and then"}]
    await post_json(client, CHAT, {"messages": follow_up, "max_tokens": 1})
    assert await metric_value(client, "vllm:prefix_cache_hits_total") == 12
    queries = (12 + HEADER_LEN) + (12 + 2 + 3 + HEADER_LEN)
    assert await metric_value(client, "vllm:prefix_cache_queries_total") == queries


async def test_the_oracle_route_reports_what_the_prefix_cache_holds(
    make_client: MakeClient,
) -> None:
    """``/sim/prefix_cache/match`` (the routing benchmark's oracle) answers the cached leading
    tokens for the model, exactly: full blocks only, nothing for another model, and asking
    caches nothing."""
    client = await make_client(prefix_cache_blocks=100, block_tokens=4)
    prompt = list(range(100, 111))  # 11 ids: 2 full blocks of 4, then 3 left over
    match = "/sim/prefix_cache/match"
    assert await post_json(client, match, {"model": "sim-model", "token_ids": prompt}) == {
        "cached_tokens": 0
    }
    await post_json(client, COMPLETIONS, {"prompt": prompt, "max_tokens": 1})
    held = await post_json(client, match, {"model": "sim-model", "token_ids": [*prompt, 7, 8]})
    assert held == {"cached_tokens": 8}
    other = await post_json(client, match, {"model": "other", "token_ids": prompt})
    assert other == {"cached_tokens": 0}
    bad = await post_json(client, match, {"model": "sim-model", "token_ids": ["a"]}, status=400)
    assert_error(bad, 400, "BadRequestError", "token_ids")


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


# --- return_token_ids and resuming a chat answer with completions -------------------------

COMPLETIONS = "/v1/completions"


async def events_of(
    client: Client, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[Any]:
    """The parsed `data:` payloads of one stream (`[DONE]` stays a string)."""
    async with client.post(path, json={**body, "stream": True}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return data_of(await read_events(resp))


def chunks_of(payloads: list[Any]) -> list[dict[str, Any]]:
    return [p for p in payloads if isinstance(p, dict) and p.get("choices")]


def stream_ids(payloads: list[Any]) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) of a stream sent with return_token_ids."""
    prompt: list[int] = []
    answer: list[int] = []
    for payload in chunks_of(payloads):
        prompt += payload.get("prompt_token_ids") or []
        for choice in payload["choices"]:
            prompt += choice.get("prompt_token_ids") or []
            answer += choice.get("token_ids") or []
    return prompt, answer


async def test_return_token_ids_in_a_chat_stream(make_client: MakeClient) -> None:
    client = await make_client(stream_interval=2)
    options = {"include_usage": True}
    body = chat(max_tokens=5, return_token_ids=True, stream_options=options)
    payloads = await events_of(client, CHAT, body)
    role, *tokens = chunks_of(payloads)
    assert role["prompt_token_ids"] == list(role["prompt_token_ids"])
    assert len(role["prompt_token_ids"]) == payloads[-2]["usage"]["prompt_tokens"]
    assert [len(t["choices"][0]["token_ids"]) for t in tokens] == [1, 2, 2]
    assert all(isinstance(i, int) for t in tokens for i in t["choices"][0]["token_ids"])
    whole = await post_json(client, CHAT, chat(max_tokens=5, return_token_ids=True))
    assert whole["prompt_token_ids"] == role["prompt_token_ids"]
    assert whole["choices"][0]["token_ids"] == stream_ids(payloads)[1]


async def test_without_return_token_ids_the_keys_are_null(make_client: MakeClient) -> None:
    client = await make_client()
    role, *tokens = chunks_of(await events_of(client, CHAT, chat(max_tokens=2)))
    assert (role["prompt_token_ids"], role["prompt_text"]) == (None, None)
    assert [t["choices"][0]["token_ids"] for t in tokens] == [None, None]
    body = await post_json(client, COMPLETIONS, {"prompt": "a b", "max_tokens": 2})
    assert (body["choices"][0]["token_ids"], body["choices"][0]["prompt_token_ids"]) == (
        None,
        None,
    )


async def test_completions_return_token_ids(make_client: MakeClient) -> None:
    """The prompt's ids ride on the first chunk's choice; every chunk has its tokens' ids."""
    client = await make_client()
    body = {"prompt": "once upon a time", "max_tokens": 3, "return_token_ids": True}
    chunks = chunks_of(await events_of(client, COMPLETIONS, body))
    firsts = [c["choices"][0]["prompt_token_ids"] for c in chunks]
    assert firsts == [text_ids("once upon a time"), None, None]
    whole = await post_json(client, COMPLETIONS, body)
    assert whole["choices"][0]["prompt_token_ids"] == firsts[0]
    assert whole["choices"][0]["token_ids"] == [c["choices"][0]["token_ids"][0] for c in chunks]


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("max_tokens", [None, 9])
@pytest.mark.parametrize("k", [0, 1, 5, 8])
async def test_completions_continue_a_chat_answer_token_for_token(
    make_client: MakeClient, k: int, max_tokens: int | None, seed: int | None
) -> None:
    """A gateway resumes a chat stream on another worker: prompt = the chat's prompt ids and
    the first k answer ids; the continuation writes exactly tokens k.. of the same answer,
    ends where the chat did (with the same finish_reason), and counts its own prompt."""
    first, other = await make_client(), await make_client()
    fields = {k_: v for k_, v in (("max_tokens", max_tokens), ("seed", seed)) if v is not None}
    original = await events_of(first, CHAT, chat(return_token_ids=True, **fields))
    prompt, answer = stream_ids(original)
    texts = token_texts(original)
    assert len(answer) == len(texts) == (max_tokens or 16)
    request: dict[str, Any] = {"prompt": prompt + answer[:k], "return_token_ids": True}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens - k
    if seed is not None:
        request["seed"] = seed
    options = {"include_usage": True}
    rest = await events_of(other, COMPLETIONS, {**request, "stream_options": options})
    assert token_texts(rest) == texts[k:]
    assert stream_ids(rest) == (prompt + answer[:k], answer[k:])
    finish = [c["choices"][0]["finish_reason"] for c in chunks_of(rest)][-1]
    assert finish == chunks_of(original)[-1]["choices"][0]["finish_reason"]
    usage = rest[-2]["usage"]
    assert usage["prompt_tokens"] == len(prompt) + k
    assert usage["completion_tokens"] == len(answer) - k


async def test_a_continuation_of_a_continued_final_message(make_client: MakeClient) -> None:
    """`continue_final_message` renders the partial answer after the generation prompt, so
    its prompt ids resume at the right token too."""
    client = await make_client()
    answer = token_texts(await events_of(client, CHAT, chat(max_tokens=8)))
    partial = {"role": "assistant", "content": "".join(answer[:3])}
    body = {
        "messages": [*QUESTION, partial],
        "max_tokens": 2,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "return_token_ids": True,
    }
    continued = await events_of(client, CHAT, body)
    assert token_texts(continued) == answer[3:5]
    prompt, ids = stream_ids(continued)
    rest = await events_of(client, COMPLETIONS, {"prompt": prompt + ids, "max_tokens": 3})
    assert token_texts(rest) == answer[5:8]


async def test_token_ids_of_other_prompts_start_a_fresh_answer(make_client: MakeClient) -> None:
    client = await make_client()
    a = await post_json(client, COMPLETIONS, {"prompt": [5, 6, 7], "max_tokens": 4})
    b = await post_json(client, COMPLETIONS, {"prompt": [5, 6, 8], "max_tokens": 4})
    assert a["choices"][0]["text"] != b["choices"][0]["text"]
    assert a["usage"]["prompt_tokens"] == 3


# --- vLLM's stream and body shapes ----------------------------------------------------------

CHUNK_KEYS = ["id", "object", "created", "model", "choices"]


def keys(payload: dict[str, Any]) -> list[str]:
    return list(payload)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_chunks_have_vllm_keys(make_client: MakeClient, include_usage: bool) -> None:
    """The role chunk has `prompt_token_ids`/`prompt_text` and no `stop_reason`; token chunks
    `token_ids` and no `stop_reason`; the finishing chunk `stop_reason`; the last event
    before [DONE] (the usage chunk if asked for, else the finishing chunk) the fingerprint."""
    client = await make_client()
    body = chat(max_tokens=2, stream_options={"include_usage": include_usage})
    payloads = await events_of(client, CHAT, body)
    role, token, finish = payloads[:3]
    assert keys(role) == [*CHUNK_KEYS, "prompt_token_ids", "prompt_text"]
    assert keys(role["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
    assert keys(token) == CHUNK_KEYS
    assert keys(token["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "token_ids"]
    assert keys(finish["choices"][0]) == [
        "index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids",
    ]  # fmt: skip
    if include_usage:
        assert keys(finish) == CHUNK_KEYS
        usage_chunk = payloads[3]
        assert keys(usage_chunk) == [*CHUNK_KEYS, "usage", "system_fingerprint"]
        assert keys(usage_chunk["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]
        assert payloads[4:] == ["[DONE]"]
    else:
        assert keys(finish) == [*CHUNK_KEYS, "system_fingerprint"]
        assert payloads[3:] == ["[DONE]"]
    assert payloads[-2]["system_fingerprint"].startswith("vllm-")


async def test_completion_chunks_have_vllm_keys(make_client: MakeClient) -> None:
    client = await make_client()
    payloads = await events_of(client, COMPLETIONS, {"prompt": "a b", "max_tokens": 2})
    token, finish, done = payloads
    choice_keys = [
        "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
        "token_ids",
    ]  # fmt: skip
    assert keys(token) == CHUNK_KEYS and keys(token["choices"][0]) == choice_keys
    assert keys(finish) == [*CHUNK_KEYS, "system_fingerprint"]
    assert keys(finish["choices"][0]) == choice_keys
    assert done == "[DONE]"


@pytest.mark.parametrize(
    ("options", "role_usage", "chunk_usage"),
    [
        ({"continuous_usage_stats": True}, False, False),  # only counts with include_usage
        ({"include_usage": True, "continuous_usage_stats": True}, True, True),
        ({"include_usage": True}, False, False),
    ],
)
async def test_continuous_usage_needs_include_usage(
    make_client: MakeClient, options: dict[str, bool], role_usage: bool, chunk_usage: bool
) -> None:
    client = await make_client()
    payloads = await events_of(client, CHAT, chat(max_tokens=2, stream_options=options))
    role, *tokens = chunks_of(payloads)
    assert ("usage" in role) == role_usage
    assert all(("usage" in t) == chunk_usage for t in tokens)
    if role_usage:
        assert role["usage"] == {
            "prompt_tokens": QUESTION_TOKENS,
            "total_tokens": QUESTION_TOKENS,
            "completion_tokens": 0,
            "completion_tokens_details": None,
        }
        assert keys(role) == [*CHUNK_KEYS, "usage", "prompt_token_ids", "prompt_text"]


async def test_completions_continuous_usage_has_three_keys(make_client: MakeClient) -> None:
    client = await make_client()
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": "a b", "max_tokens": 2, "stream_options": options}
    usages = [c["usage"] for c in chunks_of(await events_of(client, COMPLETIONS, body))]
    assert usages == [
        {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1},
        {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2},
    ]


async def test_json_bodies_have_vllm_keys(make_client: MakeClient) -> None:
    client = await make_client()
    async with client.post(CHAT, json=chat(max_tokens=2)) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        body = await resp.json()
    assert keys(body) == [
        "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
        "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
        "ec_transfer_params", "metrics",
    ]  # fmt: skip
    choice = body["choices"][0]
    assert keys(choice) == [
        "index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
        "routed_experts",
    ]  # fmt: skip
    assert keys(choice["message"]) == [
        "role", "content", "refusal", "annotations", "audio", "function_call", "reasoning",
    ]  # fmt: skip
    assert keys(body["usage"]) == [
        "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
        "completion_tokens_details",
    ]  # fmt: skip
    text = await post_json(client, COMPLETIONS, {"prompt": "a", "max_tokens": 1})
    assert keys(text) == [
        "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
        "usage", "kv_transfer_params", "ec_transfer_params", "metrics",
    ]  # fmt: skip
    assert keys(text["choices"][0]) == [
        "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
        "prompt_logprobs", "prompt_token_ids", "routed_experts",
    ]  # fmt: skip


async def test_model_card_has_vllm_keys(make_client: MakeClient) -> None:
    client = await make_client()
    async with client.get("/v1/models") as resp:
        assert resp.headers["Content-Type"] == "application/json"
        (card,) = (await resp.json())["data"]
    assert keys(card) == [
        "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission",
    ]  # fmt: skip
    (permission,) = card["permission"]
    assert permission["object"] == "model_permission"
    assert permission["id"].startswith("modelperm-")


# --- n, logprobs, echo, stream interval -------------------------------------------------------


async def test_n_choices_interleave_and_usage_counts_them_all(make_client: MakeClient) -> None:
    client = await make_client()
    options = {"include_usage": True}
    body = chat(max_tokens=3, n=2, seed=1, stream_options=options)
    payloads = await events_of(client, CHAT, body)
    chunks = chunks_of(payloads)
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert indexes == [0, 1, 0, 1, 0, 1, 0, 1]  # role chunks first, then a token each
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes == [None] * 6 + ["length", "length"]
    assert payloads[-2]["usage"]["completion_tokens"] == 6
    text = {i: "".join(token_texts([c for c in chunks if c["choices"][0]["index"] == i]))
            for i in (0, 1)}  # fmt: skip
    assert text[0] != text[1]
    assert text[0] == "".join(await stream_tokens(client, CHAT, chat(max_tokens=3, seed=1)))
    whole = await post_json(client, CHAT, chat(max_tokens=3, n=2, seed=1))
    assert [c["message"]["content"] for c in whole["choices"]] == [text[0], text[1]]
    assert whole["usage"]["completion_tokens"] == 6


async def test_n_choices_each_finish_with_the_fingerprint(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"prompt": "a b", "max_tokens": 2, "n": 2}
    chunks = chunks_of(await events_of(client, COMPLETIONS, body))
    finishing = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["index"] for c in finishing] == [0, 1]
    assert all("system_fingerprint" in c for c in finishing)
    assert not any("system_fingerprint" in c for c in chunks if c not in finishing)


async def test_n_choices_count_in_metrics_as_vllm(make_client: MakeClient) -> None:
    client = await make_client()
    await post_json(client, CHAT, chat(max_tokens=3, n=2))
    assert await metric_value(client, "vllm:prompt_tokens_total") == 2 * QUESTION_TOKENS
    assert await metric_value(client, "vllm:generation_tokens_total") == 6


async def test_chat_logprobs(make_client: MakeClient) -> None:
    client = await make_client()
    body = chat(max_tokens=2, logprobs=True, top_logprobs=3)
    whole = await post_json(client, CHAT, body)
    content = whole["choices"][0]["logprobs"]["content"]
    text = whole["choices"][0]["message"]["content"]
    assert "".join(entry["token"] for entry in content) == text
    for entry in content:
        assert keys(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert keys(entry["top_logprobs"][1]) == ["token", "logprob", "bytes"]
    chunks = chunks_of(await events_of(client, CHAT, body))
    streamed = [e for c in chunks[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = await post_json(client, CHAT, chat(max_tokens=1, logprobs=True))
    assert plain["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


async def test_completion_logprobs_and_echo(make_client: MakeClient) -> None:
    """Echo puts the prompt before the answer, in the text and the logprobs (its first token
    has none); `logprobs: k` gives the token and k others."""
    client = await make_client()
    body = {"prompt": "a gateway is", "max_tokens": 2, "echo": True, "logprobs": 1}
    whole = await post_json(client, COMPLETIONS, body)
    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith("a gateway is")
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [0, 1, 9, 12, 12 + len(logprobs["tokens"][3])]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == 3
    assert whole["usage"]["completion_tokens"] == 2
    chunks = chunks_of(await events_of(client, COMPLETIONS, body))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == text_ids("a gateway is")
    assert chunks[1]["choices"][0]["logprobs"]["text_offset"] == logprobs["text_offset"][4:]


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_without_generation(make_client: MakeClient, stream: bool) -> None:
    """`echo` with `max_tokens: 0`: the prompt alone, though vLLM samples (and counts) one."""
    client = await make_client()
    body = {"prompt": "a b c", "max_tokens": 0, "echo": True}
    if stream:
        payloads = await events_of(
            client, COMPLETIONS, {**body, "stream_options": {"include_usage": True}}
        )
        (chunk,) = chunks_of(payloads)
        choice, usage = chunk["choices"][0], payloads[-2]["usage"]
    else:
        whole = await post_json(client, COMPLETIONS, body)
        choice, usage = whole["choices"][0], whole["usage"]
    assert (choice["text"], choice["finish_reason"]) == ("a b c", "length")
    assert usage["completion_tokens"] == 1
    without_echo = await post_json(client, COMPLETIONS, {**body, "echo": False}, status=400)
    assert_error(without_echo, 400, "BadRequestError", "max_tokens")


@pytest.mark.parametrize(("interval", "sizes"), [(1, [1] * 8), (3, [1, 3, 3, 1]), (8, [1, 7])])
async def test_stream_interval_puts_tokens_in_one_chunk(
    make_client: MakeClient, interval: int, sizes: list[int]
) -> None:
    """As vLLM's --stream-interval: the first token alone, then `interval` at a time."""
    client = await make_client(stream_interval=interval)
    plain = await stream_tokens(await make_client(), CHAT, chat(max_tokens=8))
    body = chat(max_tokens=8, return_token_ids=True)
    chunks = chunks_of(await events_of(client, CHAT, body))[1:]
    assert [len(c["choices"][0]["token_ids"]) for c in chunks] == sizes
    assert [c["choices"][0]["delta"]["content"].count(" ") for c in chunks] == sizes
    assert "".join(token_texts(chunks)) == "".join(plain)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_faults_strike_after_their_tokens_however_chunked(make_client: MakeClient) -> None:
    client = await make_client(stream_interval=4)
    payloads = await events_of(client, CHAT, chat(max_tokens=9), {"X-Sim-Fault": "error_after=3"})
    assert len("".join(token_texts(payloads)).split()) == 3
    assert_error(payloads[-2], 500, "InternalServerError")


def test_cli_stream_interval() -> None:
    config = config_from_args(build_parser().parse_args(["--stream-interval", "3"]))
    assert config.stream_interval == 3
    with pytest.raises(ValueError, match="stream_interval"):
        SimConfig(stream_interval=0)


# --- abort ------------------------------------------------------------------------------------


def assert_aborted(payloads: list[Any], choice_keys: list[str]) -> dict[str, Any]:
    """The stream ended as vLLM's abort: an empty choice with finish_reason "abort", [DONE]."""
    assert payloads[-1] == "[DONE]"
    abort = chunks_of(payloads)[-1]
    (choice,) = abort["choices"]
    assert choice["finish_reason"] == "abort"
    assert keys(choice) == choice_keys
    return abort


CHAT_FINISH_KEYS = ["index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids"]


async def test_abort_after_ends_a_chat_stream_as_vllm_abort(make_client: MakeClient) -> None:
    client = await make_client()
    engine = client.app[ENGINE]
    headers = {"X-Sim-Fault": "abort_after=3"}
    payloads = await events_of(client, CHAT, chat(max_tokens=8), headers)
    abort = assert_aborted(payloads, CHAT_FINISH_KEYS)
    assert abort["choices"][0]["delta"] == {}
    assert "system_fingerprint" in abort
    assert len(token_texts(payloads)) == 3
    await wait_for(lambda: engine.num_running == 0, timeout=0.5)
    assert engine.aborted == 1


async def test_abort_after_with_usage_and_completions(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"prompt": "a b", "max_tokens": 8, "stream_options": {"include_usage": True}}
    payloads = await events_of(client, COMPLETIONS, body, {"X-Sim-Fault": "abort_after=2"})
    choice_keys = [
        "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
        "token_ids",
    ]  # fmt: skip
    abort = assert_aborted(payloads, choice_keys)
    assert abort["choices"][0]["text"] == ""
    assert payloads[-2]["usage"]["completion_tokens"] == 2


async def test_abort_after_zero_still_sends_the_role_chunk(make_client: MakeClient) -> None:
    client = await make_client()
    payloads = await events_of(client, CHAT, chat(max_tokens=8), {"X-Sim-Fault": "abort_after=0"})
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert_aborted(payloads, CHAT_FINISH_KEYS)
    assert token_texts(payloads) == []


async def test_abort_after_without_stream(make_client: MakeClient) -> None:
    client = await make_client()
    headers = {"X-Sim-Fault": "abort_after=2"}
    async with client.post(CHAT, json=chat(max_tokens=8), headers=headers) as resp:
        body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "abort"
    assert body["usage"]["completion_tokens"] == 2


async def test_shutdown_aborts_running_and_waiting_streams(aiohttp_server: Any) -> None:
    """1. A streams (holding the only slot), B waits for it. 2. The worker shuts down.
    3. Both end at once with vLLM's abort chunk and [DONE]; the server closes."""
    server = await aiohttp_server(create_app(SimConfig(max_num_seqs=1, itl_base=0.05)))
    engine = server.app[ENGINE]
    async with aiohttp.ClientSession() as session:
        url = str(server.make_url(CHAT))
        running = await session.post(url, json=chat(stream=True, max_tokens=400))
        await running.content.readline()  # the role chunk: A holds the slot
        waiting = await session.post(url, json=chat(stream=True, max_tokens=400))
        await wait_for(lambda: engine.num_waiting == 1, timeout=1.0)
        closing = asyncio.create_task(server.close())
        for resp in (running, waiting):
            payloads = data_of(await asyncio.wait_for(read_events(resp), timeout=2))
            assert_aborted(payloads, CHAT_FINISH_KEYS)
            resp.close()
        await asyncio.wait_for(closing, timeout=5)
    assert engine.aborted == 2


# --- counting -------------------------------------------------------------------------------


async def test_without_max_tokens_the_answer_runs_to_its_end(make_client: MakeClient) -> None:
    """The default limit is what is left of the context: the answer's own end (16 tokens,
    "stop") when it fits, else the end of the context ("length")."""
    roomy = await make_client()
    body = await post_json(roomy, CHAT, chat())
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (16, "stop")
    tight = await make_client(max_model_len=QUESTION_TOKENS + 5, kv_cache_tokens=100)
    body = await post_json(tight, CHAT, chat())
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (
        5,
        "length",
    )


async def test_prompt_plus_max_tokens_over_the_context_is_clamped(make_client: MakeClient) -> None:
    client = await make_client(max_model_len=QUESTION_TOKENS + 5, kv_cache_tokens=100)
    body = await post_json(client, CHAT, chat(max_tokens=QUESTION_TOKENS + 5))
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (
        5,
        "length",
    )


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("w " * 30, "at least 21"), (list(range(3, 33)), "30"), (list(range(3, 24)), "at least 21")],
)
async def test_a_prompt_over_the_context_is_400_naming_input_tokens(
    make_client: MakeClient, prompt: Any, count: str
) -> None:
    """vLLM tokenizes text only up to the limit + 1, so it says "at least"."""
    client = await make_client(max_model_len=20, kv_cache_tokens=100, default_max_tokens=4)
    body = await post_json(client, COMPLETIONS, {"prompt": prompt}, status=400)
    assert_error(body, 400, "BadRequestError", "input_tokens")
    assert body["error"]["message"] == (
        f"This model's maximum context length is 20 tokens. However, your prompt contains "
        f"{count} input tokens, which exceeds this limit even without any output tokens. "
        f"Please reduce the length of the input prompt. (parameter=input_tokens, "
        f"value={count.split()[-1]})"
    )


async def test_a_prompt_filling_the_context_leaves_no_room(make_client: MakeClient) -> None:
    client = await make_client(max_model_len=20, kv_cache_tokens=100, default_max_tokens=4)
    body = await post_json(client, COMPLETIONS, {"prompt": list(range(3, 23))}, status=400)
    assert_error(body, 400, "BadRequestError", "max_tokens")
    assert body["error"]["message"].startswith("max_tokens must be at least 1, got 0.")


async def test_unknown_model_wording(make_client: MakeClient) -> None:
    client = await make_client(models=("a", "b"))
    body = await post_json(client, CHAT, {**chat(), "model": "gpt-9"}, status=404)
    assert body["error"]["message"] == "The model `gpt-9` does not exist. Valid aliases: a, b."


async def test_metrics_content_type_and_engine_label(make_client: MakeClient) -> None:
    client = await make_client()
    async with client.get("/metrics") as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        assert 'vllm:num_requests_running{engine="0",model_name="sim-model"}' in await resp.text()
