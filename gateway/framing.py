"""Event framing for relayed streams: forward whole SSE events only, optionally without the
usage chunk the gateway asked for on the client's behalf.

Bytes pass through unchanged, but an event split across reads is held back until its blank
line arrives. A client therefore never holds half an event when a stream is cut, so the one
in-band error event the gateway then writes parses cleanly, and a usage-only event can be
dropped whole. Sans-I/O: ``feed`` bytes in, get the bytes to forward; ``flush`` at the end.

Dropping the usage chunk must leave the stream as vLLM would have sent it without usage. vLLM
puts ``system_fingerprint`` on the last event only: on the usage chunk when usage was asked
for, else as the last key of the finishing event. So with ``strip_usage`` the event that
carries a ``finish_reason`` is held until the next event: when that is the usage chunk, its
fingerprint is written into the held event (before its closing brace, where vLLM puts it) and
the usage chunk is dropped. Only single-choice streams are stripped (``usage.ask_for_usage``),
so the held event is the last one with text and waits only for the chunk vLLM sends with it.
"""

from __future__ import annotations

import re

import orjson

# A blank line ends an event; SSE lines end in LF, CRLF or CR.
_EVENT_ENDS = ((b"\n\n", 2), (b"\r\n\r\n", 4), (b"\r\r", 2))
_SPLIT = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")
# vLLM's usage-only chunk (sent with stream_options.include_usage) has no choices.
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
_FINGERPRINT = b'"system_fingerprint"'


class EventFramer:
    def __init__(self, *, strip_usage: bool = False) -> None:
        self._strip_usage = strip_usage
        self._tail = b""
        self._held = b""  # the finishing event, waiting for the usage chunk's fingerprint

    @property
    def pending(self) -> int:
        """Bytes of an unfinished event held back."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> bytes:
        if not self._tail and chunk.endswith(b"\n\n"):
            # The usual case (vLLM writes one whole event per chunk): nothing to cut or hold.
            complete = chunk
        else:
            data = self._tail + chunk if self._tail else chunk
            end = _end_of_last_event(data)
            complete, self._tail = data[:end], data[end:]
        if not self._strip_usage:
            return complete
        if self._held:
            return self._strip(complete, 0)
        news = _first_news(complete)
        if news == len(complete):
            return complete  # no usage and no finish: nothing to strip or hold
        return self._strip(complete, news)

    @property
    def idle(self) -> bool:
        """Nothing held: a whole event with no usage and no finish goes out as it came."""
        return not self._tail and not self._held

    def flush(self) -> bytes:
        """The stream ended: a held event goes out as it was."""
        held, self._held = self._held, b""
        return held

    def _strip(self, complete: bytes, news: int) -> bytes:
        out: list[bytes] = []
        # With an event held, what follows is judged event by event: a blank event ahead of
        # the usage chunk must wait behind the held event, not release it.
        head, complete = (b"", complete) if self._held else _plain_head(complete, news)
        if head:
            out.append(head)
        for event in _events(complete):
            if self._held and not event.strip(b"\r\n"):
                self._held += event  # a stray blank line waits behind the held event
                continue
            if b'"usage"' in event and _NO_CHOICES.search(event):
                fingerprint = _fingerprint_of(event)
                if self._held:
                    out.append(_with_fingerprint(self._held, fingerprint))
                    self._held = b""
                # Stray blank lines ahead of it are not the event's: they go on, as they would
                # have had the read ended between them and it.
                out.append(event[: len(event) - len(event.lstrip(b"\r\n"))])
                continue
            if self._held:
                out.append(self._held)
                self._held = b""
            if _FINISHED.search(event) and _FINGERPRINT not in event:
                self._held = event
            else:
                out.append(event)
        return b"".join(out)


def _first_news(complete: bytes) -> int:
    """Where the first mention of usage or a finish (``"finish_reason"`` with a string, in
    JSON compact or not: token chunks say null) starts in ``complete``; its length when there
    is none. Two C-speed searches of the whole run: a match that spans two events only moves
    the cut (``_plain_head``) earlier."""
    first = complete.find(b'"usage"')
    if first < 0:
        first = len(complete)
    finished = _FINISHED.search(complete, 0, first)
    return first if finished is None else finished.start()


def _plain_head(complete: bytes, news: int) -> tuple[bytes, bytes]:
    """``complete`` cut after its last event ahead of ``news`` (``_first_news``), when its
    events end in LF LF (as vLLM writes them): those go out as they are, so a read of a whole
    answer is split into events only at its end. A separator preceded by one more LF
    (``_SPLIT`` would have cut one byte earlier) or any CR leaves the whole run to the
    event-by-event path."""
    if b"\r" in complete:
        return b"", complete
    cut = complete.rfind(b"\n\n", 0, news)
    if cut < 0 or complete[cut - 1 : cut] == b"\n":
        return b"", complete
    return complete[: cut + 2], complete[cut + 2 :]


def _events(complete: bytes) -> list[bytes]:
    parts = _SPLIT.split(complete)
    events = [event + sep for event, sep in zip(parts[0::2], parts[1::2], strict=False)]
    if parts[-1]:
        # Line breaks that ``_end_of_last_event`` counted into the last blank line (LF LF LF,
        # or LF CR LF after CR CR): forwarded as they came, not dropped.
        events.append(parts[-1])
    return events


def _fingerprint_of(event: bytes) -> bytes | None:
    """The ``system_fingerprint`` value of a usage chunk, as JSON; None without one."""
    if _FINGERPRINT not in event:
        return None
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                body = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return None
            value = body.get("system_fingerprint") if isinstance(body, dict) else None
            return orjson.dumps(value) if isinstance(value, str) else None
    return None


def _with_fingerprint(event: bytes, fingerprint: bytes | None) -> bytes:
    """``event`` with ``"system_fingerprint": …`` as its JSON object's last key."""
    if fingerprint is None:
        return event
    body_end = event.rstrip(b"\r\n").rfind(b"}")
    if body_end < 0:
        return event
    return event[:body_end] + b',"system_fingerprint":' + fingerprint + event[body_end:]


def _end_of_last_event(data: bytes) -> int:
    if b"\r" not in data:  # LF only, as vLLM writes: one scan from the end instead of three
        found = data.rfind(b"\n\n")
        return 0 if found < 0 else found + 2
    end = 0
    for marker, size in _EVENT_ENDS:
        found = data.rfind(marker)
        if found >= 0:
            end = max(end, found + size)
    return end
