"""Tests for gateway.sse: the SSE decoder at every chunk boundary, and the stream observer."""

from __future__ import annotations

import random
from types import MappingProxyType

import orjson
import pytest

from gateway.resume import scrub_token_ids
from gateway.sse import SSEDecoder, SSEEvent, StreamObserver, encode_error_event

ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


def chat_chunk(delta: dict[str, object], finish_reason: str | None = None) -> dict[str, object]:
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion.chunk",
        "created": 1763790000,
        "model": "Qwen/Qwen3-8B",
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        ],
    }


def completion_chunk(text: str, finish_reason: str | None = None) -> dict[str, object]:
    return {
        "id": "cmpl-abc123",
        "object": "text_completion",
        "created": 1763790000,
        "model": "Qwen/Qwen3-8B",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
USAGE_CHUNK = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion.chunk",
    "created": 1763790000,
    "model": "Qwen/Qwen3-8B",
    "choices": [],
    "usage": USAGE,
}


def sse(*items: object, eol: bytes = b"\n") -> bytes:
    """Encode items as vLLM does: dicts as JSON data events, str as raw data, bytes verbatim."""
    out = []
    for item in items:
        if isinstance(item, bytes):
            out.append(item.replace(b"\n", eol))
        elif isinstance(item, str):
            out.append(b"data: " + item.encode() + eol + eol)
        else:
            out.append(b"data: " + orjson.dumps(item) + eol + eol)
    return b"".join(out)


def vllm_stream(eol: bytes = b"\n") -> bytes:
    return sse(
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "h\u00e9llo"}),
        b": keep-alive\n\n",
        chat_chunk({"content": " \u65e5\u672c"}),
        chat_chunk({"content": "!"}),
        chat_chunk({"content": ""}, finish_reason="stop"),
        USAGE_CHUNK,
        "[DONE]",
        eol=eol,
    )


def decode(pieces: list[bytes]) -> tuple[list[SSEEvent], bool]:
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.feed(piece)]
    events += decoder.flush()
    return events, decoder.has_partial


def observe(pieces: list[bytes]) -> StreamObserver:
    observer = StreamObserver()
    for piece in pieces:
        observer.feed(piece)
    observer.finish()
    return observer


def state(observer: StreamObserver) -> tuple[object, ...]:
    return (
        observer.first_token,
        observer.first_token_event_index,
        observer.done,
        observer.finish_reason,
        observer.error,
        observer.malformed,
        observer.usage,
        observer.events,
        observer.keepalives,
        observer.has_partial,
        observer.finished,
    )


