"""The real-vLLM stream comparison (``tests/vllm/compare.py``) tolerates only chunking.

vLLM, falling behind, groups tokens differently from run to run; the comparison must see two
groupings of one answer as equal, and any other difference as a difference. The streams here
are the shapes CI captured from vLLM 0.32 (a failing run printed both)."""

from __future__ import annotations

from typing import Any

import orjson

from tests.vllm.compare import normal_events


def _chunk(content: str, finish: str | None = None, rid: str = "chatcmpl-a") -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {"content": content},
        "logprobs": None,
        "finish_reason": finish,
    }
    event: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "tiny",
        "choices": [choice],
    }
    if finish is not None:
        choice["stop_reason"] = None
        event["system_fingerprint"] = "vllm-0.32.0"
    choice["token_ids"] = None
    return event


def _stream(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_tokens_in_the_finish_chunk_equal_tokens_before_it() -> None:
    direct = _stream(_chunk("ys"), _chunk("thon"), _chunk("11mat", "length"))
    through = _stream(
        _chunk("ys", rid="chatcmpl-b"),
        _chunk("thon11", rid="chatcmpl-b"),
        _chunk("mat", "length", rid="chatcmpl-b"),
    )
    assert normal_events(direct) == normal_events(through)


def test_different_text_is_a_difference() -> None:
    direct = _stream(_chunk("ys"), _chunk("thon"), _chunk("11mat", "length"))
    through = _stream(_chunk("ys"), _chunk("thon1"), _chunk("mat", "length"))
    assert normal_events(direct) != normal_events(through)


def test_a_different_ending_is_a_difference() -> None:
    direct = _stream(_chunk("ys"), _chunk("mat", "length"))
    through = _stream(_chunk("ys"), _chunk("mat", "stop"))
    assert normal_events(direct) != normal_events(through)


def test_a_missing_fingerprint_is_a_difference() -> None:
    finish = _chunk("mat", "length")
    bare = {k: v for k, v in finish.items() if k != "system_fingerprint"}
    assert normal_events(_stream(_chunk("ys"), finish)) != normal_events(
        _stream(_chunk("ys"), bare)
    )
