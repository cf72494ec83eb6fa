"""Request middlewares: request ids, API keys, and rendering every error in the OpenAI shape.

Every response carries ``X-Request-Id`` (the client's, if it sent a sane one, else a new one),
also sent to the worker and put in every log line about the request. Every error that leaves
the gateway is ``{"error": {"message", "type", "param", "code"}}``; unexpected exceptions are
logged with the request id and answered with a bare 500 that reveals nothing.
"""

from __future__ import annotations

import logging
import random
import re

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
)
from gateway.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT = web.RequestKey("client", Client)
KEYRING = web.AppKey("keyring", KeyRing)
# The routes that need a key: the OpenAI API. Health, readiness and metrics stay open.
_PROTECTED_PREFIX = "/v1/"
_ids = random.Random()  # noqa: S311 (seeded from os.urandom in each process; ids grant nothing)
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def error_response(err: GatewayError) -> web.Response:
    headers = {"Content-Type": "application/json", **err.headers()}
    return web.Response(status=err.status, body=err.body_bytes(), headers=headers)


def _assign_request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-Id", "")
    # 128 random bits as hex, like uuid4().hex without a UUID object or a getrandom() call
    # per request: an id must be unique, not unguessable (it grants nothing).
    request_id = incoming if _SANE_ID.fullmatch(incoming) else f"{_ids.getrandbits(128):032x}"
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
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Names the client of every OpenAI route, or answers 401 (rendered by error_middleware,
    which runs outside this one)."""
    if request.path.startswith(_PROTECTED_PREFIX):
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
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc))
    except Exception:
        log.exception("unhandled error")
        return error_response(InternalError())


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return RouteNotFound()
    if exc.status == 405:
        return MethodNotAllowed()
    if exc.status == 413:
        return PayloadTooLarge()
    if exc.status < 500:
        return InvalidRequest(exc.reason)
    return InternalError()