def every_split(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(len(data) + 1)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- decoder: a whole realistic stream ------------------------------------------------------------


@pytest.mark.parametrize("eol", ENDINGS.values(), ids=ENDINGS.keys())
def test_vllm_stream_decodes_to_expected_events(eol: bytes) -> None:
    events, partial = decode([vllm_stream(eol)])

    assert partial is False
    assert len(events) == 8
    assert [e.comment_only for e in events] == [False, False, True] + [False] * 5
    assert events[2] == SSEEvent(data="", event=None, comment_only=True)
    assert orjson.loads(events[1].data)["choices"][0]["delta"] == {"content": "h\u00e9llo"}
    assert orjson.loads(events[3].data)["choices"][0]["delta"] == {"content": " \u65e5\u672c"}
    assert orjson.loads(events[6].data)["usage"] == USAGE
    assert events[7] == SSEEvent(data="[DONE]", event=None, comment_only=False)


@pytest.mark.parametrize("eol", ENDINGS.values(), ids=ENDINGS.keys())
def test_vllm_stream_observer_state(eol: bytes) -> None:
    observer = observe([vllm_stream(eol)])

    assert state(observer) == (
        True,  # first_token
        1,  # first_token_event_index: the role chunk (index 0) does not count
        True,  # done
        "stop",  # finish_reason
        None,  # error
        False,  # malformed
        USAGE,  # usage
        7,  # events (data events only)
        1,  # keepalives
        False,  # has_partial
        True,  # finished
    )


@pytest.mark.parametrize("eol", ENDINGS.values(), ids=ENDINGS.keys())
def test_every_two_piece_split_matches_whole(eol: bytes) -> None:
    stream = vllm_stream(eol)
    whole_events = decode([stream])
    whole_state = state(observe([stream]))
    for pieces in every_split(stream):
        assert decode(pieces) == whole_events, pieces
        assert state(observe(pieces)) == whole_state, pieces


@pytest.mark.parametrize("eol", ENDINGS.values(), ids=ENDINGS.keys())
def test_one_byte_at_a_time_matches_whole(eol: bytes) -> None:
    stream = vllm_stream(eol)
    assert decode(bytewise(stream)) == decode([stream])
    assert state(observe(bytewise(stream))) == state(observe([stream]))


def test_line_endings_give_identical_events() -> None:
    lf, crlf, cr = (decode([vllm_stream(eol)]) for eol in ENDINGS.values())
    assert lf == crlf == cr
    assert len(lf[0]) == 8


def test_mixed_line_endings_in_one_stream() -> None:
    events, _ = decode([b"data: a\r\ndata: b\rdata: c\n\r\n: ka\r\rdata: d\n\n"])
    assert events == [
        SSEEvent("a\nb\nc", None, False),
        SSEEvent("", None, True),
        SSEEvent("d", None, False),
    ]


# -- decoder: CR at a chunk boundary --------------------------------------------------------------


def test_cr_at_end_of_chunk_then_lf_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # the LF of the CRLF, not a blank line
    assert decoder.feed(b"\r") == [SSEEvent("a", None, False)]
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [SSEEvent("b", None, False)]


def test_cr_at_end_of_chunk_then_cr_is_a_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [SSEEvent("a", None, False)]


def test_cr_then_lf_lf_dispatches_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\n") == [SSEEvent("a", None, False)]


def test_empty_chunks_between_cr_and_lf_keep_the_pair() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\n\n") == [SSEEvent("a\nb", None, False)]


def test_only_one_lf_is_skipped_after_cr() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\r")
    decoder.feed(b"\n")
    # A second LF is a real blank line.
    assert decoder.feed(b"\n") == [SSEEvent("a", None, False)]


# -- decoder: UTF-8 -------------------------------------------------------------------------------


def test_multibyte_utf8_split_everywhere() -> None:
    text = "h\u00e9llo \u65e5\u672c \U0001f600"
    stream = b"data: " + text.encode() + b"\n\n"
    for pieces in [*every_split(stream), bytewise(stream)]:
        assert decode(pieces) == ([SSEEvent(text, None, False)], False), pieces


def test_invalid_utf8_is_replaced() -> None:
    events, _ = decode([b"data: a\xffb\n\n", b"event: e\xff\ndata:\xfe\n\n"])
    assert events == [SSEEvent("a\ufffdb", None, False), SSEEvent("\ufffd", "e\ufffd", False)]


def test_non_newline_separators_do_not_split_lines() -> None:
    # Vertical tab, form feed, file separator and U+2028 are line breaks for str.splitlines.
    text = "a\x0bb\x0cc\x1cd\u2028e\x85f"
    events, _ = decode([b"data: " + text.encode() + b"\n\n"])
    assert events == [SSEEvent(text, None, False)]


def test_bom_at_stream_start_is_ignored() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    for pieces in [*every_split(stream), bytewise(stream)]:
        assert decode(pieces) == ([SSEEvent("x", None, False)], False), pieces


def test_only_one_bom_is_stripped() -> None:
    # The second BOM becomes part of the field name "\ufeffdata", an unknown field.
    events, _ = decode([b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n"])
    assert events == [SSEEvent("y", None, False)]


def test_bom_later_in_stream_is_data() -> None:
    events, _ = decode([b"data: a\n\n\xef\xbb\xbfdata: b\n\ndata: \xef\xbb\xbfc\n\n"])
    assert events == [SSEEvent("a", None, False), SSEEvent("\ufeffc", None, False)]


# -- decoder: fields ------------------------------------------------------------------------------


def test_comment_only_blocks_are_exposed() -> None:
    events, _ = decode([b": keep-alive\n\n:\n\n: a\n: b\n\n"])
    assert events == [SSEEvent("", None, True)] * 3


def test_comment_with_data_is_a_normal_event() -> None:
    events, _ = decode([b": note\ndata: x\n\n"])
    assert events == [SSEEvent("x", None, False)]


def test_blocks_without_data_are_not_dispatched() -> None:
    events, _ = decode([b"event: ping\n\n: ka\nevent: ping\n\nid: 1\n\n\n\n\n"])
    assert events == []


def test_multiline_data_is_joined_with_lf() -> None:
    events, _ = decode([b"data: a\ndata:b\ndata:  c\ndata\ndata:\n\n"])
    assert events == [SSEEvent("a\nb\n c\n\n", None, False)]


def test_empty_data_field_dispatches_an_empty_event() -> None:
    assert decode([b"data\n\n"])[0] == [SSEEvent("", None, False)]
    assert decode([b"data:\n\n"])[0] == [SSEEvent("", None, False)]


def test_event_id_and_retry_fields() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(
        b"event: add\nid: 7\nretry: 1500\ndata: x\n\n"
        b"data: y\n\n"  # event type resets; last event ID persists
        b"id: 8\x00\nretry: 15x\nretry:\nfoo: bar\ndata: z\n\n"  # NUL id, bad retry ignored
        b"id\ndata: w\n\n"  # an empty id resets it
    )
    assert events == [
        SSEEvent("x", "add", False, "7"),
        SSEEvent("y", None, False, "7"),
        SSEEvent("z", None, False, "7"),
        SSEEvent("w", None, False, ""),
    ]
    assert decoder.retry == 1500
    assert decoder.last_event_id == ""


def test_only_one_space_after_colon_is_stripped() -> None:
    events, _ = decode([b"event:  two\ndata:\tx\ndata:  y \n\n"])
    assert events == [SSEEvent("\tx\n y ", " two", False)]


def test_unterminated_event_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [SSEEvent("a", None, False)]
    assert decoder.has_partial is False
    assert decoder.flush() == []
    assert decoder.has_partial is True


def test_unterminated_line_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a") == []
    assert decoder.flush() == []
    assert decoder.has_partial is True


def test_unterminated_comment_counts_as_partial() -> None:
    assert decode([b"data: a\n\n: keep"]) == ([SSEEvent("a", None, False)], True)


def test_clean_end_has_no_partial() -> None:
    assert decode([b"data: a\n\n"]) == ([SSEEvent("a", None, False)], False)
    assert decode([b"data: a\r"])[1] is True
    assert decode([b"data: a\r\r"]) == ([SSEEvent("a", None, False)], False)
    assert decode([b""]) == ([], False)


# -- observer -------------------------------------------------------------------------------------


def test_role_only_chunk_is_not_a_first_token() -> None:
    observer = StreamObserver()
    observer.feed(sse(chat_chunk({"role": "assistant", "content": ""}), b": keep-alive\n\n"))
    assert observer.first_token is False
    assert observer.first_token_event_index is None
    assert observer.events == 1
    assert observer.keepalives == 1
    observer.feed(sse(chat_chunk({"content": "Hi"})))
    assert observer.first_token is True
    assert observer.first_token_event_index == 1


def test_continuous_usage_on_role_chunk_is_not_a_first_token() -> None:
    role = chat_chunk({"role": "assistant", "content": ""})
    role["usage"] = {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}
    observer = observe([sse(role)])
    assert observer.first_token is False
    assert observer.usage == {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}


def test_usage_keeps_only_integer_fields_and_the_last_one_wins() -> None:
    first = dict(USAGE_CHUNK, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    last = dict(
        USAGE_CHUNK,
        usage={**USAGE, "prompt_tokens_details": {"cached_tokens": 8}, "flag": True},
    )
    observer = observe([sse(first, last)])
    assert observer.usage == USAGE


def test_usage_only_chunk_is_a_first_token() -> None:
    observer = observe([sse(chat_chunk({"role": "assistant"}), USAGE_CHUNK)])
    assert (observer.first_token, observer.first_token_event_index) == (True, 1)
    assert observer.usage == USAGE


def test_empty_choices_without_usage_is_not_a_first_token() -> None:
    observer = observe([sse(dict(USAGE_CHUNK, usage=None))])
    assert observer.first_token is False
    assert observer.usage is None


def test_done_alone_ends_the_wait() -> None:
    observer = observe([sse("[DONE]")])
    assert (observer.first_token, observer.first_token_event_index) == (True, 0)
    assert observer.done is True
    assert observer.finish_reason is None


def test_done_with_surrounding_whitespace() -> None:
    observer = observe([b"data:  [DONE] \n\n"])
    assert (observer.done, observer.malformed, observer.events) == (True, False, 1)


@pytest.mark.parametrize(
    "delta",
    [
        {"reasoning": "Let me think"},
        {"reasoning_content": "Let me think"},
        {"content": None, "reasoning": "x"},
        {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]},
    ],
)
def test_reasoning_and_tool_call_deltas_are_first_tokens(delta: dict[str, object]) -> None:
    observer = observe([sse(chat_chunk({"role": "assistant", "content": ""}), chat_chunk(delta))])
    assert (observer.first_token, observer.first_token_event_index) == (True, 1)


@pytest.mark.parametrize(
    "delta", [{}, {"content": ""}, {"reasoning": ""}, {"tool_calls": []}, {"content": None}]
)
def test_empty_deltas_are_not_first_tokens(delta: dict[str, object]) -> None:
    assert observe([sse(chat_chunk(delta))]).first_token is False


def test_finish_reason_alone_is_a_first_token() -> None:
    observer = observe([sse(chat_chunk({"content": ""}, finish_reason="length"))])
    assert (observer.first_token, observer.finish_reason) == (True, "length")


def test_completions_text_chunks() -> None:
    stream = sse(
        completion_chunk(""),
        completion_chunk("Once"),
        completion_chunk(" upon"),
        completion_chunk("", finish_reason="length"),
        "[DONE]",
    )
    observer = observe([stream])
    assert state(observer) == (True, 1, True, "length", None, False, None, 5, 0, False, True)


def test_last_non_null_finish_reason_of_any_choice_wins() -> None:
    two = chat_chunk({"content": "a"})
    two["choices"] = [
        {"index": 0, "delta": {}, "finish_reason": "stop"},
        {"index": 1, "delta": {"content": "b"}, "finish_reason": None},
    ]
    later = chat_chunk({}, finish_reason="length")
    later["choices"][0]["index"] = 1  # type: ignore[index]
    observer = StreamObserver()
    observer.feed(sse(two))
    assert observer.finish_reason == "stop"
    observer.feed(sse(later, chat_chunk({"content": "c"})))
    assert observer.finish_reason == "length"


ERROR_NESTED = {
    "error": {
        "message": "Engine core died",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
}
ERROR_FLAT = {
    "object": "error",
    "message": "Engine core died",
    "type": "InternalServerError",
    "param": None,
    "code": 500,
}


@pytest.mark.parametrize("body", [ERROR_NESTED, ERROR_FLAT], ids=["nested", "flat"])
def test_error_event_after_tokens(body: dict[str, object]) -> None:
    stream = sse(
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Hel"}),
        body,
        "[DONE]",
    )
    for pieces in [[stream], bytewise(stream)]:
        observer = observe(pieces)
        assert state(observer) == (True, 1, True, None, body, False, None, 4, 0, False, True)


@pytest.mark.parametrize("body", [ERROR_NESTED, ERROR_FLAT], ids=["nested", "flat"])
def test_error_event_before_any_token_ends_the_wait(body: dict[str, object]) -> None:
    observer = StreamObserver()
    observer.feed(sse(chat_chunk({"role": "assistant", "content": ""}), body))
    assert (observer.first_token, observer.first_token_event_index) == (True, 1)
    assert observer.error == body
    assert observer.done is False


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"text"', "42", "null", "", "DONE"])
def test_malformed_events(data: str) -> None:
    observer = observe([sse(data)])
    assert (observer.malformed, observer.first_token, observer.events) == (True, False, 1)
    assert observer.error is None


def test_malformed_is_sticky_and_later_events_still_count() -> None:
    observer = observe([sse("{oops", chat_chunk({"content": "x"}), "[DONE]")])
    assert state(observer) == (True, 1, True, None, None, True, None, 3, 0, False, True)


def test_truncated_stream_observer() -> None:
    stream = sse(chat_chunk({"content": "a"})) + b'data: {"id":"chatcmpl-abc123","obj'
    observer = observe([stream])
    assert state(observer) == (True, 0, False, None, None, False, None, 1, 0, True, True)


def test_done_with_crlf_split_inside_the_terminator() -> None:
    observer = StreamObserver()
    observer.feed(b"data: [DONE]\r")
    assert observer.done is False
    observer.feed(b"\n\r")
    assert observer.done is True
    observer.feed(b"\n")
    observer.finish()
    assert (observer.events, observer.has_partial) == (1, False)


# -- encode_error_event ---------------------------------------------------------------------------


def test_encode_error_event_bytes() -> None:
    assert encode_error_event(ERROR_NESTED) == (
        b'data: {"error":{"message":"Engine core died","type":"InternalServerError",'
        b'"param":null,"code":500}}\n\ndata: [DONE]\n\n'
    )


def test_encode_error_event_round_trips() -> None:
    body = {
        "error": {
            "message": "upstream reset\nline two \u65e5\u672c",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_reset",
        }
    }
    encoded = encode_error_event(MappingProxyType(body))
    events, partial = decode(bytewise(encoded))
    assert partial is False
    assert [e.data for e in events[1:]] == ["[DONE]"]
    assert orjson.loads(events[0].data) == body

    observer = observe([encoded])
    assert state(observer) == (True, 0, True, None, body, False, None, 2, 0, False, True)


# --- the observer's hot path: whole events after the first token ------------------------------


def _chunk(delta: dict[str, object], *finishes: str | None) -> bytes:
    choices = [{"index": i, "delta": delta, "finish_reason": f} for i, f in enumerate(finishes)]
    return b"data: " + orjson.dumps({"id": "c", "choices": choices}) + b"\n\n"


def test_hot_path_sees_finish_usage_error_and_done_in_one_big_chunk() -> None:
    observer = StreamObserver()
    observer.feed(
        _chunk({"role": "assistant", "content": ""}, None) + _chunk({"content": "a"}, None)
    )
    assert observer.first_token
    body = b"".join(_chunk({"content": f" {i}"}, None) for i in range(50))
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":51}}\n\n'
    observer.feed(body + _chunk({"content": "!"}, "length") + usage + b"data: [DONE]\n\n")
    assert observer.events == 2 + 50 + 1 + 1 + 1
    assert observer.finish_reason == "length"
    assert observer.usage == {"prompt_tokens": 3, "completion_tokens": 51}
    assert observer.done and not observer.malformed


def test_hot_path_sees_one_choice_finishing_next_to_another_still_going() -> None:
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None, None))
    observer.feed(_chunk({"content": "b"}, None, "stop"))
    assert observer.finish_reason == "stop"


def test_hot_path_still_reports_malformed_and_error_events() -> None:
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None))
    observer.feed(_chunk({"content": "b"}, None) + b"data: {not json\n\n")
    assert observer.malformed
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None))
    error = b'data: {"error":{"message":"boom","type":"x","code":500}}\n\n'
    observer.feed(_chunk({"content": "b"}, None) + error)
    assert observer.error is not None


