"""Embeddings fan-out: a large batch ``input`` split into contiguous shards, one per worker,
and the shards' answers put back together in order.

Pure: the proxy sends the shards (concurrently, each with its own retries) and hands the bodies
back here. A merged answer is only ever built from every shard: if one shard cannot be
served, the whole request fails; a partial result is never presented as success.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from gateway.errors import UpstreamBadResponse
from gateway.jsonsplice import loads, slice_member


def plan_shards(body: bytes, shard_size: int, workers: int) -> list[bytes] | None:
    """The shard bodies for this request, or None when it goes to one worker as it is.

    Shards are contiguous and even: never more than ``workers`` of them, never fewer inputs in
    one than needed to keep every shard within ``shard_size`` when the workers allow it. Each
    is the client's body with ``input`` cut to its slice (``jsonsplice.slice_member``): the
    other members and the inputs' own bytes go as the client sent them. ``body`` is an object
    that ``jsonsplice.loads`` reads (the request parser has checked).
    """
    if shard_size <= 0 or workers < 2:
        return None
    data, _ = loads(body)
    inputs = data.get("input")
    if not isinstance(inputs, list) or len(inputs) <= shard_size or not _is_batch(inputs):
        return None
    count = min(workers, math.ceil(len(inputs) / shard_size))
    size = math.ceil(len(inputs) / count)
    return slice_member(body, "input", [slice(i, i + size) for i in range(0, len(inputs), size)])


def _is_batch(inputs: list[Any]) -> bool:
    """A list of strings or of token-id lists; a flat list of ints is one tokenised input."""
    return all(isinstance(item, (str, list)) for item in inputs)


def merge(bodies: list[bytes]) -> bytes:
    """One embeddings answer from the shards' answers, in shard order: indexes renumbered
    across shards, usage summed. Raises ``UpstreamBadResponse`` for a body that is not an
    embeddings answer."""
    data: list[dict[str, Any]] = []
    usage: dict[str, int] = {}
    first: dict[str, Any] | None = None
    for body in bodies:
        answer = _answer(body)
        first = first or answer
        offset = len(data)
        for item in sorted(answer["data"], key=lambda item: int(item.get("index", 0))):
            data.append({**item, "index": offset + int(item.get("index", 0))})
        for key, value in (answer.get("usage") or {}).items():
            if isinstance(value, int):
                usage[key] = usage.get(key, 0) + value
    assert first is not None
    merged = {**first, "data": data}
    if usage:
        merged["usage"] = usage
    return orjson.dumps(merged)


def _answer(body: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamBadResponse() from None
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        raise UpstreamBadResponse()
    if not all(isinstance(item, dict) for item in answer["data"]):
        raise UpstreamBadResponse()
    return answer
