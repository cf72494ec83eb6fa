"""Comparing what the gateway answers with what vLLM answers directly.

Two answers to the same greedy request differ in what no gateway controls: the response id
(vLLM builds it from the ``X-Request-Id`` the gateway sends), ``created``, and how many tokens
share a chunk (vLLM merges tokens when its API server falls behind, so chunk boundaries vary
from run to run even on one worker). ``normal_events`` removes exactly those: ids and times are
masked, and consecutive plain token chunks are merged into one, and into the finish chunk that
follows them (which can carry the last tokens too). Everything else (every key,
every value, the order of events, the role chunk, the finish chunk, the usage chunk, the
fingerprint) must be equal.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson

from tests.helpers import sse_data

_ID = re.compile(r"^(chatcmpl|cmpl|resp|embd|msg|modelperm)-.+$")
TIMEOUT = aiohttp.ClientTimeout(total=60)


def mask(value: Any) -> Any:
    """Ids and creation times masked, recursively."""
    if isinstance(value, dict):
        return {
            k: ("<t>" if k in ("created", "created_at") and isinstance(v, int) else mask(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, str) and _ID.match(value):
        return value.split("-", 1)[0] + "-<id>"
    return value


def _plain_token(event: dict[str, Any]) -> bool:
    """A chunk that only carries text of one choice: what vLLM may merge with its neighbour."""
    if set(event) - {"id", "object", "created", "model", "choices"}:
        return False
    choices = event.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return False
    choice = choices[0]
    if choice.get("finish_reason") is not None:
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return set(delta) == {"content"}
    return "text" in choice


def _merge_lists(a: Any, b: Any) -> Any:
    """Logprobs and token ids of merged chunks: lists concatenated, key by key."""
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _merge_lists(a[k], b[k]) for k in a}
    if a != b:
        raise ValueError("cannot merge")
    return a


def _merge(into: dict[str, Any], event: dict[str, Any], finish: bool = False) -> None:
    """``event``'s choice appended to ``into``'s; with ``finish``, its ending fields win."""
    a, b = into["choices"][0], event["choices"][0]
    # The finish chunk carries ``stop_reason``, which token chunks lack: ending keys are
    # taken from it, every other key must be on both.
    ending = {"finish_reason", "stop_reason"} if finish else set()
    if a.get("index") != b.get("index") or a.keys() - ending != b.keys() - ending:
        raise ValueError("different choices")
    merged = {
        k: b.get(k, a.get(k)) if k in ending else _merge_lists(a[k], b[k])
        for k in a.keys() | b.keys()
        if k not in ("delta", "text")
    }
    if "delta" in a:
        if set(a["delta"]) != {"content"} or set(b["delta"]) != {"content"}:
            raise ValueError("not text")
        merged["delta"] = {"content": a["delta"]["content"] + b["delta"]["content"]}
    else:
        merged["text"] = a["text"] + b["text"]
    a.update(merged)


def normal_events(raw: bytes, running_usage: bool = False) -> list[Any]:
    """The stream's events, masked, with runs of plain token chunks merged. With
    ``running_usage`` (``continuous_usage_stats``), every chunk with choices must carry usage,
    which is then removed (its counts follow the chunking)."""
    out: list[Any] = []
    for data in sse_data(raw):
        if data == "[DONE]":
            out.append(data)
            continue
        event = mask(orjson.loads(data))
        if running_usage and event.get("choices"):
            assert isinstance(event.pop("usage"), dict), event
        if out and isinstance(out[-1], dict) and _plain_token(out[-1]) and _plain_token(event):
            try:
                _merge(out[-1], event)
                continue
            except ValueError:
                pass
        if out and isinstance(out[-1], dict) and _plain_token(out[-1]) and _finishing(event):
            # vLLM behind on its stream puts the last tokens in the finishing chunk too.
            try:
                _merge(out[-1], event, finish=True)
                out[-1] = {**event, "choices": out[-1]["choices"]}
                continue
            except ValueError:
                pass
        out.append(event)
    return out


def _finishing(event: dict[str, Any]) -> bool:
    choices = event.get("choices")
    return (
        isinstance(choices, list)
        and len(choices) == 1
        and isinstance(choices[0], dict)
        and choices[0].get("finish_reason") is not None
    )


async def post(
    session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]
) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    async with session.post(url + path, json=body, timeout=TIMEOUT) as response:
        return response.status, await response.read(), response.headers


def text_of(raw: bytes) -> str:
    """The answer's text of a chat or completions stream (choice 0)."""
    parts = []
    for data in sse_data(raw):
        if data == "[DONE]":
            continue
        for choice in orjson.loads(data).get("choices") or ():
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or choice.get("text") or "")
    return "".join(parts)


def usage_of(raw: bytes) -> dict[str, int] | None:
    usage = None
    for data in sse_data(raw):
        if data != "[DONE]":
            usage = orjson.loads(data).get("usage") or usage
    return usage


def by_choice(raw: bytes) -> dict[Any, Any]:
    """An n > 1 stream, whose choices' chunks interleave as timing has it: per choice index,
    its whole text and every other key of its chunks (masked) in order, without repeats;
    events without choices (usage) under None."""
    out: dict[Any, Any] = {}
    for data in sse_data(raw):
        if data == "[DONE]":
            out.setdefault(None, []).append(data)
            continue
        event = mask(orjson.loads(data))
        choices = event.pop("choices", None) or []
        if not choices:
            out.setdefault(None, []).append(event)
        for choice in choices:
            entry = out.setdefault(choice["index"], {"text": "", "shapes": []})
            delta = choice.pop("delta", None)
            if delta is not None:
                entry["text"] += delta.pop("content", None) or ""
                choice["delta"] = delta
            else:
                entry["text"] += choice.pop("text", "")
            shape = {**event, **choice}
            if not entry["shapes"] or entry["shapes"][-1] != shape:
                entry["shapes"].append(shape)
    return out
