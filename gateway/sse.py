"""Sans-I/O observation of the Server-Sent Events streams the gateway relays.

This module owns two things and no I/O: ``SSEDecoder``, an incremental decoder that turns bytes
into events by the WHATWG rules, and ``StreamObserver``, which watches an OpenAI/vLLM completion
stream through it and records what happened (first token, ``[DONE]``, finish reason, in-band
error, usage, malformed events). The relay forwards upstream bytes to the client unchanged and
feeds the same bytes here on the side, so nothing in this module may alter or hold back the relay.
It also owns the one in-band error the gateway writes after it has committed a stream
(``encode_error_event``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from gateway.jsonsplice import JSON_STRING

__all__ = ["SSEDecoder", "SSEEvent", "StreamObserver", "encode_error_event"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_COLON = 0x3A


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event block.

    ``id`` is the decoder's last event ID at dispatch time (it persists across events, per spec).
    A block made only of comments is reported with ``comment_only=True`` and empty ``data`` so
    that the relay can tell a keep-alive from silence; other field-only blocks without ``data``
    are dropped, as the spec says.
    """

    data: str
    event: str | None
    comment_only: bool
    id: str | None = None


class SSEDecoder:
    """Incremental SSE event decoder (WHATWG rules).

    Lines end in CRLF, LF or CR, and a CR at the end of one chunk may be followed by the LF of
    its CRLF in the next. A blank line dispatches an event; ``data`` fields are joined by ``\\n``;
    lines starting with ``:`` are comments; ``event``, ``id`` and ``retry`` are parsed, other
    fields ignored; one space after the colon is stripped; one UTF-8 BOM at stream start is
    ignored. Chunks may split anywhere, including inside a multi-byte UTF-8 character: lines are
    split on bytes (CR and LF never occur inside a UTF-8 sequence) and decoded only when whole,
    with invalid UTF-8 replaced by U+FFFD as the spec's decoder does.
    """

    __slots__ = (
        "_bom_checked",
        "_buffer",
        "_comment",
        "_data",
        "_event",
        "_fields",
        "_has_partial",
        "_last_event_id",
        "_retry",
        "_skip_lf",
    )

    def __init__(self) -> None:
        self._buffer = bytearray()  # bytes of the line not yet terminated
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._bom_checked = False
        self._data: list[str] = []
        self._event: str | None = None
        self._comment = False  # the current block holds a comment line
        self._fields = False  # the current block holds a field line
        self._last_event_id: str | None = None
        self._retry: int | None = None
        self._has_partial = False

    @property
    def has_partial(self) -> bool:
        """True once ``flush`` has discarded an unterminated line or undispatched event."""
        return self._has_partial

    @property
    def last_event_id(self) -> str | None:
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The last valid ``retry`` field (reconnection time in milliseconds), if any."""
        return self._retry

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if b"\n" not in chunk and b"\r" not in chunk:
            self._buffer += chunk  # common case for split tokens: no line ends here yet
            return []
        if self._buffer:
            data = bytes(self._buffer) + chunk
            self._buffer.clear()
        else:
            data = chunk
        if not self._bom_checked:
            # The first split sees the stream from its first byte, BOM included if any.
            self._bom_checked = True
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        lines = data.splitlines()  # bytes.splitlines splits on CR, LF and CRLF only
        last = data[-1]
        if last == 0x0D:
            self._skip_lf = True
        elif last != _LF:
            self._buffer += lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            if line:
                self._field(line)
                continue
            event = self._dispatch()
            if event is not None:
                events.append(event)
        return events

    def at_boundary(self, chunk: bytes) -> bool:
        """Between events with nothing held, so the caller may split ``chunk`` into events
        itself (unless it starts the stream with a BOM, which ``feed`` strips)."""
        if not self._bom_checked:
            # The stream's first bytes, held or in ``chunk``, may hold a BOM: only ``feed``
            # sees them all, and it strips the BOM. (A chunk that is part of one counts too.)
            if self._buffer or chunk[:3] == _BOM[: len(chunk[:3])]:
                return False
            self._bom_checked = True
        return (
            not self._skip_lf
            and not self._buffer
            and not self._data
            and not self._comment
            and not self._fields
        )

    def flush(self) -> list[SSEEvent]:
        """End of stream: discard an unterminated event (never dispatched, per spec).

        Always returns an empty list; ``has_partial`` records whether anything was discarded.
        """
        if self._buffer or self._data or self._comment or self._fields:
            self._has_partial = True
        self._buffer.clear()
        self._reset_block()
        self._skip_lf = False
        return []

    def _field(self, line: bytes) -> None:
        if line[0] == _COLON:
            self._comment = True
            return
        self._fields = True
        if line.startswith(b"data:"):  # nearly every line of a completion stream
            raw = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(raw.decode("utf-8", "replace"))
            return
        name, _, value = line.decode("utf-8", "replace").partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self) -> SSEEvent | None:
        event: SSEEvent | None = None
        if self._data:
            event = SSEEvent("\n".join(self._data), self._event, False, self._last_event_id)
        elif self._comment and not self._fields:
            event = SSEEvent("", None, True, self._last_event_id)
        self._reset_block()
        return event

    def _reset_block(self) -> None:
        self._data = []
        self._event = None
        self._comment = False
        self._fields = False


class StreamObserver:
    """Feeds an ``SSEDecoder`` and tracks the state of an OpenAI/vLLM completion stream.

    Attributes are read-only for callers:

    - ``first_token``: a data event carrying content was seen: a choice with non-empty
      ``delta.content``, ``delta.reasoning``/``delta.reasoning_content``, ``delta.tool_calls`` or
      ``text``, or a non-null ``finish_reason``; also a usage-only chunk (no choices), an error
      event or ``[DONE]``, since they end the wait for a first token too. vLLM's role-only first
      chunk and keep-alive comments do not count, nor does a malformed event (see ``malformed``).
    - ``first_token_event_index``: 0-based index among data events of the one that set it.
    - ``done``: ``data: [DONE]`` was seen.
    - ``finish_reason``: the last non-null ``finish_reason`` of any choice.
    - ``error``: the body of an in-band error event as received, nested
      ``{"error": {...}}`` or vLLM's older flat ``{"object": "error", "message": ...}``.
    - ``malformed``: a data event was neither ``[DONE]`` nor a JSON object.
    - ``usage``: the integer fields of the last ``usage`` object seen.
    - ``events``: data events seen; ``keepalives``: comment-only blocks seen.
    """

    __slots__ = (
        "_decoder",
        "_ids",
        "_prefix",
        "_suffix",
        "done",
        "error",
        "events",
        "finish_reason",
        "finished",
        "first_token",
        "first_token_event_index",
        "ids_at",
        "keepalives",
        "malformed",
        "simple",
        "usage",
    )

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.first_token = False
        self.first_token_event_index: int | None = None
        self.done = False
        self.finish_reason: str | None = None
        self.error: dict[str, object] | None = None
        self.malformed = False
        self.usage: dict[str, int] | None = None
        self.events = 0
        self.keepalives = 0
        self.finished = False
        # A plain content event of this stream cut around its content string (``_learn``):
        # later events with the same bytes around one JSON string are plain too.
        self._prefix = b""
        self._suffix = b""
        self._ids = b""  # the bytes before a token's id, when the stream carries them
        # Where the token ids' list (``[`` to past ``]``) and the content string (its quotes
        # included) of the last event that ``feed`` said was plain lie in it, when the stream
        # carries ids: resume's scrub nulls the list there, its transcript keeps the two.
        self.ids_at = _NO_IDS
        # The template is vLLM's shape: one choice with its token ids; such an event tells a
        # transcript its text and id, nothing it had not read from the template's own event.
        self.simple = False

    @property
    def has_partial(self) -> bool:
        """The stream ended (``finish``) inside an event, which was therefore discarded."""
        return self._decoder.has_partial

    def feed(self, chunk: bytes) -> bool:
        """Observe ``chunk``; True when it was one plain token event after the first token,
        which only counted: nothing else about the stream changed."""
        prefix = self._prefix
        if prefix and chunk.startswith(prefix) and chunk.endswith(self._suffix):
            # The stream's own plain event around another content string (and, when the
            # worker sends them, its token ids). Everything else is bytes already judged
            # plain, so the string is all there is to check: one JSON string (two quotes, at
            # its ends, the last not escaped) on one line. About 0.3 µs against 1 µs for the
            # scans below, most of which run over bytes that never change within a stream.
            start = len(prefix)
            end = len(chunk) - len(self._suffix)
            ids = self._ids
            ids_at = _NO_IDS
            if ids:  # ``"token_ids":[`` and one token's id before the suffix's ``]``
                at = chunk.rfind(ids, start, end)
                if at < 0 or not chunk[at + len(ids) : end].isdigit():
                    end = start  # no match: the checks below fail
                else:
                    ids_at = (at + len(ids) - 1, end + 1, start, at)
                    end = at
            if (
                chunk.count(b'"', start, end) == 2
                and chunk[start] == 0x22
                and chunk[end - 1] == 0x22
                and chunk[end - 2] != 0x5C
                and chunk.find(b"\n", start, end) < 0
                and chunk.find(b"\r", start, end) < 0
                and self._decoder.at_boundary(chunk)
            ):
                self.events += 1
                self.ids_at = ids_at
                return True
        if (
            self.first_token
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n") == len(chunk) - 2  # one line: a memchr to its end, not a
            and chunk.startswith(b"data: ")  # count over a read of forty events
            and _UNEVENTFUL in chunk
            and not _eventful(chunk)
            and b"\r" not in chunk
            and self._decoder.at_boundary(chunk)
        ):
            # One plain token event, as vLLM sends them after the first: only counted. (The
            # same test as the path below, without its calls and copies: it runs per chunk.)
            self.events += 1
            self.ids_at = _NO_IDS
            if not prefix:
                self._learn(chunk[:-2])
            return True
        if not (_plain_events(chunk) and self._decoder.at_boundary(chunk)):
            for event in self._decoder.feed(chunk):
                self._on_event(event)
            return False
        # The hot path: whole single-line ``data:`` events ending in LF LF (how vLLM writes
        # them), split here instead of by the decoder. Event by event until the first token...
        start = 0
        while not self.first_token and start < len(chunk):
            stop = chunk.find(b"\n\n", start)
            if stop < 0:  # one LF left: a stray blank line after the last event (no event)
                for event in self._decoder.feed(chunk[start:]):
                    self._on_event(event)
                return False
            self._feed_block(chunk[start:stop])
            start = stop + 2
        if start < len(chunk):
            self._feed_after_first_token(chunk[start:] if start else chunk)
        return False

    def _feed_after_first_token(self, chunk: bytes) -> None:
        """...then a token chunk with no usage, no error and a null finish_reason tells nothing
        new, so its JSON is not decoded: events ahead of the first that may carry news are only
        counted, by C-speed scans of the whole run (a stream read in one chunk under load is
        split only there). The cost: a broken token event that says ``"finish_reason":null``,
        or one next to an n > 1 event with two such matches, is not reported as malformed."""
        if chunk.find(b"\n\n") == len(chunk) - 2:  # one event a chunk, as a worker under
            self._feed_block(chunk[:-2])  # light load sends (a find stops at the first end)
            return
        news = _news_start(chunk)
        tokens = _token_events(chunk[:news]) if news else 0
        if tokens:
            self.events += tokens
            if news == len(chunk):
                return
            chunk = chunk[news:]
        for block in chunk.split(b"\n\n")[:-1]:
            self._feed_block(block)

    def _feed_block(self, block: bytes) -> None:
        if not block.startswith(b"data: ") or b"\n" in block:
            for event in self._decoder.feed(block + b"\n\n"):
                self._on_event(event)
        elif self.first_token and _UNEVENTFUL in block and not _eventful(block):
            self.events += 1
            if not self._prefix:
                self._learn(block)
        else:
            self._on_data(block[6:].decode("utf-8", "replace"))

    def _learn(self, block: bytes) -> None:
        """Keep the bytes around the content string of ``block``, one plain token event (a
        single ``data:`` line, its blank line cut off), as the stream's template. Only a
        compact ``"delta":{"content":"...`` (or a completion's text, or reasoning: ``_MARKERS``)
        whose string is followed by ``}`` or ``,`` makes one: then bytes equal to it but for that
        string are the same JSON with another string value. Learnt once a stream: with n > 1
        each choice's events differ."""
        for marker in _MARKERS:
            at = block.find(marker)
            if at >= 0:
                break
        else:
            return
        start = at + len(marker) - 1  # the string's opening quote
        string = JSON_STRING.match(block, start)
        if string is None or block[string.end() : string.end() + 1] not in (b"}", b","):
            return
        prefix, rest = block[:start], block[string.end() :]
        if _IDS_KEY in prefix:
            return
        at = rest.find(_IDS)
        if at >= 0:  # the worker sends token ids (resume asked for them): they vary too
            close = rest.find(b"]", at)
            if (
                not rest[at + len(_IDS) : close].isdigit()
                or _IDS_KEY in rest[:at]
                or _IDS_KEY in rest[close:]
            ):
                return  # another id list among the fixed bytes: the scrub would miss it
            self._ids = rest[: at + len(_IDS)]
            rest = rest[close:]
            # vLLM's own shape: one choice, so the content string and the id are all that
            # accumulates. (What the fixed bytes say, a tool call or reasoning, was read from
            # this event, which a transcript reads whole.)
            self.simple = marker is _CONTENT and prefix.count(b'"delta"') == 1 and rest == b"]}]}"
        elif _IDS_KEY in rest:
            return
        self._prefix = prefix
        self._suffix = rest + b"\n\n"

    def finish(self) -> None:
        """Upstream EOF: an unterminated event is discarded, not observed."""
        self._decoder.flush()
        self.finished = True

    def _on_event(self, event: SSEEvent) -> None:
        if event.comment_only:
            self.keepalives += 1
            return
        self._on_data(event.data)

    def _on_data(self, data: str) -> None:
        index = self.events
        self.events += 1
        if data == "[DONE]":
            self._on_done(index)
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            if data.strip() == "[DONE]":
                self._on_done(index)
            else:
                self.malformed = True
            return
        if not isinstance(body, dict):
            self.malformed = True
            return
        if self._observe(body):
            self._mark_first_token(index)

    def _on_done(self, index: int) -> None:
        self.done = True
        self._mark_first_token(index)

    def _observe(self, body: dict[str, object]) -> bool:
        """Record what ``body`` tells; return whether it ends the wait for a first token."""
        if body.get("error") is not None or body.get("object") == "error":
            self.error = body
            return True
        usage = body.get("usage")
        if isinstance(usage, dict):
            self.usage = {k: v for k, v in usage.items() if type(v) is int}
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            return isinstance(usage, dict)
        found = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reason = reason
                found = True
            elif not found and not self.first_token:
                found = _carries_content(choice)
        return found

    def _mark_first_token(self, index: int) -> None:
        if not self.first_token:
            self.first_token = True
            self.first_token_event_index = index


