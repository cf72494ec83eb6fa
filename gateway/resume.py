"""Resuming a chat stream on another worker mid-answer, token for token.

A resumable stream is sent with vLLM's ``return_token_ids``: the role chunk then carries the
prompt's token ids (after the chat template) and every chunk the ids of the tokens it carries,
however many share a chunk (``--stream-interval``, or an API server that falls behind). The
client does not see them unless it asked (``scrub_token_ids``). After a cut, the continuation
is a ``/v1/completions`` request whose prompt is those prompt ids followed by the ids already
sent: the next worker starts from exactly the state the first one was in, so greedy decoding
goes on as if nothing happened. Re-sending the answer as text (``continue_final_message``)
would not: the text re-tokenises differently and the template may render a final assistant
message differently from a generation prompt.

The pieces, all pure; the proxy decides when and sends the request:
- ``resumable_request``: whether a request may be resumed at all (a chat stream, one choice,
  nothing whose state a continuation cannot carry over: tools, logprobs, structured output).
- ``ask_for_token_ids``: the body to send instead, with ``return_token_ids``.
- ``Transcript``: what the client has been sent so far (fed the events actually written, so
  it is exact): the stream's ``id``/``created``/``model``, the prompt's and the answer's token
  ids, and whether a tool call or reasoning makes a continuation unfaithful.
- ``Splice``: turns the continuation's completions stream into more chunks of the original chat
  stream (same ``id``, ``created`` and ``model``, vLLM's chat chunk layout), with usage that
  counts the prompt once and every generated token once, and ``system_fingerprint`` where vLLM
  puts it (the usage chunk, or the finishing chunk when the client did not ask for usage).
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterable
from typing import Any, TypeGuard

import orjson

from gateway.jsonsplice import replace_member
from gateway.sse import SSEDecoder

DONE = b"data: [DONE]\n\n"
CONTINUATION_PATH = "/v1/completions"
_TOKEN_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
# Chat-only fields, or fields whose effect a continuation must not repeat; everything else
# (sampling, stop conditions, penalties, priority, salts) goes to the continuation as sent.
_NOT_CONTINUED = frozenset(
    (
        "messages", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
        "chat_template", "chat_template_kwargs", "add_generation_prompt", "documents",
        "continue_final_message", "echo", "stream_options", "max_completion_tokens",
        "logprobs", "top_logprobs", "n", "response_format", "reasoning_effort",
        "include_reasoning", "mm_processor_kwargs", "return_token_ids", "prompt",
    )
)  # fmt: skip
# Fields that constrain output with a grammar: its state at the cut cannot be carried over.
_STRUCTURED = ("response_format", "structured_outputs", "guided_json", "guided_regex",
               "guided_choice", "guided_grammar")  # fmt: skip
_IDS_KEY = b'token_ids":['
_IDS_ALLOWED = b"0123456789, \t\n\r\x0b\x0c"  # a list of integers: digits, commas, whitespace


def resumable_request(data: dict[str, Any]) -> bool:
    """A chat stream with one choice and nothing a continuation cannot reproduce."""
    if data.get("n") not in (None, 1) or data.get("logprobs") or data.get("top_logprobs"):
        return False
    if data.get("tools") or data.get("functions"):
        return False
    if any(data.get(name) for name in _STRUCTURED):
        return False
    return isinstance(data.get("messages"), list)


def ask_for_token_ids(body: bytes, data: dict[str, Any]) -> bytes | None:
    """The body with ``return_token_ids``; None when the client asked for them itself.
    ``data``: the client's body parsed (``body`` may have had usage asked for since)."""
    if data.get("return_token_ids") is True:
        return None
    return replace_member(body, "return_token_ids", b"true", data)


