"""EventFramer: whole events only, at every byte split; usage-only events dropped on request."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.framing import (
    _FINISHED,
    _NO_CHOICES,
    EventFramer,
    _events,
    _fingerprint_of,
    _with_fingerprint,
)
from gateway.usage import ask_for_usage, usage_from_tail
from tests.conftest import GatewayFactory
from tests.helpers import scripted_worker, sse_data

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"h\xc3\xa9"}}]}'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'
USAGE = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
DONE = b"data: [DONE]"


def stream(sep: bytes) -> bytes:
    return b"".join(e + sep for e in (ROLE, b": keep-alive", TOKEN, FINISH, USAGE, DONE))


def feed_split(framer: EventFramer, data: bytes, at: int) -> list[bytes]:
    return [framer.feed(data[:at]), framer.feed(data[at:])]


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\r"], ids=["lf", "crlf", "cr"])
def test_every_split_forwards_only_whole_events_unchanged(sep: bytes) -> None:
    data = stream(sep)
    for at in range(len(data) + 1):
        framer = EventFramer()
        first, second = feed_split(framer, data, at)
        assert first + second == data
        assert first == data[: first.__len__()]
        assert first == b"" or first.endswith(sep)  # never half an event
        assert framer.pending == 0


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_usage_event_is_dropped_at_every_split(sep: bytes) -> None:
    data = stream(sep)
    expected = data.replace(USAGE + sep, b"")
    for at in range(len(data) + 1):
        out = b"".join(feed_split(EventFramer(strip_usage=True), data, at))
        assert out == expected


def test_usage_on_chunks_with_choices_is_kept() -> None:
    """continuous_usage_stats puts usage on token chunks: the client asked for those."""
    token_with_usage = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"x":1}}\n\n'
    assert EventFramer(strip_usage=True).feed(token_with_usage) == token_with_usage


def test_an_unfinished_event_is_held_back() -> None:
    framer = EventFramer()
    assert framer.feed(ROLE + b"\n\n" + TOKEN[:10]) == ROLE + b"\n\n"
    assert framer.pending == 10


def _asked(data: dict[str, object]) -> bytes | None:
    return ask_for_usage(orjson.dumps(data), data)


def test_ask_for_usage_keeps_other_options_and_respects_the_client() -> None:
    body = _asked({"model": "m", "stream_options": {"continuous_usage_stats": True, "x": 1}})
    assert body is not None
    # Alone, continuous_usage_stats gives no usage at all from vLLM: it must stay without effect.
    assert orjson.loads(body)["stream_options"] == {
        "continuous_usage_stats": False,
        "include_usage": True,
        "x": 1,
    }
    assert _asked({"model": "m", "stream_options": {"include_usage": True}}) is None
    assert _asked({"model": "m", "stream_options": "bad"}) is None
    assert _asked({"model": "m", "n": 2}) is None  # fingerprints per choice: see framing
    assert _asked({"model": "m", "n": 1}) is not None


FINGERPRINTED_USAGE = USAGE[:-1] + b',"system_fingerprint":"fp-1"}'


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_a_dropped_usage_event_leaves_its_fingerprint_where_vllm_puts_it(sep: bytes) -> None:
    """Without usage, vLLM ends the finishing event with the fingerprint: at every split the
    client gets exactly that stream."""
    events = (ROLE, TOKEN, FINISH, FINGERPRINTED_USAGE, DONE)
    data = b"".join(e + sep for e in events)
    finish = FINISH[:-1] + b',"system_fingerprint":"fp-1"}'
    expected = b"".join(e + sep for e in (ROLE, TOKEN, finish, DONE))
    for at in range(len(data) + 1):
        framer = EventFramer(strip_usage=True)
        out = b"".join(feed_split(framer, data, at)) + framer.flush()
        assert out == expected


def test_a_held_finishing_event_is_released_without_a_usage_event() -> None:
    """A worker that sends no usage chunk: the finishing event goes out before [DONE], or at
    the end of a stream cut after it (flush)."""
    framer = EventFramer(strip_usage=True)
    assert framer.feed(TOKEN + b"\n\n" + FINISH + b"\n\n") == TOKEN + b"\n\n"
    assert framer.feed(DONE + b"\n\n") == FINISH + b"\n\n" + DONE + b"\n\n"
    cut = EventFramer(strip_usage=True)
    assert cut.feed(FINISH + b"\n\n") == b""
    assert cut.flush() == FINISH + b"\n\n"
    assert cut.flush() == b""


def test_usage_from_tail() -> None:
    body = b'{"id":"x","choices":[{"text":"a}"}],"usage":{"prompt_tokens":3,"total_tokens":5,'
    body += b'"completion_tokens":2,"prompt_tokens_details":{"cached":1}}}'
    assert usage_from_tail(body[body.index(b'"usage"') - 5 :]) == {
        "prompt_tokens": 3,
        "total_tokens": 5,
        "completion_tokens": 2,
    }
    assert usage_from_tail(b'{"data":[1,2]}') is None
    assert usage_from_tail(b'"usage":{"prompt_tok') is None


async def test_cut_inside_an_event_ends_with_a_clean_error_event(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A worker that dies mid-event: the client never receives the half event, so the in-band
    error that follows is a well-formed event of its own."""

    async def half_event(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ROLE + b"\n\n" + TOKEN + b"\n\n" + TOKEN[:20])
        await asyncio.sleep(0)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = scripted_worker(half_event)
    async with TestServer(app) as upstream:
        gw = await gateway({"url": str(upstream.make_url("")), "models": ["m"]})
        body = {"model": "m", "messages": [], "stream": True}
        async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            raw = await resp.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "upstream_stream_truncated"
    assert [orjson.loads(e) for e in events[:-1]]  # every event parses as JSON
    assert TOKEN[:20] + b"data" not in raw


