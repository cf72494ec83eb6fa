"""Resuming a chat stream on another worker mid-answer (issue: streams that survive a dying
worker). Real sockets throughout; the client is the OpenAI SDK, so every resumed stream is also
checked to be a valid OpenAI stream.

The first worker in the gateway's list takes the first request (both idle, neither picked yet):
each test asserts the resume metric, so a change in that order fails loudly instead of passing
without a resume.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway import resume
from gateway.resume import Splice, Transcript, resumable_request, scrub_token_ids, worker_fault
from gateway.simulator import SimConfig, parse_fault
from gateway.sse import StreamObserver
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory
from tests.helpers import sse_data

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Tell me about gateways"}]
RESUME = {"X-Gateway-Resume": "true"}
ANSWER_TOKENS = 16  # the simulator's default_max_tokens: the answer's natural length


@dataclass
class Result:
    text: str = ""
    finish: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    ids: set[str] = field(default_factory=set)
    roles: int = 0


async def sdk_stream(url: str, headers: dict[str, str], **fields: Any) -> Result:
    result = Result()
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="sim-model",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
            **fields,
        )
        parts = []
        async with stream:
            async for chunk in stream:
                result.ids.add(chunk.id)
                if chunk.usage is not None:
                    result.usage = chunk.usage.model_dump(
                        include={"prompt_tokens", "completion_tokens", "total_tokens"}
                    )
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
                    result.roles += choice.delta.role is not None
                    if choice.finish_reason:
                        result.finish.append(choice.finish_reason)
        result.text = "".join(parts)
    return result


async def uninterrupted(worker: Sim, **fields: Any) -> Result:
    return await sdk_stream(worker.url, {}, **fields)


def resumes(gw: Gateway, outcome: str) -> float:
    return gw.metric("gateway_stream_resumes_total", model="sim-model", outcome=outcome)


def assert_at_rest(gw: Gateway) -> None:
    assert gw.metric("gateway_requests_in_flight") == 0
    assert all(w.in_flight == 0 for w in gw.fleet.workers)
    assert gw.proxy.admission.in_flight == 0


@pytest.mark.parametrize("cut_after", [1, 2, 8, ANSWER_TOKENS - 1])
@pytest.mark.parametrize("max_tokens", [None, 12])
async def test_a_worker_cut_mid_answer_is_resumed_exactly(
    sim: SimFactory, gateway: GatewayFactory, cut_after: int, max_tokens: int | None
) -> None:
    limit = max_tokens or ANSWER_TOKENS
    if cut_after >= limit:
        cut_after = limit - 1
    dying = await sim(fault=parse_fault(f"cut_after={cut_after}"))
    healthy = await sim()
    gw = await gateway(dying, healthy)
    fields = {} if max_tokens is None else {"max_tokens": max_tokens}
    expected = await uninterrupted(healthy, **fields)
    got = await sdk_stream(gw.url, RESUME, **fields)
    assert got.text == expected.text
    assert len(got.text.split()) == limit
    assert got.finish == expected.finish == (["length"] if max_tokens else ["stop"])
    assert got.usage == expected.usage
    assert len(got.ids) == 1 and got.roles == 1  # one stream: one id, one role chunk
    assert resumes(gw, "resumed") == 1
    assert dying.engine.aborted == 1 or dying.engine.finished == 0
    assert_at_rest(gw)


@pytest.mark.parametrize("fault", ["cut_after=0", f"cut_after={ANSWER_TOKENS}"])
async def test_cut_before_any_token_or_after_the_last_needs_no_resume(
    sim: SimFactory, gateway: GatewayFactory, fault: str
) -> None:
    """Cut before the first token: an ordinary retry before commit. Cut after the last token:
    the answer was complete (finish_reason seen) and only [DONE] is added."""
    dying, healthy = await sim(fault=parse_fault(fault)), await sim()
    gw = await gateway(dying, healthy)
    expected = await uninterrupted(healthy)
    got = await sdk_stream(gw.url, RESUME)
    assert got.text == expected.text
    assert got.finish == expected.finish == ["stop"]  # the answer's natural end
    assert resumes(gw, "resumed") == 0
    assert_at_rest(gw)


async def test_a_stalled_worker_is_resumed_after_the_idle_timeout(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    stalled, healthy = await sim(fault=parse_fault("stall_after=5")), await sim()
    timeouts = {"queue": 0.5, "connect": 1.0, "first_token": 5.0, "idle": 0.3, "total": 20.0}
    gw = await gateway(stalled, healthy, timeouts=timeouts)
    expected = await uninterrupted(healthy)
    got = await sdk_stream(gw.url, RESUME)
    assert got.text == expected.text
    assert got.usage == expected.usage
    assert resumes(gw, "resumed") == 1
    assert stalled.engine.num_running == 0  # the stalled request was aborted upstream
    assert_at_rest(gw)


async def test_a_workers_in_band_error_is_resumed_and_never_shown(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    failing, healthy = await sim(fault=parse_fault("error_after=4")), await sim()
    gw = await gateway(failing, healthy)
    expected = await uninterrupted(healthy)
    got = await sdk_stream(gw.url, RESUME)  # the SDK raises on an in-band error event
    assert got.text == expected.text
    assert resumes(gw, "resumed") == 1
    assert_at_rest(gw)


@pytest.mark.parametrize("stream_interval", [1, 3])
async def test_a_workers_abort_ending_is_resumed_never_taken_for_the_end(
    sim: SimFactory, gateway: GatewayFactory, stream_interval: int
) -> None:
    """vLLM told to stop ends its streams with ``finish_reason: "abort"`` and ``[DONE]``: the
    stream goes on elsewhere, token for token, whatever the chunking; usage stays exact."""
    aborting = await sim(fault=parse_fault("abort_after=5"), stream_interval=stream_interval)
    healthy = await sim()
    gw = await gateway(aborting, healthy, routing={"policy": "round_robin"})
    expected = await uninterrupted(healthy, max_tokens=12)
    for _ in range(2):  # round-robin: one of the two at least starts on the aborting worker
        got = await sdk_stream(gw.url, RESUME, max_tokens=12)
        assert got.text == expected.text and got.usage == expected.usage
        assert got.finish == ["length"]
    assert resumes(gw, "resumed") >= 1
    assert_at_rest(gw)


async def test_an_abort_ending_without_resume_is_an_error_in_band(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    aborting = await sim(fault=parse_fault("abort_after=5"))
    gw = await gateway(aborting)
    async with aiohttp.ClientSession() as client:
        events = await raw_stream(client, gw, {"model": "sim-model", "messages": MESSAGES,
                                               "stream": True}, {})  # fmt: skip
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "upstream_aborted"
    assert all("abort" not in e for e in events[:-2])


async def test_resume_on_for_every_request_by_settings(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    dying, healthy = await sim(fault=parse_fault("cut_after=3")), await sim()
    gw = await gateway(dying, healthy, resume={"enabled": True})
    expected = await uninterrupted(healthy)
    assert (await sdk_stream(gw.url, {})).text == expected.text
    assert resumes(gw, "resumed") == 1


async def raw_stream(
    client: aiohttp.ClientSession, gw: Gateway, body: dict[str, Any], headers: dict[str, str]
) -> list[str]:
    async with client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        return sse_data(await resp.read())


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": MESSAGES, "stream": True, **fields}


async def test_when_the_continuation_fails_too_the_stream_ends_with_one_error(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    first = await sim(fault=parse_fault("cut_after=3"))
    second = await sim(fault=parse_fault("cut_after=2"))
    gw = await gateway(first, second)
    events = await raw_stream(client, gw, chat_body(), RESUME)
    errors = [e for e in events if '"error"' in e]
    assert len(errors) == 1 and "upstream_stream_truncated" in errors[0]
    assert events[-1] == "[DONE]"
    assert events[-2] == errors[0]
    assert resumes(gw, "failed") == 1
    assert_at_rest(gw)


@pytest.mark.parametrize(
    ("fields", "headers"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, RESUME),
        ({"logprobs": True}, RESUME),
        ({}, {}),  # not asked for, and off in settings
        ({}, {"X-Gateway-Resume": "false"}),
    ],
)
async def test_requests_that_are_not_resumable_end_in_band_as_before(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    fields: dict[str, Any],
    headers: dict[str, str],
) -> None:
    dying, healthy = await sim(fault=parse_fault("cut_after=3")), await sim()
    gw = await gateway(dying, healthy)
    events = await raw_stream(client, gw, chat_body(**fields), headers)
    errors = [e for e in events if '"error"' in e]
    assert len(errors) == 1 and "upstream_stream_truncated" in errors[0]
    assert events[-1] == "[DONE]"
    assert healthy.engine.finished == 0  # nobody tried to continue it
    assert sum(resumes(gw, o) for o in ("resumed", "failed")) == 0
    assert_at_rest(gw)


async def test_with_no_other_worker_the_stream_ends_with_its_error(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(fault=parse_fault("cut_after=3")))
    events = await raw_stream(client, gw, chat_body(), RESUME)
    assert sum('"error"' in e for e in events) == 1
    assert resumes(gw, "no_worker") == 1


async def test_a_continuation_is_a_valid_continue_final_message_request(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    """The simulator validates the continuation as vLLM does (add_generation_prompt false,
    a final assistant message); a 400 there would fail the resume."""
    dying = await sim(SimConfig(fault=parse_fault("cut_after=5"), default_max_tokens=10))
    healthy = await sim(SimConfig(default_max_tokens=10))
    gw = await gateway(dying, healthy)
    got = await sdk_stream(gw.url, RESUME, max_completion_tokens=9)
    assert len(got.text.split()) == 9
    assert got.usage is not None and got.usage["completion_tokens"] == 9
    assert resumes(gw, "resumed") == 1


# --- the pure pieces ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, True),
        ({"n": 1}, True),
        ({"n": 2}, False),
        ({"logprobs": True}, False),
        ({"top_logprobs": 3}, False),
        ({"tools": [{"type": "function"}]}, False),
        ({"functions": [{"name": "f"}]}, False),
        ({"tools": []}, True),
        ({"response_format": {"type": "json_object"}}, False),
        ({"structured_outputs": {"regex": "a+"}}, False),
    ],
)
def test_resumable_request(fields: dict[str, Any], expected: bool) -> None:
    assert resumable_request({"messages": MESSAGES, **fields}) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"error": {"message": "boom", "type": "InternalServerError", "code": 500}}, True),
        ({"error": {"message": "bad", "type": "BadRequestError", "code": 400}}, False),
        ({"error": {"message": "bad", "type": "invalid_request_error", "code": None}}, False),
        ({"object": "error", "message": "x", "type": "server_error", "code": 503}, True),
    ],
)
def test_worker_fault(error: dict[str, object], expected: bool) -> None:
    assert worker_fault(error) is expected


def event(**body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def chunk(
    delta: dict[str, Any], finish: str | None = None, ids: list[int] | None = None, **top: Any
) -> bytes:
    header = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "token_ids": ids}
    return event(**{**header, **top, "choices": [choice]})


def role(prompt_ids: list[int] | None = None) -> bytes:
    return chunk({"role": "assistant", "content": ""}, prompt_token_ids=prompt_ids)


def completion_chunk(text: str, ids: list[int], finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
              "stop_reason": None, "token_ids": ids}  # fmt: skip
    return event(id="cmpl-2", object="text_completion", created=99, model="m2", choices=[choice])


def test_transcript_records_the_token_ids_sent_and_builds_a_token_exact_continuation() -> None:
    t = Transcript()
    assert not t.resumable  # nothing sent yet: nothing to continue
    sent = role([5, 6, 7]) + b": keep-alive\n\n"
    t.feed(
        sent + chunk({"content": " the"}, ids=[11]) + chunk({"content": " fo x"}, ids=[12, 13])[:10]
    )
    t.feed(chunk({"content": " fo x"}, ids=[12, 13])[10:])
    assert t.ids == [11, 12, 13] and t.tokens == 3  # tokens, not chunks
    assert t.header == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                        "model": "m"}  # fmt: skip
    assert t.resumable
    original = orjson.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 10,
                             "stream": True, "temperature": 0, "stop": ["x"],
                             "stream_options": {"include_usage": False}})  # fmt: skip
    body = orjson.loads(t.continuation(original))
    assert body == {"model": "m", "prompt": [5, 6, 7, 11, 12, 13], "max_tokens": 7,
                    "stream": True, "temperature": 0, "stop": ["x"], "return_token_ids": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
    no_limit = orjson.loads(t.continuation(orjson.dumps({"model": "m", "messages": MESSAGES})))
    assert "max_tokens" not in no_limit  # vLLM's default: the rest of the context, as before


def test_a_transcript_without_token_ids_is_not_resumable() -> None:
    """A worker that ignores return_token_ids: no exact continuation, so none at all."""
    t = Transcript()
    t.feed(role([5, 6]) + chunk({"content": " a"}))
    assert not t.resumable
    t = Transcript()
    t.feed(role(None) + chunk({"content": " a"}, ids=[1]))
    assert not t.resumable


@pytest.mark.parametrize(
    "delta",
    [{"reasoning": "hmm"}, {"reasoning_content": "hmm"}, {"tool_calls": [{"index": 0}]}],
)
def test_a_transcript_mid_reasoning_or_tool_call_is_not_resumable(delta: dict[str, Any]) -> None:
    t = Transcript()
    t.feed(role([1]) + chunk({"content": " a"}, ids=[2]) + chunk(delta, ids=[3]))
    assert not t.resumable


def test_a_finished_transcript_is_not_resumed() -> None:
    t = Transcript()
    t.feed(role([1]) + chunk({"content": " a"}, finish="stop", ids=[2]))
    assert not t.resumable


def test_scrub_token_ids_leaves_the_events_as_without_them() -> None:
    with_ids = role([5, 6]) + chunk({"content": " a"}, ids=[1, 2])
    assert scrub_token_ids(with_ids) == role(None) + chunk({"content": " a"})


def continuation_stream() -> bytes:
    usage = {"prompt_tokens": 6, "total_tokens": 8, "completion_tokens": 2}
    return (
        completion_chunk(" b", [21])
        + completion_chunk(" c", [22], finish="length")
        + event(
            id="cmpl-2",
            object="text_completion",
            created=99,
            model="m2",
            choices=[],
            usage=usage,
            system_fingerprint="fp",
        )
        + b"data: [DONE]\n\n"
    )


def test_splice_makes_the_continuation_part_of_the_original_chat_stream() -> None:
    t = Transcript()
    t.feed(role([1, 2, 3]) + chunk({"content": " a"}, ids=[11]))
    splice = Splice(t, client_wants_usage=True)
    stream = continuation_stream()
    out = splice.feed(stream[:50]) + splice.feed(stream[50:])
    events = [orjson.loads(e) for e in sse_data(out)[:-1]]
    assert sse_data(out)[-1] == "[DONE]"
    assert [e["id"] for e in events] == ["chatcmpl-1"] * 3
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert {e["created"] for e in events} == {7}
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"content": " b"}, {"content": " c"}]
    assert events[1]["choices"][0]["stop_reason"] is None
    assert "stop_reason" not in events[0]["choices"][0]  # only on the final chunk, as vLLM
    assert events[2]["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    assert events[2]["system_fingerprint"] == "fp" and "system_fingerprint" not in events[1]
    assert splice.done and splice.finish_reason == "length" and splice.first_token


def test_splice_without_usage_puts_the_fingerprint_on_the_finishing_chunk() -> None:
    t = Transcript()
    t.feed(role([1, 2]) + chunk({"content": " a"}, ids=[11]))
    splice = Splice(t, client_wants_usage=False)
    events = [orjson.loads(e) for e in sse_data(splice.feed(continuation_stream()))[:-1]]
    assert len(events) == 2 and "usage" not in events[-1]
    assert events[-1]["system_fingerprint"] == "fp"
    assert splice.usage == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}


def test_a_roll_back_resends_the_held_back_tokens_and_drops_what_the_client_has() -> None:
    """Cut inside a character (cutpoint.py): token 13 began "é" and the client saw none of it,
    token 12 carried " d" and was seen. The continuation starts after token 11 and writes 12
    and 13 again; the client gets only what it had not seen, and usage counts each token once."""
    t = Transcript()
    t.feed(
        role([1, 2]) + chunk({"content": " a"}, ids=[11]) + chunk({"content": " d"}, ids=[12, 13])
    )
    assert not t.roll_back(1, " b")  # the text sent does not start so: nothing changes
    assert t.ids == [11, 12, 13]
    assert t.roll_back(1, " a")
    assert t.tokens == 1 and t.repeated_text == " d" and t.repeated_ids == 2
    original = orjson.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 10})
    assert orjson.loads(t.continuation(original))["prompt"] == [1, 2, 11]
    assert orjson.loads(t.continuation(original))["max_tokens"] == 9
    splice = Splice(t, client_wants_usage=True)
    assert t.repeated_text == "" and t.repeated_ids == 0  # the next resume starts clean
    usage = {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    stream = (
        completion_chunk(" ", [12])  # part of the repeat
        + completion_chunk("dé", [13])  # the rest of the repeat, then new text
        + completion_chunk("t", [14, 15], finish="length")
        + event(
            id="cmpl-2", object="text_completion", created=99, model="m2", choices=[], usage=usage
        )
        + b"data: [DONE]\n\n"
    )
    events = [orjson.loads(e) for e in sse_data(splice.feed(stream))[:-1]]
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(c["delta"]["content"] for c in choices) == "ét"
    assert [c["token_ids"] for c in choices] == [[], [14, 15]]
    assert events[-1]["usage"] == {"prompt_tokens": 2, "total_tokens": 7, "completion_tokens": 5}


_IDS_PATTERN = re.compile(rb'"(prompt_)?token_ids":\[[0-9,\s]*\]')
_PIECES = [
    b'"token_ids":[1,2]', b'"prompt_token_ids":[3, 4]', b'token_ids":[5]', b'"xtoken_ids":[6]',
    b'"token_ids":[a]', b'"token_ids":[', b"]", b'"prompt_', b"abc", b'"', b'"token_ids":[]',
    b",", b" ", b"\n", b"\x0b", b"\x1c",
]  # fmt: skip


def test_scrub_token_ids_does_what_the_regular_expression_does() -> None:
    """The hand-written scan against the expression it replaced, on random adversarial bytes."""
    rng = random.Random(5)
    for _ in range(50_000):
        events = b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(10)))
        assert scrub_token_ids(events) == _IDS_PATTERN.sub(rb'"\1token_ids":null', events), events


def transcript_state(transcript: Transcript) -> tuple[Any, ...]:
    return (
        transcript.header, transcript.prompt_ids, transcript.ids, transcript.text,
        transcript.finished, transcript.tool_calls, transcript.reasoning, transcript.ids_complete,
    )  # fmt: skip


@pytest.mark.parametrize(
    "events",
    [
        [role([1, 2]), chunk({"content": " a"}, ids=[7]), chunk({"content": " b"}, ids=[8])],
        [role([1]) + chunk({"content": " a"}, ids=[7]), b": keep-alive\n\n", b"data: [DONE]\n\n"],
        [b"data:" + role([1, 2])[6:], chunk({"content": " a"}).replace(b"\n\n", b"\r\n\r\n")],
        [b'data: {"choices":[{"index":0,"delta":{"content":"\xff"}}]}\n\n'],  # not UTF-8
        [b"\xef\xbb\xbf" + role([1, 2]), chunk({"content": " a"}, ids=[7])],  # a BOM
        [b"event: x\ndata: " + chunk({"content": " a"}, ids=[7])[6:]],
    ],
    ids=["plain", "comment-done", "other-line-ends", "bad-utf8", "bom", "two-fields"],
)
def test_the_transcript_reads_vllm_s_events_as_the_sse_decoder_does(events: list[bytes]) -> None:
    fast, slow = Transcript(), Transcript()
    for data in events:
        fast.feed(data)
        slow._decode(data)
    assert transcript_state(fast) == transcript_state(slow)


def test_the_transcript_reads_its_events_only_when_asked_or_in_batches() -> None:
    """Events are kept unread (about 3 us each saved on every stream that does not break) and
    read, in order, when the transcript is asked or past ``UNREAD_LIMIT`` bytes: the same
    state as reading each event at once."""
    events = [role([1, 2])] + [chunk({"content": f" w{i}"}, ids=[i]) for i in range(600)]
    lazy, eager = Transcript(), Transcript()
    most = 0
    for data in events:
        lazy.feed(data)
        eager._read_events(data)
        most = max(most, lazy._unread_size)
    assert 0 < most <= resume.UNREAD_LIMIT  # read in batches, never more than the limit held
    assert lazy._unread  # the last ones are still unread...
    assert transcript_state(lazy) == transcript_state(eager)  # ...until asked
    assert not lazy._unread and lazy.tokens == 600
    # Rolled back, then fed more: the new events are read after the roll-back, as they came.
    assert lazy.roll_back(590, "".join(f" w{i}" for i in range(590)))
    assert eager.roll_back(590, "".join(f" w{i}" for i in range(590)))
    for data in [chunk({"content": " x"}, ids=[9])]:
        lazy.feed(data)
        eager._read_events(data)
    assert lazy.ids == eager.ids and lazy.ids[-2:] == [589, 9]


def _relayed(rng: random.Random, i: int, shape: str) -> bytes:
    """An event of a stream of one ``shape``: vLLM's ("plain"), a tool call's index beside
    the content ("tool"), a second choice after the first ("two") or before it ("before"),
    or a delta's "text" instead of its content ("text")."""
    roll = rng.random()
    if roll < 0.8:  # a plain token event, now and then of bytes that are no UTF-8
        text = rng.choice(["a", " b", "é", '"q"', "\\", "\n", "", "~~"]) + str(i)
        text = "" if rng.random() < 0.05 else text
        delta: dict[str, Any] = {"content": text}
        if shape == "tool":
            delta["tool_calls"] = [{"index": 0}]
        elif shape == "text":  # a delta's "text" is no content: a completion's marker
            delta = {"text": text}
        data = chunk(delta, ids=[i])
        if shape == "two":
            second = b',{"index":1,"delta":{"content":"z"},"finish_reason":null}]}\n\n'
            data = data[: -len(b"]}\n\n")] + second
        elif shape == "before":
            first = b'"choices":[{"index":1,"delta":{"role":"assistant","content":"z"}},'
            data = data.replace(b'"choices":[', first)
        # Bytes that are no UTF-8, or no JSON string (a raw tab, a bad escape, a lone
        # surrogate): the whole event's read replaces the first and drops the rest.
        bad = rng.choice([b"\xff", b"\t", b"\\q", b"\\ud800"])
        return data.replace(b"~~", bad) if rng.random() < 0.3 else data
    if roll < 0.85:
        return b": keep-alive\n\n"
    if roll < 0.9:
        return chunk({"content": "x", "role": "assistant"}, ids=[i])
    if roll < 0.95:
        return chunk({"content": "y"}, ids=[i, i + 1])
    return chunk({"reasoning_content": "r"}, ids=[i])


