"""The gateway's error tree: every error a client can receive from the gateway itself.

Each class knows its HTTP status, OpenAI ``type``, stable ``code`` and whether a request that
failed with it may be retried on another worker (before commit only)::

    GatewayError
    ├── InvalidRequest (400)            invalid_json · invalid_body · invalid_field
    │   ├── MalformedHTTP (400)         invalid_http  (refused by the HTTP parser)
    │   ├── ModelNotFound (404)         model_not_found
    │   ├── RouteNotFound (404)         route_not_found
    │   ├── MethodNotAllowed (405)      method_not_allowed
    │   ├── ClientTooSlow (408)         client_too_slow
    │   ├── RequestBodyTimeout (408)    request_body_timeout
    │   ├── PayloadTooLarge (413)       request_too_large
    │   ├── UnsupportedMediaType (415)  unsupported_media_type · unsupported_content_encoding
    │   ├── HeadersTooLarge (431)       headers_too_large
    │   ├── ResponseNotFound (404)      response_not_found  (no worker holds the stored response)
    │   ├── ResponseHolderLost (404)    response_holder_lost  (its worker left the fleet)
    │   └── ExpectationFailed (417)     expectation_failed
    ├── Unauthorized (401)              invalid_api_key
    ├── AdminKeyRequired (403)          admin_key_required
    ├── RateLimited (429, Retry-After)  rate_limit_exceeded  (type: requests · tokens · concurrency)
    ├── Unavailable (503, Retry-After)  gateway_overloaded · no_healthy_worker · shutting_down
    │   ├── WorkersCoolingDown          workers_cooling_down  (every worker asked for time)
    │   └── ResponseHolderUnavailable   response_holder_unavailable  (its worker is down)
    └── UpstreamError (502)             the worker failed us
        ├── UpstreamConnectError        upstream_connect_error      retryable
        ├── UpstreamDisconnected        upstream_disconnected       retryable before headers
        │   └── StaleConnection         upstream_stale_connection   retryable, not the worker's
        ├── UpstreamStatusError         upstream_unavailable        429/502/503/504
        │                               upstream_http_<status>      any other error status
        │                               (retried when in ``retry.statuses``)
        ├── UpstreamBadResponse         upstream_bad_response
        │   ├── UpstreamBadAnswer       upstream_bad_answer         retryable
        │   └── UpstreamMalformedEvent  upstream_malformed_event    retryable
        ├── UpstreamStreamError         upstream_stream_error       retryable
        ├── UpstreamAborted             upstream_aborted            retryable
        ├── UpstreamStreamTruncated     upstream_stream_truncated
        └── UpstreamTimeout (504)
            ├── ConnectTimeout          connect_timeout             retryable
            ├── FirstTokenTimeout       first_token_timeout         retryable
            ├── IdleTimeout             idle_timeout
            └── TotalTimeout            request_timeout
    InternalError (500)                 internal_error  (a bug; details go to the log only)

The body shape is ``{"error": {"message", "type", "param", "code"}}``, the one the OpenAI SDK and
current vLLM use. Messages are written for the client: never exception text from lower layers.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """Base of every error the gateway renders itself."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    retryable: bool = False
    default_message: str = "Internal error."

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        self.message = message or self.default_message
        self.param = param
        super().__init__(self.message)

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body_bytes(self) -> bytes:
        try:
            return orjson.dumps(self.body())
        except TypeError:
            # A client's string with a lone surrogate (valid JSON escapes, read by the lenient
            # parser) quoted in the message: shown as "?", which every JSON parser reads.
            return orjson.dumps(_without_surrogates(self.body()))

    def headers(self) -> dict[str, str]:
        return {}


class InternalError(GatewayError):
    pass


# --- the client's fault -------------------------------------------------------------------


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_body"
    default_message = "The request body is invalid."


class InvalidJSON(InvalidRequest):
    code = "invalid_json"
    default_message = "The request body is not valid JSON."


class InvalidField(InvalidRequest):
    code = "invalid_field"


class MalformedHTTP(InvalidRequest):
    """The HTTP parser refused the request before any route saw it (a bad header name, a bad
    chunk size...). The message names the part, never the client's bytes."""

    code = "invalid_http"
    default_message = "The request is not valid HTTP/1.1."


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 200 else model[:200] + "..."
        super().__init__(f"The model '{shown}' does not exist.", param="model")