def test_hot_path_hands_comments_and_multi_line_events_to_the_decoder() -> None:
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None))
    observer.feed(
        b": keep-alive\n\n" + b'data: {"id":"c",\ndata: "choices":[]}\n\n' + b"data: [DONE]\n\n"
    )
    assert observer.keepalives == 1
    assert observer.events == 3 and observer.done and not observer.malformed


def test_hot_path_counts_the_events_ahead_of_the_news_and_still_sees_a_broken_one() -> None:
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None))
    tokens = b"".join(_chunk({"content": f" {i}"}, None) for i in range(10))
    observer.feed(tokens + _chunk({"content": "!"}, "stop"))
    assert (observer.events, observer.finish_reason, observer.malformed) == (12, "stop", False)
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None))
    observer.feed(tokens + b"data: {not json\n\n" + _chunk({"content": "!"}, "stop"))
    assert observer.malformed and observer.finish_reason == "stop"
    observer = StreamObserver()
    observer.feed(_chunk({"content": "a"}, None))
    observer.feed(tokens + b'data: {"id":"c","choices":[{"index":0,"delta":{}}]}\n\n')
    assert observer.events == 12 and not observer.malformed


def test_a_read_ending_in_a_stray_blank_line_is_no_event() -> None:
    """An LF after an event's blank line, at the end of a read: an empty line, not an error."""
    observer = StreamObserver()
    observer.feed(b": keep-alive\n\n\n")
    observer.feed(_chunk({"content": "a"}, None) + b"\n")
    observer.feed(_chunk({"content": "b"}, None))
    assert (observer.keepalives, observer.events, observer.first_token) == (1, 2, True)


