"""The relay's per-stream template (``StreamObserver._learn``) on real vLLM's own bytes.

The pump counts a plain token event by its content string alone, nulls its token ids where the
observer found them, and hands a transcript its text and id alone, all when the event matches
the bytes of one the stream sent before (``gateway/sse.py``, ``gateway/resume.py``). This reads
real streams straight from a worker, an event at a time as a paced stream arrives, and checks
that the shortcuts apply to vLLM's events and agree with the decoder and the full reads.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from gateway.resume import Transcript, scrub_token_ids
from gateway.sse import StreamObserver
from tests.vllm.compare import post
from tests.vllm.conftest import VLLMFleet
from tests.vllm.fleet import MODEL

pytestmark = pytest.mark.timeout(300)

MESSAGES = [{"role": "user", "content": "Tell me a story about a gateway"}]
TOKENS = 40


def events_of(raw: bytes) -> list[bytes]:
    """The stream's events, each with its blank line, as a paced worker's reads bring them."""
    return [part + b"\n\n" for part in raw.split(b"\n\n") if part]


@pytest.mark.parametrize("ids", [False, True], ids=["plain", "token-ids"])
async def test_vllm_s_token_events_fit_the_template(vllm: VLLMFleet, ids: bool) -> None:
    body: dict[str, Any] = {
        "model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if ids:
        body["return_token_ids"] = True
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await post(session, vllm.plain.url, "/v1/chat/completions", body)
    assert status == 200, raw[:500]
    events = events_of(raw)
    observer, bytewise = StreamObserver(), StreamObserver()
    relayed, read = Transcript(), Transcript()
    placed = 0
    for event in events:
        plain = observer.feed(event)
        start, end = observer.ids_at[:2]
        if plain and end:
            assert event[:start] + b"null" + event[end:] == scrub_token_ids(event)
            placed += 1
        if plain and end and observer.simple:
            relayed.token(event, observer.ids_at)
        else:
            relayed.feed(event)
        read._read_events(event)
    for i in range(len(raw)):
        bytewise.feed(raw[i : i + 1])
    assert observer._prefix, events[:3]  # learnt from vLLM's first plain token event
    assert (observer.events, observer.done, observer.finish_reason, observer.usage) == (
        bytewise.events, bytewise.done, bytewise.finish_reason, bytewise.usage,
    )  # fmt: skip
    assert observer.finish_reason == "length" and observer.usage is not None
    if ids:
        assert observer.simple  # vLLM's shape: one choice, its ids last
        # vLLM now and then puts two tokens in one event, which the template leaves to the
        # scans; of the others all are placed but the role's, the first token's and the one
        # the template is learnt from.
        single = [e for e in events if re.search(rb'"finish_reason":null,"token_ids":\[\d+\]', e)]
        assert placed >= len(single) - 3 >= TOKENS // 2, (placed, len(single))
        assert relayed.ids == read.ids and len(read.ids) == TOKENS
        assert relayed.text == read.text and relayed.header == read.header


async def test_vllm_s_completion_events_fit_the_template(vllm: VLLMFleet) -> None:
    body = {
        "model": MODEL, "prompt": "A gateway is", "max_tokens": TOKENS, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await post(session, vllm.plain.url, "/v1/completions", body)
    assert status == 200, raw[:500]
    observer, bytewise = StreamObserver(), StreamObserver()
    events = events_of(raw)
    plain = sum(observer.feed(event) for event in events)
    for i in range(len(raw)):
        bytewise.feed(raw[i : i + 1])
    assert observer._prefix, raw[:300]  # learnt around "text"
    # All token events but the first (the first token) and the finishing one are plain.
    going = [e for e in events if b'"finish_reason":null' in e]
    assert plain >= len(going) - 1 >= TOKENS // 2, (plain, len(going))
    assert (observer.events, observer.done, observer.finish_reason) == (
        bytewise.events, bytewise.done, bytewise.finish_reason,
    )  # fmt: skip