_UNEVENTFUL = b'"finish_reason":null'
_CONTENT = b'"delta":{"content":"'
# Where a template is cut, in the order tried: chat's content, a completion's text, and a
# reasoning model's thinking (vLLM's "reasoning", older servers' "reasoning_content"), which
# may run for thousands of events before the content.
_MARKERS = (
    _CONTENT,
    b'"text":"',
    b'"delta":{"reasoning":"',
    b'"delta":{"reasoning_content":"',
)
_NO_IDS = (0, 0, 0, 0)
_IDS = b',"token_ids":['  # where vLLM puts a chat event's token ids, after finish_reason
_IDS_KEY = b'token_ids":['  # any list of token ids (resume.scrub_token_ids nulls them)
# Any of these in an event means it may carry news: usage, an error, a finish (of any choice).
_EVENTFUL = (b'"usage"', b'"error"', b'"finish_reason":"')
_NEWS_MARKERS = (*_EVENTFUL, b"[DONE]")


def _eventful(block: bytes) -> bool:
    # Spelled out: a generator over _EVENTFUL cost more than the three scans it runs.
    return b'"usage"' in block or b'"error"' in block or b'"finish_reason":"' in block


def _news_start(chunk: bytes) -> int:
    """Where the first event that may carry news (usage, an error, a finish, ``[DONE]``)
    starts in a chunk of whole events; ``len(chunk)`` when none may. (A ``find`` per marker,
    each bounded by the best so far: a regex alternation tries every offset of a 10 KB chunk.)
    """
    first = len(chunk)
    for marker in _NEWS_MARKERS:
        found = chunk.find(marker, 0, first)
        if found >= 0:
            first = found
    if first == len(chunk):
        return first
    end_before = chunk.rfind(b"\n\n", 0, first)
    return 0 if end_before < 0 else end_before + 2