# Events a stream may hold. The malformed ones do not say "finish_reason":null, and no event
# has two choices still going: the hot path does not promise to report a broken event in those
# (StreamObserver._feed_after_first_token).
_POOL = (
    _chunk({"role": "assistant", "content": ""}, None),
    _chunk({"content": "a"}, None),
    _chunk({"content": "b"}, None),
    _chunk({}, "stop"),
    _chunk({"content": "d"}, None, "length"),
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"e"}}]}\n\n',  # no finish key
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"u"},"finish_reason":null}],'
    b'"usage":{"prompt_tokens":1}}\n\n',
    b'data: {"error":{"message":"boom","type":"x","code":500}}\n\n',
    b'data: {"id":"c",\ndata: "choices":[{"delta":{"content":"m"},"finish_reason":null}]}\n\n',
    b": keep-alive\n\n",
    b"data: {not json\n\n",
    b"data: [1, 2]\n\n",
    b"\n",  # a stray blank line: no event
    b"data: [DONE]\n\n",
)


@pytest.mark.timeout(60)
def test_whole_reads_and_single_bytes_observe_the_same_on_random_streams() -> None:
    """The counting hot paths (a read of many events at once) against the decoder (a byte at a
    time, where no read is a whole event): the same state on 3,000 random streams, a fifth of
    them opening with a BOM."""
    rng = random.Random(7)
    for _ in range(3000):
        events = rng.choices(_POOL[:-1], k=rng.randint(1, 40))
        stream = b"".join(events) + (_POOL[-1] if rng.random() < 0.7 else b"")
        stream = (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + stream  # a BOM opens it
        cut = rng.randint(0, len(stream))
        whole = observe([stream[:cut], stream[cut:]] if rng.random() < 0.5 else [stream])
        assert state(whole) == state(observe(bytewise(stream))), stream


@pytest.mark.timeout(60)
def test_feed_says_true_only_when_nothing_but_the_count_changed() -> None:
    """The relay skips its checks and the framer when ``feed`` says True: on random streams
    read an event at a time, a True leaves every other field as it was, and a plain token
    after the first one does get a True."""
    rng = random.Random(5)
    trues = 0
    for _ in range(1000):
        observer = StreamObserver()
        for event in rng.choices(_POOL, k=rng.randint(1, 30)):
            before = state(observer)
            plain = observer.feed(event)
            after = state(observer)
            if plain:
                trues += 1
                assert after[:7] + after[8:] == before[:7] + before[8:]
                assert after[7] == before[7] + 1  # events
            elif event == _POOL[1] and before[0]:
                pytest.fail("a plain token event after the first token was not said to be plain")
    assert trues > 1000


# Content strings that stress a stream's template (``StreamObserver._learn``): quotes and
# backslashes (escaped by the JSON encoder), the markers the scans look for, an escaped line
# break, and the bytes that end a string value.
_TRICKY = ['"', "\\", "\n", "\r", "usage", '"usage"', "error", '"finish_reason":"', "}", ",", "é"]


def _tricky_event(rng: random.Random, key: str = "content") -> bytes:
    """An event of a chat stream whose tokens come in delta's ``key``."""
    text = "".join(rng.choice([*_TRICKY, "a", " b"]) for _ in range(rng.randint(0, 5)))
    roll = rng.random()
    if roll < 0.6:
        return sse(chat_chunk({key: text}))
    if roll < 0.7:  # two choices, the first finishing: the template's bytes around other ones
        body = chat_chunk({key: text})
        choices = body["choices"]
        assert isinstance(choices, list)
        body["choices"] = [{**choices[0], "finish_reason": "stop"}, {**choices[0], "index": 1}]
        return sse(body)
    if roll < 0.75:
        return sse(chat_chunk({key: text}, finish_reason="length"))
    if roll < 0.8:
        return sse({**chat_chunk({key: text}), "usage": {"prompt_tokens": 2}})
    if roll < 0.85:
        return sse(chat_chunk({key: text, "role": "assistant"}))
    if roll < 0.88:
        return sse({"error": {"message": text, "type": "x", "code": 500}})
    if roll < 0.9:  # a raw line break in the string: no longer one line, a broken event
        event = sse(chat_chunk({key: "ab"}))
        return event.replace(b'"ab"', b'"a' + rng.choice([b"\n", b"\r"]) + b'b"')
    if roll < 0.95:
        return b": keep-alive\n\n"
    return sse(chat_chunk({"reasoning_content": text}))


def _completion(text: str, finish: str | None = None, **top: object) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
              "stop_reason": None}  # fmt: skip
    body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", **top}
    return sse({**body, "choices": [choice]})