class RouteNotFound(InvalidRequest):
    status = 404
    code = "route_not_found"
    default_message = "Unknown path."


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"
    default_message = "Method not allowed on this path."

    def __init__(self, allowed: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"

    def __init__(self, limit: int | None = None) -> None:
        where = f" of {limit} bytes" if limit else ""
        super().__init__(f"The request body exceeds the limit{where}.")


class ClientTooSlow(InvalidRequest):
    """Our client stopped reading for longer than ``timeouts.idle``; its connection is closed.

    Usually after commit, where no status can be sent; counted as the client's failure.
    """

    status = 408
    code = "client_too_slow"
    default_message = "The client did not read the response in time."


class RequestBodyTimeout(InvalidRequest):
    status = 408
    code = "request_body_timeout"
    default_message = "The request body did not arrive in time."


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"
    default_message = "Content-Type must be application/json."


class UnsupportedContentEncoding(UnsupportedMediaType):
    code = "unsupported_content_encoding"
    default_message = "Content-Encoding must be gzip, deflate or identity."


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "headers_too_large"
    default_message = "The request's header fields are too large or too many."


class ResponseNotFound(InvalidRequest):
    """No worker holds the stored response a request names (vLLM's own answer, 404)."""

    status = 404
    code = "response_not_found"

    def __init__(self, response_id: str, param: str) -> None:
        shown = response_id if len(response_id) <= 200 else response_id[:200] + "..."
        super().__init__(f"Response with id '{shown}' not found.", param=param)


class ResponseHolderLost(ResponseNotFound):
    """The worker that stored the response left the fleet, and the response with it."""

    code = "response_holder_lost"

    def __init__(self, response_id: str, param: str) -> None:
        super().__init__(response_id, param)
        self.message = (
            f"Response with id '{response_id[:200]}' was stored by a worker that has left the "
            "fleet; it is lost."
        )


class ExpectationFailed(InvalidRequest):
    """An ``Expect`` header other than ``100-continue`` (RFC 9110, 10.1.1)."""

    status = 417
    code = "expectation_failed"
    default_message = "The only Expect the gateway meets is 100-continue."


class Unauthorized(GatewayError):
    """A missing, unknown or revoked API key (the OpenAI shape and code for a bad key)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    default_message = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="vllm-gateway"'}


class AdminKeyRequired(GatewayError):
    """An admin route (LoRA adapters) asked for without an admin key; refused even when the
    gateway has no keys at all, so an open gateway never opens its admin routes."""

    status = 403
    type = "invalid_request_error"
    code = "admin_key_required"
    default_message = "This route needs an API key with admin: true."


class RateLimited(GatewayError):
    """429: the key used up one of its limits. ``type`` names the limit as OpenAI does
    ("requests", "tokens"); ``Retry-After`` and the ``x-ratelimit-*`` headers say when."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, kind: str, retry_after: float, headers: dict[str, str]) -> None:
        seconds = max(1, int(-(-retry_after // 1)))  # whole seconds, rounded up
        super().__init__(f"Rate limit reached on {kind}. Please try again in {seconds}s.")
        self.type = kind
        self.retry_after = seconds
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return {**self._headers, "Retry-After": str(self.retry_after)}


# --- the gateway cannot take the request now ----------------------------------------------


class Unavailable(GatewayError):
    """503 with ``Retry-After``: try again later (the OpenAI SDK retries these by itself)."""

    status = 503
    type = "server_error"
    code = "unavailable"

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Overloaded(Unavailable):
    code = "gateway_overloaded"
    default_message = "The gateway is at capacity; retry after the indicated delay."


class NoHealthyWorker(Unavailable):
    code = "no_healthy_worker"
    default_message = "No healthy worker serves this model right now."


class WorkersCoolingDown(Unavailable):
    """Every worker that could serve the model asked for time (``Retry-After`` on a 429 or
    503) and that time has not passed: ``Retry-After`` says how long is left."""

    code = "workers_cooling_down"
    default_message = "Every worker for this model asked for time; retry after the indicated delay."


class ResponseHolderUnavailable(Unavailable):
    code = "response_holder_unavailable"
    default_message = (
        "The worker that stored this response is not available now; retry after the delay."
    )


class ShuttingDown(Unavailable):
    code = "shutting_down"
    default_message = "The gateway is shutting down; retry on another replica."


# --- the worker failed us -----------------------------------------------------------------


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    default_message = "The model worker failed."


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"
    retryable = True
    default_message = "Could not connect to a model worker."

    def __init__(self, message: str | None = None, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # nothing listens at the address: the server is gone


class UpstreamDisconnected(UpstreamError):
    code = "upstream_disconnected"
    retryable = True
    default_message = "The model worker closed the connection."


class StaleConnection(UpstreamDisconnected):
    """A kept connection closed by the worker (its keep-alive timer) as the request went out,
    with not a byte back: most likely unread, yet possibly read. Retried by the proxy like
    any failure (counted, budgeted, logged), never silently by the forwarding client."""

    code = "upstream_stale_connection"
    default_message = "The model worker closed a kept connection as the request was sent."


class UpstreamStatusError(UpstreamError):
    """A worker answered with an error status.

    Whether it is retried is the retry policy's (``retry.statuses``, ``gateway/failover.py``).
    When it reaches the client, the status is the worker's. A client error (4xx but 429) keeps
    the worker's own body when that is OpenAI-shaped (vLLM's is: a context-length 400 reaches
    the client unchanged), else gets this error's body with the status and the worker's message
    in it. A 429 or 5xx gets this error's body, with a stable ``code`` and the worker's message
    when it had one, and ``Retry-After`` when the worker sent one or the proxy set one.
    """

    UNAVAILABLE_STATUSES = frozenset({429, 502, 503, 504})

    default_message = "The model worker answered with an error."

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        message = _worker_message(body)
        if message is not None and status < 500 and status != 429:
            # Only a body that is not OpenAI-shaped is wrapped (a 404 for a route the worker
            # does not serve, say): the status and the worker's word say what went wrong.
            message = f"The model worker answered {status}: {message}"
        super().__init__(message)
        self.status = status
        self.retryable = status in self.UNAVAILABLE_STATUSES
        self.code = "upstream_unavailable" if self.retryable else f"upstream_http_{status}"
        if status < 500:
            self.type = "invalid_request_error"
        self.upstream_body = body
        self.upstream_headers = headers

    def body_bytes(self) -> bytes:
        if self.status < 500 and self.status != 429 and is_openai_error(self.upstream_body):
            return self.upstream_body
        return super().body_bytes()

    def headers(self) -> dict[str, str]:
        # Only Retry-After survives: the body sent is always JSON, whatever the worker's type.
        return {k: v for k, v in self.upstream_headers.items() if k.lower() == "retry-after"}


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"
    default_message = "The model worker sent an invalid response."


class UpstreamBadAnswer(UpstreamBadResponse):
    """A 200 whose JSON body does not parse: the worker is broken; another may answer."""

    code = "upstream_bad_answer"
    retryable = True
    default_message = "The model worker sent an answer that is not valid JSON."


class UpstreamMalformedEvent(UpstreamBadResponse):
    """An SSE event that is neither JSON nor ``[DONE]``: the worker is broken. Before commit
    the request moves to another worker."""

    code = "upstream_malformed_event"
    retryable = True
    default_message = "The model worker sent a malformed stream event."


class UpstreamStreamError(UpstreamError):
    """The worker's own in-band error event in a stream that could be resumed elsewhere."""

    code = "upstream_stream_error"
    retryable = True
    default_message = "The model worker failed while generating the answer."


class UpstreamAborted(UpstreamError):
    """The worker ended the answer with ``finish_reason: "abort"``: vLLM does that to every
    request in flight when it is told to stop (SIGTERM). Not an end: the answer is incomplete."""

    code = "upstream_aborted"
    retryable = True
    default_message = "The model worker stopped before the answer was complete."


class UpstreamStreamTruncated(UpstreamError):
    code = "upstream_stream_truncated"
    default_message = "The model worker ended the stream before it was complete."


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class ConnectTimeout(UpstreamTimeout):
    code = "connect_timeout"
    retryable = True
    default_message = "Timed out connecting to a model worker."


class FirstTokenTimeout(UpstreamTimeout):
    code = "first_token_timeout"
    retryable = True
    default_message = "Timed out waiting for the first token."


class IdleTimeout(UpstreamTimeout):
    code = "idle_timeout"
    default_message = "The model worker stopped sending tokens."


class TotalTimeout(UpstreamTimeout):
    code = "request_timeout"
    default_message = "The request took longer than the gateway allows."


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _without_surrogates(v) for k, v in value.items()}
    return value


def _worker_message(body: bytes) -> str | None:
    """The message in a worker's JSON error body, if it has one (bounded): OpenAI's
    ``error.message``, vLLM's older flat ``message``, ``{"error": "..."}``, or the ``detail``
    FastAPI answers a route or method it does not serve with."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    inner = data.get("error")
    if isinstance(inner, dict):
        message = inner.get("message")
    elif isinstance(inner, str):
        message = inner
    else:
        message = data.get("message", data.get("detail"))
    return message[:2000] if isinstance(message, str) and message else None


def is_openai_error(body: bytes) -> bool:
    """True for ``{"error": {"message": ...}}`` and vLLM's older flat ``{"object": "error"}``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(data, dict):
        return False
    inner = data.get("error")
    if isinstance(inner, dict):
        return isinstance(inner.get("message"), str)
    return data.get("object") == "error" and isinstance(data.get("message"), str)