def _token_events(events: bytes) -> int:
    """How many events ``events`` holds when each is one ``data:`` line holding
    ``"finish_reason":null``, else 0: whole events at once, by C-speed counts instead of a
    split. Every line break must belong to a ``\\n\\ndata: `` between two events or to the
    final blank line, so the events are single lines, one more than those separators. As many
    matches as events keeps a role-only or other odd event (no ``finish_reason``) from
    slipping through behind a match of its own. The caller has checked that none holds a news
    marker and that ``events`` ends with a blank line."""
    between = events.count(b"\n\ndata: ")
    if (
        events.startswith(b"data: ")
        and events.count(b"\n") == 2 * between + 2
        and events.count(_UNEVENTFUL) == between + 1
    ):
        return between + 1
    return 0


def _plain_events(chunk: bytes) -> bool:
    return chunk.endswith(b"\n\n") and b"\r" not in chunk


def _carries_content(choice: dict[str, object]) -> bool:
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return bool(
        delta.get("content")
        or delta.get("reasoning")
        or delta.get("reasoning_content")
        or delta.get("tool_calls")
    )


def encode_error_event(error_body: Mapping[str, object]) -> bytes:
    """The in-band error written after a stream is committed: one data event, then ``[DONE]``.

    ``error_body`` is already OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``.
    orjson escapes control characters, so the JSON always stays on one ``data:`` line.
    """
    return b"data: " + orjson.dumps(dict(error_body)) + b"\n\ndata: [DONE]\n\n"
