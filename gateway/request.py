"""What the gateway reads from a request before routing it: the OpenAI routes it forwards,
``parse_request`` (model, stream, affinity key, resumability; the body stays untouched but for
the usage request of a stream), and the one rewrite a fallback model needs."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.affinity import prefix_key, session_key
from gateway.errors import InvalidField, InvalidJSON, InvalidRequest
from gateway.resume import resumable_request
from gateway.settings import RoutingSettings
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


def parse_request(body: bytes, route: Route, routing: RoutingSettings) -> RequestMeta:
    """Read only what routing needs. The body is forwarded untouched, except that a stream
    whose client did not ask for usage asks for it (for exact token metrics)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON() from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
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
        return RequestMeta(model=model, stream=False, body=body, affinity_key=key)
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
    )


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
