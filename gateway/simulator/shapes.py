"""The JSON shapes vLLM answers with: chat and completions chunks and responses, usage,
embeddings, and model cards. Pure functions of their arguments, so tests can pin them."""

from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass
from typing import Any

from .protocol import Kind

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Header:
    """Fields every chunk of one response shares."""

    kind: Kind
    id: str
    model: str
    created: int

    def base(self, *, chunk: bool) -> Json:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def role_chunk(header: Header) -> Json:
    """The first chat chunk: the assistant role with empty content."""
    return _chat_chunk(header, {"role": "assistant", "content": ""}, None)


def token_chunk(header: Header, text: str, finish_reason: str | None) -> Json:
    if header.kind == "chat":
        return _chat_chunk(header, {"content": text}, finish_reason)
    choice = {"index": 0, "text": text, "logprobs": None}
    choice |= {"finish_reason": finish_reason, "stop_reason": None}
    return {**header.base(chunk=True), "choices": [choice]}


def _chat_chunk(header: Header, delta: Json, finish_reason: str | None) -> Json:
    choice = {"index": 0, "delta": delta, "logprobs": None}
    choice |= {"finish_reason": finish_reason, "stop_reason": None}
    return {**header.base(chunk=True), "choices": [choice]}


def usage_chunk(header: Header, usage_: Json) -> Json:
    return {**header.base(chunk=True), "choices": [], "usage": usage_}


def full_response(header: Header, text: str, finish_reason: str, usage_: Json) -> Json:
    """A non-streaming `chat.completion` or `text_completion`."""
    choice: Json = {"index": 0}
    if header.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
    else:
        choice["text"] = text
    choice |= {"logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
    return {**header.base(chunk=False), "choices": [choice], "usage": usage_}


def embeddings(model: str, vectors: list[list[float]], prompt_tokens: int, b64: bool) -> Json:
    data = [
        {"object": "embedding", "index": i, "embedding": _b64(v) if b64 else v}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32 values."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def model_list(models: tuple[str, ...], max_model_len: int, created: int) -> Json:
    cards: list[Json] = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [],
        }
        for name in models
    ]
    return {"object": "list", "data": cards}


def now() -> int:
    return int(time.time())
