"""Reading a client's JSON body as vLLM reads it, and editing its top-level members in place.

vLLM parses bodies with Python's ``json`` module, which takes integers of any width, lone
surrogate escapes such as ``"\\ud800"``, ``NaN`` and ``Infinity``. ``orjson`` refuses the last
three, so ``loads`` tries it first (fast) and falls back to ``json`` on what it refuses: the
gateway must not answer 400 to a body its workers accept. An integer wider than 64 bits orjson
reads as a float: harmless where the gateway only reads a body (routing, limits), since its
edits are splices; resume's continuation, a new request built from the parsed body, would
carry such an integer as a float.

The gateway's few edits of a body (asking for usage or token ids, a fallback's model name, an
embeddings batch cut into shards) are splices: the bytes of one member's value are replaced (by
a new value, or by a run of its own array items), or one member is appended, and every other
byte stays as the client sent it. Nothing is re-serialised but the value being replaced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

# A JSON string (escapes skipped whole, so a quote or bracket inside one is never structure),
# or a structural character. Numbers, literals and whitespace need no token of their own.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # one string, its escapes included
_TOKEN = re.compile(JSON_STRING.pattern + rb"|[{}\[\],:]")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")


class BodyError(ValueError):
    """The body is not JSON that Python's parser (vLLM's) would accept."""


def loads(body: bytes) -> tuple[Any, bool]:
    """The parsed body and whether orjson read it (False: only Python's parser could)."""
    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body), False
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BodyError(str(exc)) from None


def dumps(value: Any) -> bytes:
    """A value as JSON: orjson where it can, Python's ``json`` for what only it can write."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, separators=(",", ":")).encode()


def member_span(body: bytes, name: str) -> tuple[int, int] | None:
    """Where the value of the top-level member ``name`` lies in ``body`` (start, end), or None
    when the object has no such member. With duplicate names, the last one (the one Python's
    parser keeps). ``body`` must be a JSON object that parses."""
    found: tuple[int, int] | None = None
    depth = 0
    key: bytes | None = None
    value_start = -1
    expect_key = False
    for match in _TOKEN.finditer(body):
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string
            if depth == 1 and expect_key:
                key, expect_key = token, False
            continue
        if depth == 1 and first == 0x3A:  # ":" after a key
            value_start = match.end()
            continue
        if depth == 1 and (first == 0x2C or first == 0x7D):  # "," or the object's "}"
            if key is not None and _names(key, name):
                found = _trimmed(body, value_start, match.start())
            key, expect_key = None, True
        if first in _OPEN:
            depth += 1
            if depth == 1:
                expect_key = True
        elif first in _CLOSE:
            depth -= 1
    return found


def replace_member(
    body: bytes, name: str, value: bytes, parsed: Mapping[str, Any] | None = None
) -> bytes:
    """``body`` with member ``name`` set to the JSON ``value``: its old value's bytes replaced
    when it has one, else the member appended before the closing brace. ``parsed``: ``body``
    parsed, when the caller has it: a member it lacks is appended without the scan of the
    whole body that finds a member's bytes (about 190 µs for a 23 KB chat body)."""
    span = None if parsed is not None and name not in parsed else member_span(body, name)
    if span is not None:
        return body[: span[0]] + value + body[span[1] :]
    end = body.rstrip().rfind(b"}")
    inner = body[body.find(b"{") + 1 : end].strip()
    comma = b"," if inner else b""
    return body[:end] + comma + orjson.dumps(name) + b":" + value + body[end:]


def item_spans(body: bytes, span: tuple[int, int]) -> list[tuple[int, int]] | None:
    """Where each item of the array at ``span`` lies in ``body``, or None when the value there
    is not an array."""
    start, end = span
    if body[start:end][:1] != b"[":
        return None
    items: list[tuple[int, int]] = []
    depth = 0
    item_start = start + 1
    for match in _TOKEN.finditer(body, start, end):
        first = match.group()[0]
        if first in _OPEN:
            depth += 1
        elif first in _CLOSE:
            depth -= 1
            if depth == 0:
                last = _trimmed(body, item_start, match.start())
                if last[0] < last[1]:  # not the empty array
                    items.append(last)
        elif first == 0x2C and depth == 1:  # "," between two items
            items.append(_trimmed(body, item_start, match.start()))
            item_start = match.end()
    return items


def slice_member(body: bytes, name: str, parts: list[slice]) -> list[bytes] | None:
    """``body`` once per slice, its array member ``name`` cut to that slice of its items: each
    item's bytes, and the bytes between them, as the client sent them. None when ``name`` is
    not an array member."""
    span = member_span(body, name)
    items = None if span is None else item_spans(body, span)
    if span is None or items is None:
        return None
    bodies = []
    for part in parts:
        chosen = items[part]
        value = b"[" + body[chosen[0][0] : chosen[-1][1]] + b"]" if chosen else b"[]"
        bodies.append(body[: span[0]] + value + body[span[1] :])
    return bodies


def _names(key: bytes, name: str) -> bool:
    if b"\\" not in key:
        return key[1:-1] == name.encode()
    try:
        return bool(json.loads(key) == name)
    except ValueError:
        return False


def _trimmed(body: bytes, start: int, end: int) -> tuple[int, int]:
    while start < end and body[start] in b" \t\r\n":
        start += 1
    while end > start and body[end - 1] in b" \t\r\n":
        end -= 1
    return start, end