def keep_as_the_pump_does(observer: StreamObserver, transcript: Transcript, data: bytes) -> bool:
    """``data`` into ``transcript`` as ``Pump._feed`` hands it over: a plain event of vLLM's
    shape as its text and id (True), anything else whole."""
    if observer.feed(data) and observer.ids_at[1] and observer.simple:
        transcript.token(data, observer.ids_at)
        return True
    transcript.feed(data)
    return False


@pytest.mark.parametrize("big", [b"18446744073709551616", b"9223372036854775808", b"9" * 5000])
def test_an_id_no_model_has_makes_a_stream_not_resumable_on_either_path(big: bytes) -> None:
    """An id past 64 bits (which orjson reads as a float), past int64, or longer than Python
    reads as an int: the stream is not resumed, whichever way its events were kept, and
    keeping them never raises (it would fail a stream that was working)."""
    events = [role([1, 2]), chunk({"content": " a"}, ids=[3]), chunk({"content": " b"}, ids=[4])]
    events.append(chunk({"content": " c"}, ids=[777]).replace(b"[777]", b"[%b]" % big))
    events += [chunk({"content": " d"}, ids=[5]), chunk({"content": " e"}, ids=[6])]
    observer, relayed, read = StreamObserver(), Transcript(), Transcript()
    kept = 0
    for data in events:
        read.feed(data)
        kept += keep_as_the_pump_does(observer, relayed, data)
    assert kept == 3  # the big id's event among them: the observer only asks for digits
    assert not relayed.resumable
    assert relayed.text == " a b c d e"
    if len(big) < 4300:  # longer, orjson cannot read the event at all: the read drops it
        assert not read.resumable and read.text == relayed.text


def test_a_transcript_keeps_vllm_s_plain_events_as_their_text_and_id() -> None:
    """On the relay's path a transcript keeps the events the observer found plain and of
    vLLM's shape (``StreamObserver.simple``) as their text and token id alone. On 300 random
    streams (tricky text, bytes that are no UTF-8 or no JSON string, comments and events of
    other shapes between them, streams whose every event has a tool call, a second choice
    before or after, or a delta's "text"), asked at random moments (each read catches up):
    the same state as reading every event."""
    rng = random.Random(17)
    kept = 0
    for _ in range(300):
        shape = rng.choice(["plain", "plain", "plain", "tool", "two", "before", "text"])
        events = [role([1, 2])]
        events += [_relayed(rng, i, shape) for i in range(rng.randint(1, 400))]
        events.append(chunk({"content": "!"}, "stop", ids=[0]))
        observer, relayed, read = StreamObserver(), Transcript(), Transcript()
        for data in events:
            read._read_events(data)
            kept += keep_as_the_pump_does(observer, relayed, data)
            if rng.random() < 0.02:
                assert transcript_state(relayed) == transcript_state(read)
        assert transcript_state(relayed) == transcript_state(read)
    assert kept > 10_000  # most plain events were kept as text and id