def scrub_token_ids(events: bytes) -> bytes:
    """Events as the client would have had them without ``return_token_ids``: every
    ``"token_ids":[...]`` and ``"prompt_token_ids":[...]`` holding integers made ``null``.

    It runs on every event of a resumable stream, so it finds the key with ``bytes.find``
    instead of a regular expression, which cost three times as much; tests/test_resume.py
    checks both agree on random inputs."""
    at = events.find(_IDS_KEY)
    if at < 0:
        return events
    out = []
    done = 0  # events[:done] is in out
    while at >= 0:
        end = events.find(b"]", at + len(_IDS_KEY))
        if end < 0:
            break
        quoted = (events[at - 8 : at] == b'"prompt_' and at - 8 >= done) or (
            events[at - 1 : at] == b'"' and at - 1 >= done
        )
        if quoted and not events[at + len(_IDS_KEY) : end].translate(None, _IDS_ALLOWED):
            out.append(events[done:at])
            out.append(b'token_ids":null')
            done = end + 1
            at = events.find(_IDS_KEY, done)
        else:
            at = events.find(_IDS_KEY, at + 1)
    out.append(events[done:])
    return b"".join(out)


def worker_fault(error: dict[str, object]) -> bool:
    """An in-band error event the worker is to blame for (not the request's fault)."""
    inner = error.get("error")
    body = inner if isinstance(inner, dict) else error
    code = body.get("code")
    if isinstance(code, int):
        return code >= 500
    return body.get("type") not in ("invalid_request_error", "BadRequestError")


# Bytes of events a transcript keeps unread before reading them (see ``Transcript.feed``).
UNREAD_LIMIT = 32 * 1024
# A token's text kept as a str of its own costs about 55 bytes: the texts read are joined into
# one str per this many tokens.
TEXT_RUN = 256
# What a run of unread token events costs besides its bytes (the object, its two bytearrays):
# tokens between keep-alive comments start a run each.
RUN_OVERHEAD = 200
# A token id has at most this many digits (int64); a longer one is no model's token.
ID_DIGITS = 19


class _Tokens:
    """A run of unread token events (``Transcript.token``): their texts, each one JSON string,
    and their ids, each followed by a comma after an opening bracket: two JSON arrays once the
    last comma is made a closing bracket, read in one call each. Counted against
    ``UNREAD_LIMIT`` as its bytes and ``RUN_OVERHEAD``."""

    __slots__ = ("ids", "texts")

    def __init__(self) -> None:
        self.texts = bytearray(b"[")
        self.ids = bytearray(b"[")


