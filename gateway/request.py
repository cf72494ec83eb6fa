"""What the gateway reads from a request before routing it: the routes it forwards through the
proxy, ``parse_request`` (model, stream, affinity key, resumability; the body stays untouched but
for the usage request of a stream), and the one rewrite a fallback model needs.

The gateway checks only what it must know: the model (to route), ``stream`` (to relay), and the
limits an operator configured. Everything else is the worker's to validate, so a body vLLM
accepts is never refused here: fields are read the way vLLM's pydantic models read them (lax:
``"n": 1.0`` is 1, ``"stream": "true"`` is true), and a body only Python's JSON parser accepts
(wide integers, lone surrogates) is read with it (``jsonsplice``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from gateway.affinity import prefix_key, session_key
from gateway.errors import InvalidField, InvalidJSON, InvalidRequest
from gateway.jsonsplice import BodyError, dumps, loads, replace_member
from gateway.prompttokens import Tokenizes, prompt_token_ids
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

# vLLM's other JSON routes whose answer is one JSON body: through the proxy like embeddings
# (admission, rate limits, retries before commit). The metric label is the path's own name.
JSON_ROUTES = tuple(
    Route(name, path, can_stream=False)
    for name, path in (
        ("tokenize", "/tokenize"),
        ("detokenize", "/detokenize"),
        ("pooling", "/pooling"),
        ("classify", "/classify"),
        ("score", "/score"),
        ("score", "/v1/score"),
        ("rerank", "/rerank"),
        ("rerank", "/v1/rerank"),
        ("rerank", "/v2/rerank"),
        ("embed", "/v2/embed"),
        ("count_tokens", "/v1/messages/count_tokens"),
    )
)

# What finds the model a request without one is served by, set per request by the handler:
# the fleet's one model when it serves exactly one (vLLM serves a model-less request with its
# one model). A context variable because the proxy calls ``parse_request`` with the body
# alone; a function, called only for a request without a model, because finding it walks
# every worker's models (about 1 µs a worker).
default_model_var: ContextVar[Callable[[], str | None] | None] = ContextVar(
    "default_model", default=None
)


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
    # The prompt's token ids when routing.kv_events is on and the body gives them (see
    # prompttokens.py), for cache-aware routing; None otherwise.
    prompt_ids: list[int] | None = None
    # The client's body parsed, for the splices made later (resume's token ids).
    data: dict[str, Any] = field(default_factory=dict)


_TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


def parse_request(
    body: bytes,
    route: Route,
    routing: RoutingSettings,
    limits: InputLimitSettings | None = None,
    tokenizers: Mapping[str, Tokenizes] | None = None,  # by model, for cache-aware routing
) -> RequestMeta:
    """Read only what routing needs, and hold the body to the input limits. The body is
    forwarded untouched, except that a stream whose client did not ask for usage asks for it
    (for exact token metrics)."""
    try:
        data, plain = loads(body)
    except BodyError:
        raise InvalidJSON() from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    completion = check_input_limits(data, body, limits or InputLimitSettings())
    estimate = len(body) // 4 + completion
    model = request_model(data)
    # A value pydantic would not read as a bool is the worker's to refuse: relayed as JSON.
    stream = lax_bool(data.get("stream")) is True
    key = _affinity_key(data, routing)
    prompt_ids = None
    if routing.kv_events.enabled:
        prompt_ids = prompt_token_ids(data, tokenizers.get(model) if tokenizers else None)
    if not (stream and route.can_stream):
        return RequestMeta(
            model=model,
            stream=False,
            body=body,
            affinity_key=key,
            token_estimate=estimate,
            prompt_ids=prompt_ids,
            data=data,
        )
    n = lax_int(data.get("n"))
    single = n is None or n == 1
    # Resume re-reads the body with orjson: only for bodies orjson reads.
    resumable = plain and route is CHAT and resumable_request(data)
    rewritten = ask_for_usage(body, data) if single else None
    return RequestMeta(
        model=model,
        stream=True,
        body=body if rewritten is None else rewritten,
        strip_usage=rewritten is not None,
        single_choice=single,
        affinity_key=key,
        resumable=resumable,
        token_estimate=estimate,
        prompt_ids=prompt_ids,
        data=data,
    )


def request_model(data: dict[str, Any]) -> str:
    """The model to route to: the body's, else the fleet's one model (``default_model_var``).
    A model that is not a string is routed to the default too when there is one: the worker
    gives its own answer."""
    model = data.get("model")
    if isinstance(model, str) and model:
        return model
    find = default_model_var.get()
    default = find() if find is not None else None
    if default is not None:
        return default
    raise InvalidField("'model' is required and must be a non-empty string.", param="model")


def check_input_limits(data: dict[str, Any], body: bytes, limits: InputLimitSettings) -> int:
    """Reject what the operator's limits forbid (400, naming the field); return the completion
    tokens asked for (0 when not given). A value of the wrong type is the worker's to refuse:
    only a value that counts as a number is held to a cap."""
    if _too_deep(body, data, limits.max_json_depth):
        raise InvalidRequest(f"The request body is nested deeper than {limits.max_json_depth}.")
    asked = 0
    for name in _TOKEN_LIMIT_FIELDS:
        value = lax_int(data.get(name))
        if value is None:
            continue
        if limits.max_tokens is not None and value > limits.max_tokens:
            raise InvalidField(f"'{name}' must be at most {limits.max_tokens}.", param=name)
        asked = max(asked, value)
    n = lax_int(data.get("n"))
    if n is not None and limits.max_n is not None and n > limits.max_n:
        raise InvalidField(f"'n' must be at most {limits.max_n}.", param="n")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise InvalidField(f"At most {limits.max_messages} messages.", param="messages")
    return max(asked, 0) * (n if n is not None and n > 0 else 1)


def lax_int(value: object) -> int | None:
    """``value`` as pydantic's lax mode reads an int (1, 1.0, "1"); None when it does not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def lax_bool(value: object) -> bool | None:
    """``value`` as pydantic's lax mode reads a bool; None for null or what it refuses."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return None


def _too_deep(body: bytes, data: object, limit: int) -> bool:
    # Fast path (C speed): fewer brackets in the whole body than the limit cannot nest deeper.
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Level by level: after k rounds ``level`` holds the containers at depth k + 1 (the body is
    # at depth 1). A plain loop over each container's items, without a generator or tuples:
    # a 24 KB chat body with tools took 86 µs with a stack of (node, depth), 14 µs so.
    level = [data]
    for _ in range(limit):
        deeper: list[object] = []
        for node in level:
            for child in node.values() if type(node) is dict else node:  # type: ignore[attr-defined]
                kind = type(child)
                if kind is dict or kind is list:
                    deeper.append(child)
        if not deeper:
            return False
        level = deeper
    return True


def _affinity_key(data: dict[str, object], routing: RoutingSettings) -> str | None:
    if routing.affinity == "session":
        return session_key(data)
    if routing.affinity == "prefix":
        return prefix_key(data, routing.prefix_chars)
    return None


def with_model(body: bytes, model: str) -> bytes:
    """The body for a fallback model: the value of ``model`` replaced (appended when the
    client sent none), every other byte the client's."""
    return replace_member(body, "model", dumps(model))