def _tricky_completion(rng: random.Random) -> bytes:
    """A completions stream's event: mostly text, the rest as ``_tricky_event``'s."""
    text = "".join(rng.choice([*_TRICKY, "a", " b"]) for _ in range(rng.randint(0, 5)))
    roll = rng.random()
    if roll < 0.7:
        return _completion(text)
    if roll < 0.75:  # two choices, the first finishing: the template's bytes around other ones
        body = orjson.loads(_completion(text)[6:])
        first = {**body["choices"][0], "finish_reason": "stop"}
        body["choices"] = [first, {**body["choices"][0], "index": 1}]
        return sse(body)
    if roll < 0.8:
        return _completion(text, "length")
    if roll < 0.85:
        return _completion(text, usage={"prompt_tokens": 2})
    if roll < 0.9:
        return _completion("ab").replace(b'"ab"', b'"a' + rng.choice([b"\n", b"\r"]) + b'b"')
    if roll < 0.95:
        return sse({"error": {"message": text, "type": "x", "code": 500}})
    return b": keep-alive\n\n"


@pytest.mark.timeout(60)
def test_a_completion_streams_template_judges_each_event_as_the_decoder_does() -> None:
    """The same on completions streams, whose template is cut around ``"text"``."""
    rng = random.Random(12)
    learnt = 0
    for _ in range(2000):
        events = [_completion("")] + [_tricky_completion(rng) for _ in range(rng.randint(1, 30))]
        observer = observe(events)
        learnt += bool(observer._prefix)
        assert state(observer) == state(observe(bytewise(b"".join(events)))), events
    assert learnt > 1000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["content", "reasoning", "reasoning_content"])
