"""Affinity keys: what makes two requests want the same worker.

- ``session``: the client names its conversation (a header, else the OpenAI ``user`` field), so
  its turns land where the earlier turns' KV cache lives.
- ``prefix``: the first characters of the prompt (system prompt, few-shot examples, shared
  documents), so requests that share a long prefix meet vLLM's prefix cache on one worker.

The balancer hashes the key (consistent hashing with bounded load); None means no affinity
for this request, and the default policy picks.
"""

from __future__ import annotations

from typing import Any

# Separates messages in the prefix key, so ["ab", "c"] and ["a", "bc"] differ.
_SEP = "\x1e"


def session_key(data: dict[str, Any]) -> str | None:
    user = data.get("user")
    return user if isinstance(user, str) and user else None


def prefix_key(data: dict[str, Any], chars: int) -> str | None:
    """The first ``chars`` characters of the prompt as the worker will see it, in order."""
    parts: list[str] = []
    size = 0
    for piece in _prompt_pieces(data):
        parts.append(piece)
        size += len(piece)
        if size >= chars:
            break
    key = "".join(parts)[:chars]
    return key or None


def _prompt_pieces(data: dict[str, Any]) -> list[str]:
    messages = data.get("messages")
    if isinstance(messages, list):
        return [_message_text(m) for m in messages]
    for field in ("prompt", "input"):
        value = data.get(field)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            first = value[0]
            if isinstance(first, str):
                return [first]
            return [",".join(str(v) for v in value[:256])]
    return []


def _message_text(message: object) -> str:
    if not isinstance(message, dict):
        return _SEP
    role = message.get("role")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return f"{role}:{content if isinstance(content, str) else ''}{_SEP}"
