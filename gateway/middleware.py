"""Request middlewares: request ids, CORS, API keys, the body's encoding, and rendering every
error in the OpenAI shape.

Every response carries ``X-Request-Id`` (the client's, if it sent a sane one, else a new one),
also sent to the worker and put in every log line about the request. Every error that leaves
the gateway is ``{"error": {"message", "type", "param", "code"}}``; unexpected exceptions are
logged with the request id and answered with a bare 500 that reveals nothing.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable

from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler

from gateway.auth import OPEN_CLIENT, Client, KeyRing
from gateway.errors import (
    ExpectationFailed,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    UnsupportedContentEncoding,
)
from gateway.logs import AccessLog, request_id_var
from gateway.request import JSON_ROUTES
from gateway.settings import CorsSettings

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT = web.RequestKey("client", Client)
# Set once a request's access-log line is written (the proxy and the pass-through write their
# own, with what they know): an error answered here for a request neither wrote gets one.
ACCESS_LOGGED = web.RequestKey("access_logged", bool)
PATH_IN_LOG = 200  # characters of a path no route matched, in its access-log line
access_log = AccessLog("gateway.access")
# What counts a refusal by its code (``gateway_rejections_total``; set by the app, which holds
# the metrics: this module sits below the modules that know them).
COUNT_REFUSAL: web.AppKey[Callable[[str], None]] = web.AppKey("count_refusal")
KEYRING = web.AppKey("keyring", KeyRing)
CORS = web.AppKey("cors", CorsSettings)
# The routes that need a key: the OpenAI API and vLLM's routes outside /v1. Health, readiness,
# metrics, the API document and /version stay open (vLLM's --api-key guards only /v1 too).
_PROTECTED_PREFIX = "/v1/"
_PROTECTED = frozenset(route.path for route in JSON_ROUTES)
# Content-Encodings aiohttp's server decodes; any other would reach a worker still encoded.
_DECODED = frozenset(("gzip", "x-gzip", "deflate", "identity"))
# What a browser script may read from an answer besides the CORS-safelisted headers.
_EXPOSED = ", ".join(
    (
        "X-Request-Id", "Retry-After", "X-Gateway-Version",
        *(f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")
          for kind in ("requests", "tokens")),
    )
)  # fmt: skip
_ids = random.Random()  # noqa: S311 (seeded from os.urandom in each process; ids grant nothing)
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def error_response(err: GatewayError) -> web.Response:
    headers = {"Content-Type": "application/json", **err.headers()}
    return web.Response(status=err.status, body=err.body_bytes(), headers=headers)


def new_request_id() -> str:
    # 128 random bits as hex, like uuid4().hex without a UUID object or a getrandom() call
    # per request: an id must be unique, not unguessable (it grants nothing).
    return f"{_ids.getrandbits(128):032x}"


def _assign_request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _SANE_ID.fullmatch(incoming) else new_request_id()
    request[REQUEST_ID] = request_id
    return request_id


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """aiohttp runs this before any middleware when a request carries ``Expect``: its own
    answers a 417 in text/plain; this one answers it in the OpenAI shape."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        _assign_request_id(request)  # the answer carries one, as every answer does
        return error_response(ExpectationFailed())
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not started
    return None


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = _assign_request_id(request)
    token = request_id_var.set(request_id)
    try:
        return await handler(request)
    finally:
        request_id_var.reset(token)


async def add_request_id_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response, streamed ones included."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers a CORS preflight itself (before the key check: a browser sends no credentials
    with it); ``add_cors_headers`` marks every other answer to an allowed origin."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        cors = request.app[CORS]
        origin = request.headers.get("Origin", "")
        if _allowed(cors, origin):
            return _preflight(request, cors, origin)
    return await handler(request)


def _allowed(cors: CorsSettings, origin: str) -> bool:
    return bool(origin) and ("*" in cors.allow_origins or origin in cors.allow_origins)


def _preflight(request: web.Request, cors: CorsSettings, origin: str) -> web.Response:
    match = request.match_info
    methods = set(getattr(match.http_exception, "allowed_methods", ()) or ())
    if match.route.method != "*" and match.http_exception is None:
        methods.add(match.route.method)
    asked = request.headers.get("Access-Control-Request-Headers", "")
    headers = {
        "Access-Control-Allow-Origin": "*" if "*" in cors.allow_origins else origin,
        "Access-Control-Allow-Methods": ", ".join(sorted(methods)) or "GET, POST",
        "Access-Control-Allow-Headers": asked if "*" in cors.allow_headers
        else ", ".join(cors.allow_headers),
        "Access-Control-Max-Age": str(cors.max_age),
    }  # fmt: skip
    if "*" not in cors.allow_origins:
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


async def add_cors_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to an allowed origin, streamed ones included."""
    origin = request.headers.get("Origin")
    if origin is None or "Access-Control-Allow-Origin" in response.headers:
        return
    cors = request.app[CORS] if isinstance(request, web.Request) else None
    if cors is None or not _allowed(cors, origin):
        return
    wildcard = "*" in cors.allow_origins
    response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
    response.headers["Access-Control-Expose-Headers"] = _EXPOSED
    if not wildcard:
        response.headers["Vary"] = "Origin"


@web.middleware
async def encoding_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A body in a Content-Encoding aiohttp does not decode is refused (415), not read as if
    it were plain."""
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None:
        codings = {c.strip().lower() for c in encoding.split(",")}
        if not codings <= _DECODED:
            raise UnsupportedContentEncoding()
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Names the client of every OpenAI route, or answers 401 (rendered by error_middleware,
    which runs outside this one)."""
    if request.path.startswith(_PROTECTED_PREFIX) or request.path in _PROTECTED:
        ring = request.app[KEYRING]
        request[CLIENT] = ring.identify(request.headers.get("Authorization"))
    else:
        request[CLIENT] = OPEN_CLIENT
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        error = err
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(exc)
    except Exception:
        log.exception("unhandled error")
        error = InternalError()
    if not request.get(ACCESS_LOGGED):
        _observe_refusal(request, error)
    return error_response(error)


def _observe_refusal(request: web.Request, error: GatewayError) -> None:
    """Refused before any handler of ours observed it: a bad or missing key, an unknown route,
    a body the route cannot read. Counted by its code (a bounded set) and logged: failed
    logins must show in both."""
    count = request.app.get(COUNT_REFUSAL)
    if count is not None:
        count(error.code)
    if access_log.enabled():
        client = request.get(CLIENT)
        access_log.write(
            request.get(REQUEST_ID, "-"),
            {
                "key": client.name if client is not None else None,
                "method": request.method,
                "path": request.path[:PATH_IN_LOG],
                "status": error.status,
                "code": error.code,
            },
        )


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return RouteNotFound()
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(tuple(sorted(exc.allowed_methods)))
    if exc.status == 405:
        return MethodNotAllowed()
    if exc.status == 413:
        return PayloadTooLarge()
    if exc.status < 500:
        return InvalidRequest(exc.reason)
    return InternalError()