def _one_at_a_time(data: bytes) -> bytes:
    """What a usage-stripping framer sends for a stream of whole events, judged event by event
    (the rule in the module docstring, without its cut for runs of plain events)."""
    out: list[bytes] = []
    held = b""
    for event in _events(data):
        if held and not event.strip(b"\r\n"):
            held += event  # a blank event waits behind the held one
            continue
        if b'"usage"' in event and _NO_CHOICES.search(event):
            if held:
                out.append(_with_fingerprint(held, _fingerprint_of(event)))
                held = b""
            out.append(event[: len(event) - len(event.lstrip(b"\r\n"))])  # stray blank lines
            continue
        out.append(held)
        held = b""
        if _FINISHED.search(event) and b'"system_fingerprint"' not in event:
            held = event
        else:
            out.append(event)
    return b"".join(out) + held


# A finish in JSON that is not compact is among them: it is found wherever reads end.
_EVENTS = (
    ROLE, TOKEN, FINISH, USAGE, FINGERPRINTED_USAGE, DONE, b": keep-alive",
    b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
    b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"x":1}}',  # continuous usage
    b'data: {"choices":[{"delta":{"content":"\\"finish_reason\\""}}]}',
)  # fmt: skip


@pytest.mark.timeout(60)
def test_stripping_reads_of_many_events_matches_event_by_event_on_random_streams() -> None:
    """The cut that sends a run of plain events whole, against the rule applied to each event:
    the same bytes for 3,000 random streams (LF, CRLF, a stray LF or a blank event between
    events) at random read splits."""
    rng = random.Random(11)
    for _ in range(3000):
        seps = [b"\n\n"] * 8 + [b"\n\n\n", b"\n\n\n\n", b"\r\n\r\n"]
        data = b"".join(e + rng.choice(seps) for e in rng.choices(_EVENTS, k=rng.randint(1, 30)))
        if data.endswith(b"\n\n\n"):
            data = data[:-1]  # a stray LF between events only
        framer = EventFramer(strip_usage=True)
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 3)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = b"".join(framer.feed(piece) for piece in pieces) + framer.flush()
        assert out == _one_at_a_time(data), data
