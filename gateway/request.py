"""What the gateway reads from a request before routing it: the OpenAI routes it forwards,
``parse_request`` (model, stream, affinity key, resumability; the body stays untouched but for
the usage request of a stream), and the one rewrite a fallback model needs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.affinity import prefix_key, session_key
from gateway.errors import InvalidField, InvalidJSON, InvalidRequest
from gateway.resume import resumable_request
from gateway.settings import InputLimitSettings, RoutingSettings
from gateway.usage import ask_for_usage


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # metric label
    path: str  # path on the worker
    can_stream: bool


CHAT = Route("chat_completions", "/v1/chat/completions", can_stream=True)
COMPLETIONS = Route("completions", "/v1/completions", can_stream=True)
EMBEDDINGS = Route("embeddings", "/v1/embeddings", can_stream=False)


@dataclass(frozen=True, slots=True)
class RequestMeta:
    model: str
    stream: bool
    body: bytes  # what to send to the worker
    strip_usage: bool = False  # usage was asked for by the gateway, not the client
    single_choice: bool = True
    affinity_key: str | None = None  # from the body; a session header takes precedence
    resumable: bool = False  # a chat stream a continuation could finish (see resume.py)
    # Tokens the request may cost, for token rate limits until its usage is known: the body's
    # bytes / 4 (no tokenizer on the request path) plus the completion tokens it asks for.
    token_estimate: int = 0


_TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


def parse_request(
    body: bytes,
    route: Route,
    routing: RoutingSettings,
    limits: InputLimitSettings | None = None,
) -> RequestMeta:
    """Read only what routing needs, and hold the body to the input limits. The body is
    forwarded untouched, except that a stream whose client did not ask for usage asks for it
    (for exact token metrics)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON() from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    completion = check_input_limits(data, body, limits or InputLimitSettings())
    estimate = len(body) // 4 + completion
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("'model' is required and must be a non-empty string.", param="model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidField("'stream' must be a boolean.", param="stream")
    key = _affinity_key(data, routing)
    if not (stream and route.can_stream):
        return RequestMeta(
            model=model, stream=False, body=body, affinity_key=key, token_estimate=estimate
        )
    single = data.get("n") in (None, 1)
    resumable = route is CHAT and resumable_request(data)
    rewritten = ask_for_usage(data)
    return RequestMeta(
        model=model,
        stream=True,
        body=body if rewritten is None else rewritten,
        strip_usage=rewritten is not None,
        single_choice=single,
        affinity_key=key,
        resumable=resumable,
        token_estimate=estimate,
    )


def check_input_limits(data: dict[str, Any], body: bytes, limits: InputLimitSettings) -> int:
    """Reject what no worker should be sent (400, naming the field); return the completion
    tokens asked for (0 when not given)."""
    if _too_deep(body, data, limits.max_json_depth):
        raise InvalidRequest(f"The request body is nested deeper than {limits.max_json_depth}.")
    asked = 0
    for name in _TOKEN_LIMIT_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        # 0 is vLLM's too: with echo, prompt logprobs without generation (lm-eval's scoring).
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidField(f"'{name}' must be a non-negative integer.", param=name)
        if limits.max_tokens is not None and value > limits.max_tokens:
            raise InvalidField(f"'{name}' must be at most {limits.max_tokens}.", param=name)
        asked = max(asked, value)
    n = data.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InvalidField("'n' must be a positive integer.", param="n")
    if isinstance(n, int) and n > limits.max_n:
        raise InvalidField(f"'n' must be at most {limits.max_n}.", param="n")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise InvalidField(f"At most {limits.max_messages} messages.", param="messages")
    return asked * (n if isinstance(n, int) else 1)


def _too_deep(body: bytes, data: object, limit: int) -> bool:
    # Fast path (C speed): fewer brackets in the whole body than the limit cannot nest deeper.
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        assert isinstance(children, Iterable)
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _affinity_key(data: dict[str, object], routing: RoutingSettings) -> str | None:
    if routing.affinity == "session":
        return session_key(data)
    if routing.affinity == "prefix":
        return prefix_key(data, routing.prefix_chars)
    return None


def with_model(body: bytes, model: str) -> bytes:
    """The body for a fallback model: the only re-serialisation on the request path, and only
    when a fallback is used."""
    data = orjson.loads(body)
    data["model"] = model
    return orjson.dumps(data)
