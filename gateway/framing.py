"""Event framing for relayed streams: forward whole SSE events only, optionally without the
usage chunk the gateway asked for on the client's behalf.

Bytes pass through unchanged, but an event split across reads is held back until its blank
line arrives. A client therefore never holds half an event when a stream is cut, so the one
in-band error event the gateway then writes parses cleanly, and a usage-only event can be
dropped whole. Sans-I/O: ``feed`` bytes in, get the bytes to forward.
"""

from __future__ import annotations

import re

# A blank line ends an event; SSE lines end in LF, CRLF or CR.
_EVENT_ENDS = ((b"\n\n", 2), (b"\r\n\r\n", 4), (b"\r\r", 2))
_SPLIT = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")
# vLLM's usage-only chunk (sent with stream_options.include_usage) has no choices.
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class EventFramer:
    def __init__(self, *, strip_usage: bool = False) -> None:
        self._strip_usage = strip_usage
        self._tail = b""

    @property
    def pending(self) -> int:
        """Bytes of an unfinished event held back."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> bytes:
        if not self._tail and chunk.endswith(b"\n\n"):
            # The usual case (vLLM writes one whole event per chunk): nothing to cut or hold.
            if self._strip_usage and b'"usage"' in chunk:
                return _without_usage_events(chunk)
            return chunk
        data = self._tail + chunk if self._tail else chunk
        end = _end_of_last_event(data)
        complete, self._tail = data[:end], data[end:]
        if self._strip_usage and b'"usage"' in complete:
            return _without_usage_events(complete)
        return complete


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


def _without_usage_events(complete: bytes) -> bytes:
    # Only events from the first "usage" on can be usage events: leave the rest unscanned
    # (a stream read in one chunk under load would otherwise be split event by event).
    start = _end_of_last_event(complete[: complete.find(b'"usage"')])
    return complete[:start] + _strip_usage_events(complete[start:])


def _strip_usage_events(complete: bytes) -> bytes:
    parts = _SPLIT.split(complete)
    kept = []
    for event, separator in zip(parts[0::2], parts[1::2], strict=False):
        if b'"usage"' in event and _NO_CHOICES.search(event):
            continue
        kept.append(event + separator)
    return b"".join(kept)
