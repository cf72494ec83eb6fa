"""The JSON shapes vLLM 0.32 answers with, key for key and in vLLM's key order: chat and
completions chunks and bodies, the three forms of usage, logprobs, embeddings, model cards.
Pure functions of their arguments, so tests can pin them.

vLLM serialises stream chunks with pydantic's `exclude_unset=True`, so which keys a chunk has
depends on which fields its code set: the chat role chunk has no `stop_reason` or `token_ids`
but always `prompt_token_ids` and `prompt_text`; token chunks have `token_ids` (null unless
`return_token_ids`); only a choice's finishing chunk has `stop_reason`; `system_fingerprint`
rides on the finishing chunk, or on the usage chunk when there is one. Non-streaming bodies
are dumped whole, so every field appears, null or not (the message's `tool_calls` only when
tools were called).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .protocol import Kind
from .text import Logprob

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Header:
    """Fields every chunk of one response shares, and the server's fingerprint."""

    kind: Kind
    id: str
    model: str
    created: int
    fingerprint: str

    def base(self, *, chunk: bool) -> Json:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


# --- usage ----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    """The usage of a non-streaming body (all of vLLM's `UsageInfo` fields)."""
    return {
        **final_usage(prompt_tokens, completion_tokens),
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def final_usage(prompt_tokens: int, completion_tokens: int) -> Json:
    """The usage chunk's usage (dumped without nulls)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def running_usage(kind: Kind, prompt_tokens: int, completion_tokens: int) -> Json:
    """`continuous_usage_stats` usage on a chunk: the chat server also sets the (null)
    `completion_tokens_details`, the completions server does not."""
    counts = final_usage(prompt_tokens, completion_tokens)
    return {**counts, "completion_tokens_details": None} if kind == "chat" else counts


# --- stream chunks --------------------------------------------------------------------------


def role_chunk(
    header: Header, index: int, prompt_ids: Sequence[int] | None, usage_: Json | None
) -> Json:
    """The first chat chunk of a choice: the assistant role with empty content."""
    choice = {
        "index": index,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    chunk = {**header.base(chunk=True), "choices": [choice]}
    if usage_ is not None:
        chunk["usage"] = usage_
    chunk |= {"prompt_token_ids": _list(prompt_ids), "prompt_text": None}
    return chunk


@dataclass(frozen=True, slots=True)
class Piece:
    """What one chunk of one choice carries."""

    index: int
    text: str
    logprobs: Json | None = None
    token_ids: Sequence[int] | None = None  # None: not asked for
    finish_reason: str | None = None
    prompt_token_ids: Sequence[int] | None = None  # completions: a choice's first chunk


def chat_chunk(header: Header, piece: Piece) -> Json:
    delta: Json = {"content": piece.text} if piece.finish_reason != "abort" else {}
    choice: Json = {"index": piece.index, "delta": delta, "logprobs": piece.logprobs}
    choice["finish_reason"] = piece.finish_reason
    if piece.finish_reason is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = _list(piece.token_ids)
    return {**header.base(chunk=True), "choices": [choice]}


def completion_chunk(header: Header, piece: Piece) -> Json:
    choice: Json = {"index": piece.index, "text": piece.text, "logprobs": piece.logprobs}
    choice |= {"finish_reason": piece.finish_reason, "stop_reason": None}
    choice |= {
        "prompt_token_ids": _list(piece.prompt_token_ids),
        "token_ids": _list(piece.token_ids),
    }
    return {**header.base(chunk=True), "choices": [choice]}


def usage_chunk(header: Header, usage_: Json) -> Json:
    """The last event before `[DONE]` when the client asked for usage."""
    chunk = {**header.base(chunk=True), "choices": [], "usage": usage_}
    chunk["system_fingerprint"] = header.fingerprint
    return chunk


# --- non-streaming bodies -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One choice of a non-streaming body."""

    index: int
    text: str
    finish_reason: str
    logprobs: Json | None = None
    token_ids: Sequence[int] | None = None
    prompt_logprobs: list[Json | None] | None = None
    prompt_token_ids: Sequence[int] | None = None


def chat_response(
    header: Header, answers: Sequence[Answer], usage_: Json, prompt_ids: Sequence[int] | None
) -> Json:
    choices = [_chat_choice(a) for a in answers]
    body = {**header.base(chunk=False), "choices": choices, **_body_middle(header, usage_)}
    body |= {"prompt_logprobs": None, "prompt_token_ids": _list(prompt_ids), "prompt_text": None}
    return body | _body_tail()


def completion_response(header: Header, answers: Sequence[Answer], usage_: Json) -> Json:
    choices = [_completion_choice(a) for a in answers]
    body = {**header.base(chunk=False), "choices": choices, **_body_middle(header, usage_)}
    return body | _body_tail()


def _chat_choice(answer: Answer) -> Json:
    message = {
        "role": "assistant",
        "content": answer.text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "reasoning": None,
    }
    choice = {"index": answer.index, "message": message, "logprobs": answer.logprobs}
    choice |= {"finish_reason": answer.finish_reason, "stop_reason": None}
    return choice | {"token_ids": _list(answer.token_ids), "routed_experts": None}


def _completion_choice(answer: Answer) -> Json:
    choice = {"index": answer.index, "text": answer.text, "logprobs": answer.logprobs}
    choice |= {"finish_reason": answer.finish_reason, "stop_reason": None}
    choice |= {"token_ids": _list(answer.token_ids), "prompt_logprobs": answer.prompt_logprobs}
    return choice | {"prompt_token_ids": _list(answer.prompt_token_ids), "routed_experts": None}


def _body_middle(header: Header, usage_: Json) -> Json:
    return {"service_tier": None, "system_fingerprint": header.fingerprint, "usage": usage_}


def _body_tail() -> Json:
    return {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _list(ids: Sequence[int] | None) -> list[int] | None:
    return None if ids is None else list(ids)


# --- logprobs -------------------------------------------------------------------------------


def chat_logprobs(tokens: Sequence[Logprob], top_logprobs: int) -> Json:
    """`{"content": [...]}`: each token with its bytes and its `top_logprobs` alternatives."""
    content = [
        {**_chat_entry(t.token, t.logprob or 0.0), "top_logprobs": _chat_top(t, top_logprobs)}
        for t in tokens
    ]
    return {"content": content}


def _chat_top(token: Logprob, count: int) -> list[Json]:
    return [_chat_entry(text, value) for text, value, _ in token.top[:count]]


def _chat_entry(token: str, logprob: float) -> Json:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def completion_logprobs(tokens: Sequence[Logprob], top: int, offset: int) -> Json:
    """The legacy completions form: parallel lists, `top` + 1 alternatives per token (the
    token itself and the `top` most likely others), offsets counted from `offset`."""
    offsets, position = [], offset
    for t in tokens:
        offsets.append(position)
        position += len(t.token)
    return {
        "text_offset": offsets,
        "token_logprobs": [t.logprob for t in tokens],
        "tokens": [t.token for t in tokens],
        "top_logprobs": [
            None if t.logprob is None else {text: v for text, v, _ in t.top[: top + 1]}
            for t in tokens
        ],
    }


def prompt_logprobs(tokens: Sequence[Logprob], top: int) -> list[Json | None]:
    """`prompt_logprobs` of a non-streaming echo with logprobs: per token, by token id."""
    return [
        None
        if t.logprob is None
        else {
            str(token_id): {"logprob": value, "rank": rank, "decoded_token": text}
            for rank, (text, value, token_id) in enumerate(t.top[: top + 1], start=1)
        }
        for t in tokens
    ]


# --- other endpoints ------------------------------------------------------------------------


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
            "permission": [_permission(created)],
        }
        for name in models
    ]
    return {"object": "list", "data": cards}


def _permission(created: int) -> Json:
    return {
        "id": f"modelperm-{uuid.uuid4().hex[:16]}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


def now() -> int:
    return int(time.time())
