"""Token usage: asking workers for it, and reading it from responses cheaply.

Exact token counts come from the worker's own ``usage``. A stream carries it only when the
request says ``stream_options.include_usage``, so the gateway adds that to streams whose client
did not ask (and the relay drops the extra chunk again, see ``framing``). A JSON answer up to
``relay.CHECKED_BODY_LIMIT`` (8 MB) is parsed whole before the commit anyway (a broken answer
fails over), and its usage is read from that parse; only a larger one (embeddings), relayed as
it arrives, has its usage found by a search in its last bytes (``usage_from_tail``).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.jsonsplice import dumps, replace_member

# vLLM writes "usage" after "choices"/"data", so it lies within the last few hundred bytes.
TAIL_BYTES = 2048


def ask_for_usage(body: bytes, data: dict[str, Any]) -> bytes | None:
    """The body to send instead, with usage requested; None if the client asked for it itself
    (or sent ``stream_options`` that is not an object: the worker will judge that). ``data``
    is ``body`` parsed.

    A splice (``jsonsplice``): only the value of ``stream_options`` changes, or the member is
    appended when the client sent none; every other byte is the client's.

    Only for one choice: with n > 1 vLLM puts ``system_fingerprint`` on each choice's last
    event, and restoring them would hold back the other choices' tokens (see ``framing``).
    ``continuous_usage_stats`` counts only with ``include_usage`` (vLLM's
    ``should_include_usage``): a client that sent it alone gets no usage directly, so it is
    turned off here rather than put on every chunk."""
    options = data.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    if data.get("n") not in (None, 1):
        return None
    asked = {**options, "include_usage": True}
    if options.get("continuous_usage_stats"):
        asked["continuous_usage_stats"] = False
    return replace_member(body, "stream_options", dumps(asked), data)


def usage_from_tail(tail: bytes) -> dict[str, int] | None:
    """The last ``"usage": {...}`` object in the end of a JSON body, as integers."""
    key = tail.rfind(b'"usage"')
    if key < 0:
        return None
    start = tail.find(b"{", key)
    if start < 0:
        return None
    end = _matching_brace(tail, start)
    if end < 0:
        return None
    try:
        usage = orjson.loads(tail[start : end + 1])
    except orjson.JSONDecodeError:
        return None
    return int_fields(usage)


def int_fields(usage: object) -> dict[str, int] | None:
    """A usage object's integer counts; None when it is not an object."""
    if not isinstance(usage, dict):
        return None
    return {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}


def _matching_brace(data: bytes, start: int) -> int:
    depth = 0
    for index in range(start, len(data)):
        byte = data[index]
        if byte == 0x7B:  # {
            depth += 1
        elif byte == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return index
    return -1