def test_a_streams_template_judges_each_event_as_the_decoder_does(key: str) -> None:
    """Read an event at a time, a stream learns its plain event's bytes around the content
    string and counts later events matching them without its scans. On 2,000 random streams
    of tricky content (quotes, backslashes, markers inside the string, line breaks) and
    events that match the template's ends but not its shape (two choices, one finishing, a
    raw line break in the string), the state is the decoder's, a byte at a time."""
    rng = random.Random(11)
    learnt = 0
    for _ in range(2000):
        events = [sse(chat_chunk({"role": "assistant", "content": ""}))]
        events += [_tricky_event(rng, key) for _ in range(rng.randint(1, 30))]
        stream = b"".join(events)
        observer = observe(events)
        learnt += bool(observer._prefix)
        assert state(observer) == state(observe(bytewise(stream))), stream
    assert learnt > 1000  # the template was in use on most streams


def _with_ids(rng: random.Random, event: bytes, where: int) -> bytes:
    """``event`` as vLLM sends it when asked for token ids: ``"token_ids":[...]`` after each
    choice's finish_reason; now and then two ids, spaces or what is no id list, which only
    the scans judge. ``where`` puts prompt ids on every event too: 1 after the choices, 2
    before them, 3 in the choice before its token ids (their list is scrubbed as well)."""
    ids = rng.choice([b"[7]", b"[123456]", b"[1,2]", b"[ 3 ]", b"[]", b"[1.5]", b'["t"]'])
    event = event.replace(b'"finish_reason":null', b'"finish_reason":null,"token_ids":' + ids)
    if where == 1:
        return event.replace(b"}]}\n\n", b'}],"prompt_token_ids":[1,2]}\n\n')
    if where == 2:
        return event.replace(b'"choices":[', b'"prompt_token_ids":[1],"choices":[')
    if where == 3:  # another id list between the string and the token ids
        return event.replace(b',"token_ids":', b',"prompt_token_ids":[1,2],"token_ids":')
    return event


@pytest.mark.timeout(60)
def test_a_template_with_token_ids_judges_and_scrubs_as_the_scans_do() -> None:
    """With token ids on every event (resume asks for them), the template also skips the one
    id between its ends. On 2,000 random streams the state is the decoder's, a byte at a time,
    and where ``feed`` gives the id list's place, nulling it there is what
    ``scrub_token_ids`` does to the event."""
    rng = random.Random(13)
    placed = 0
    for _ in range(2000):
        where = rng.choice([0, 0, 0, 1, 2, 3])
        first = _with_ids(rng, sse(chat_chunk({"role": "assistant", "content": ""})), where)
        events = [first]
        events += [_with_ids(rng, _tricky_event(rng), where) for _ in range(rng.randint(1, 30))]
        observer = StreamObserver()
        for event in events:
            if observer.feed(event) and observer.ids_at[1]:
                start, end = observer.ids_at[:2]
                assert event[:start] + b"null" + event[end:] == scrub_token_ids(event), event
                placed += 1
        observer.finish()
        assert state(observer) == state(observe(bytewise(b"".join(events)))), events
    assert placed > 500  # the template placed the ids in a good share of the events