class Transcript:
    """The stream as the client has seen it: fed the exact events written to the client,
    before their token ids are scrubbed."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        # Events not read yet: reading costs about 3 us an event and is needed only when a
        # stream breaks, so they are read then, or in batches past UNREAD_LIMIT bytes.
        # Plain token events of vLLM's shape (``token``) are kept as their texts (JSON
        # strings) and token ids, a run of them in two flat buffers (``_Tokens``), in order
        # among the other events.
        self._unread: list[bytes | _Tokens] = []
        self._unread_size = 0
        self._run: _Tokens | None = None  # the last of ``_unread``, while tokens come
        self._header: dict[str, Any] = {}  # id, created, model of the original stream
        # Token ids as 8-byte integers (a list holds 36 bytes an id): a long prompt's and a
        # long answer's ids are most of what a resumable stream keeps.
        self._prompt_ids: array[int] | None = None
        self._ids: array[int] = array("q")  # the answer's tokens sent so far
        self._runs: list[str] = []  # the answer's text sent so far: runs of TEXT_RUN texts,
        self._text: list[str] = []  # then the texts since
        # After ``roll_back``: what the continuation writes again that the client already has.
        self.repeated_text = ""
        self.repeated_ids = 0
        self._ids_complete = True  # every chunk with text said which tokens it carried
        self._reasoning = False
        self._tool_calls = False
        self._finished = False

    @property
    def header(self) -> dict[str, Any]:
        self._catch_up()
        return self._header

    @property
    def prompt_ids(self) -> list[int] | None:
        self._catch_up()
        return None if self._prompt_ids is None else self._prompt_ids.tolist()

    @property
    def ids(self) -> list[int]:
        self._catch_up()
        return self._ids.tolist()

    @property
    def text(self) -> str:
        """The answer's text sent so far."""
        self._catch_up()
        return "".join(self._runs) + "".join(self._text)

    @property
    def finished(self) -> bool:
        self._catch_up()
        return self._finished

    @property
    def tool_calls(self) -> bool:
        self._catch_up()
        return self._tool_calls

    @property
    def reasoning(self) -> bool:
        self._catch_up()
        return self._reasoning

    @property
    def ids_complete(self) -> bool:
        self._catch_up()
        return self._ids_complete

    @property
    def tokens(self) -> int:
        self._catch_up()
        return len(self._ids)

    @property
    def resumable(self) -> bool:
        # Mid-reasoning or mid-tool-call, a continuation cannot be made faithful; without the
        # token ids (a worker that ignores return_token_ids) it cannot be made exact.
        self._catch_up()
        return (
            bool(self._header)
            and self._prompt_ids is not None
            and self._ids_complete
            and not (self._reasoning or self._tool_calls or self._finished)
        )

    def roll_back(self, keep: int, kept_text: str) -> bool:
        """Resume after the first ``keep`` answer tokens, whose text is ``kept_text`` (the
        client has it all, and more: the text of the tokens after them it was sent). False,
        and nothing changed, when the text sent does not start with ``kept_text``."""
        sent = self.text
        if not sent.startswith(kept_text) or not 0 <= keep <= len(self._ids):
            return False
        self.repeated_text = sent[len(kept_text) :]
        self.repeated_ids = len(self._ids) - keep
        del self._ids[keep:]
        return True

    def feed(self, data: bytes) -> None:
        """Whole events, as written to the client: kept, and read when needed."""
        self._unread.append(data)
        self._unread_size += len(data)
        self._run = None
        if self._unread_size > UNREAD_LIMIT:
            self._catch_up()

    def token(self, event: bytes, at: tuple[int, int, int, int]) -> None:
        """One plain token event of vLLM's shape (``StreamObserver.simple``), which tells
        nothing but its text and its token id: ``at`` is where its id list and its content
        string lie (``StreamObserver.ids_at``). Only those two are kept: reading them later
        costs a tenth of reading the event, and a long stream catches up less often. (What
        its other bytes say, the header among it, was read from the event the observer learnt
        them from, which came whole before it.)"""
        ids_open, ids_close, start, end = at
        run = self._run
        if run is None:
            run = self._run = _Tokens()
            self._unread.append(run)
            self._unread_size += RUN_OVERHEAD
        run.texts += event[start:end]
        run.texts.append(0x2C)  # a comma
        run.ids += event[ids_open + 1 : ids_close - 1]
        run.ids.append(0x2C)
        self._unread_size += end - start + ids_close - ids_open
        if self._unread_size > UNREAD_LIMIT:
            self._catch_up()

    def _catch_up(self) -> None:
        if not self._unread:
            return
        unread = self._unread
        self._unread, self._unread_size, self._run = [], 0, None
        events: list[bytes] = []
        for item in unread:
            if isinstance(item, bytes):
                events.append(item)
                continue
            if events:
                self._read_events(events[0] if len(events) == 1 else b"".join(events))
                events = []
            self._read_tokens(item)
        if events:
            self._read_events(events[0] if len(events) == 1 else b"".join(events))

    def _read_tokens(self, run: _Tokens) -> None:
        """A run of kept token events, each read as a whole event would be: one that does not
        read (invalid UTF-8, a bad escape) is dropped, id and all."""
        run.texts[-1] = run.ids[-1] = 0x5D  # the last comma becomes the arrays' "]"
        texts: list[Any]
        ids: list[Any]
        try:
            # One JSON string a text and digits an id: when both read, one item a token each.
            texts, ids = orjson.loads(run.texts), orjson.loads(run.ids)
        except orjson.JSONDecodeError:
            # A text that does not read as it is, or an id with leading zeros: one token at a
            # time. A text has exactly two quotes, at its ends, so scanning from the
            # left the first quote after a cut is always a text's closing one: '","' splits
            # at the separators, even where a text is '","' itself.
            texts, tokens = [], []
            pieces = bytes(run.texts[2:-2]).split(b'","')
            for piece, token in zip(pieces, bytes(run.ids[1:-1]).split(b","), strict=True):
                content = _loads(b'"%b"' % piece)
                if content is not _UNREADABLE:
                    texts.append(content)
                    tokens.append(token)
            ids = [int(t) if len(t) <= ID_DIGITS else -1 for t in tokens]
        self._add_ids(ids)
        self._add_texts([text for text in texts if isinstance(text, str) and text])

    def _add_ids(self, ids: Iterable[Any]) -> None:
        """Ids as the worker sent them; one that is no int64 (past 64 bits orjson gives a
        float, and a negative is no token) leaves the answer's ids incomplete: no resume."""
        try:
            more = array("q", ids)  # array checks each: an int, within 64 bits
        except (OverflowError, TypeError):
            self._ids_complete = False
            return
        if more and min(more) < 0:
            self._ids_complete = False
            return
        self._ids.extend(more)

    def _add_texts(self, texts: list[str]) -> None:
        self._text += texts
        if len(self._text) >= TEXT_RUN:
            self._runs.append("".join(self._text))
            self._text = []

    def _read_events(self, data: bytes) -> None:
        """vLLM's events are ``data: {...}`` and a blank line: read straight from the bytes,
        which halves the cost per event; any other shape goes through the SSE decoder."""
        parts = data.split(b"\n\n")
        if parts[-1] or not self._decoder.at_boundary(data):
            self._decode(data)
            return
        del parts[-1]
        for part in parts:
            if not part.startswith(b"data: ") or b"\n" in part or b"\r" in part:
                self._decode(data)  # nothing of it read yet: the decoder reads it all
                return
        for part in parts:
            payload = part[6:]
            if payload != b"[DONE]":
                self._read(payload)

    def _decode(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if not event.comment_only and event.data != "[DONE]":
                self._read(event.data)

    def _read(self, payload: bytes | str) -> None:
        body = _loads(payload)
        if isinstance(body, dict):
            self._observe(body)

    def _observe(self, body: dict[str, Any]) -> None:
        if not self._header and isinstance(body.get("id"), str):
            self._header = {k: body[k] for k in ("id", "object", "created", "model") if k in body}
        prompt = body.get("prompt_token_ids")
        if self._prompt_ids is None and _is_ids(prompt):
            with contextlib.suppress(OverflowError):  # no model has such a token: no resume
                self._prompt_ids = array("q", prompt)
        for choice in body.get("choices") or ():
            if isinstance(choice, dict):
                self._observe_choice(choice)

    def _observe_choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason") is not None:
            self._finished = True
        ids = choice.get("token_ids")
        if _is_ids(ids):
            self._add_ids(ids)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if delta.get("tool_calls"):
            self._tool_calls = True
        if delta.get("reasoning") or delta.get("reasoning_content"):
            self._reasoning = True
        content = delta.get("content")
        if content and isinstance(content, str):
            self._add_texts([content])
            if not _is_ids(ids):
                self._ids_complete = False

    def continuation(self, original: bytes) -> bytes:
        """The completions request that makes another worker write the rest of the answer."""
        self._catch_up()
        assert self._prompt_ids is not None
        data = orjson.loads(original)
        asked = next((data[n] for n in _TOKEN_LIMIT_FIELDS if isinstance(data.get(n), int)), None)
        out = {k: v for k, v in data.items() if k not in _NOT_CONTINUED}
        out["prompt"] = (self._prompt_ids + self._ids).tolist()
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
        out["return_token_ids"] = True
        if asked is not None and not isinstance(asked, bool):
            out["max_tokens"] = max(asked - self.tokens, 1)
        else:
            # vLLM's default is what is left of the context: the same for the continuation.
            out.pop("max_tokens", None)
        least = data.get("min_tokens")
        if isinstance(least, int) and not isinstance(least, bool):
            out["min_tokens"] = max(least - self.tokens, 0)
        return orjson.dumps(out)


class Splice:
    """Rewrites one continuation stream (completions chunks) into chunks of the original chat
    stream. The finishing chunk is held until the usage chunk, which brings the fingerprint."""

    def __init__(self, transcript: Transcript, client_wants_usage: bool) -> None:
        self._decoder = SSEDecoder()
        self._header = {**transcript.header, "object": "chat.completion.chunk"}
        self._prompt = len(transcript.prompt_ids or ())
        self._before = transcript.tokens
        self._repeated_text = transcript.repeated_text
        self._repeated_ids = transcript.repeated_ids
        transcript.repeated_text, transcript.repeated_ids = "", 0  # this splice's to drop
        self._wants_usage = client_wants_usage
        self._held: dict[str, Any] | None = None
        self.first_token = False
        self.finish_reason: str | None = None
        self.done = False
        self.usage: dict[str, int] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send to the client for this chunk of the continuation."""
        out: list[bytes] = []
        for event in self._decoder.feed(chunk):
            if event.comment_only or self.done:
                continue
            if event.data.strip() == "[DONE]":
                self.done = True
                out.append(self._release(None))
                out.append(DONE)
                continue
            body = orjson.loads(event.data)  # the caller has checked the event is JSON
            if isinstance(body, dict):
                out.append(self._rewrite(body))
        return b"".join(out)

    def flush(self) -> bytes:
        """The continuation ended without its usage chunk or [DONE]: the held chunk, as is."""
        return self._release(None)

    def combined_usage(self, usage: dict[str, Any]) -> dict[str, int]:
        """The prompt once, as the client's stream counted it; every generated token once."""
        completion = int(usage.get("completion_tokens", 0)) + self._before
        return {"prompt_tokens": self._prompt, "total_tokens": self._prompt + completion,
                "completion_tokens": completion}  # fmt: skip

    def _rewrite(self, body: dict[str, Any]) -> bytes:
        if body.get("error") is not None:
            self.first_token = True
            return self._release(None) + _event(body)  # the continuation failed in-band
        usage = body.get("usage")
        if isinstance(usage, dict):
            self.usage = self.combined_usage(usage)
        choices = body.get("choices")
        if not choices:
            fingerprint = body.get("system_fingerprint")
            if self.usage is None or not self._wants_usage:
                return self._release(fingerprint)
            usage_chunk = {**self._header, "choices": [], "usage": self.usage}
            if fingerprint is not None:
                usage_chunk["system_fingerprint"] = fingerprint
            return self._release(None) + _event(usage_chunk)
        out = []
        for choice in choices:
            if isinstance(choice, dict):
                chat = self._chat_choice(choice)
                if chat is not None:
                    out.append(self._emit({**self._header, "choices": [chat]}))
        return b"".join(out)

    def _chat_choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        text = self._new_text(choice.get("text") or "")
        ids = self._new_ids(choice.get("token_ids"))
        reason = choice.get("finish_reason")
        if not text and reason is None:
            return None
        self.first_token = True
        chat: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None,
                                "finish_reason": reason}  # fmt: skip
        if reason is not None:
            self.finish_reason = reason
            chat["stop_reason"] = choice.get("stop_reason")
        chat["token_ids"] = ids
        return chat

    def _new_text(self, text: str) -> str:
        """``text`` less what the client already has (after a roll back, see cutpoint.py)."""
        repeated = self._repeated_text
        if not repeated:
            return text
        if text.startswith(repeated):
            self._repeated_text = ""
            return text[len(repeated) :]
        if repeated.startswith(text):
            self._repeated_text = repeated[len(text) :]
            return ""
        self._repeated_text = ""  # the continuation went another way: pass it as it came
        return text

    def _new_ids(self, ids: Any) -> Any:
        if not self._repeated_ids or not _is_ids(ids):
            return ids
        drop = min(self._repeated_ids, len(ids))
        self._repeated_ids -= drop
        return ids[drop:]

    def _emit(self, chunk: dict[str, Any]) -> bytes:
        out = self._release(None)
        if chunk["choices"][0]["finish_reason"] is not None:
            self._held = chunk
            return out
        return out + _event(chunk)

    def _release(self, fingerprint: object) -> bytes:
        held, self._held = self._held, None
        if held is None:
            return b""
        if isinstance(fingerprint, str):
            held["system_fingerprint"] = fingerprint
        return _event(held)


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _is_ids(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(v) is int for v in value)


_UNREADABLE = object()


def _loads(payload: bytes | str) -> object:
    """``payload`` as JSON, read as the SSE decoder would have read it (invalid UTF-8
    replaced, not refused); ``_UNREADABLE`` when it still does not read."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        if isinstance(payload, bytes):
            try:
                return orjson.loads(payload.decode("utf-8", "replace"))
            except orjson.JSONDecodeError:
                pass
        return _UNREADABLE
