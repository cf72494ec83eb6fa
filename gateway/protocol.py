"""The HTTP/1.1 server protocol: aiohttp's, with its own refusals in the OpenAI shape.

aiohttp's parser refuses some requests before any route or middleware sees them (a bad header
name or chunk size, a header line over ``MAX_FIELD_SIZE`` bytes, more than ``MAX_HEADERS``
header fields, a ``Content-Encoding`` it has no decoder for) and answers them itself in
text/plain, quoting the client's bytes back, on an HTTP/1.0 status line. ``GatewayRequestHandler``
answers them as every other gateway error is answered: ``{"error": {...}}`` with a stable code
and an ``X-Request-Id``, on an HTTP/1.1 status line, the connection then closed (the parser's
place in the byte stream is lost). The client's bytes are neither echoed nor logged: a header
line may be a credential.

``GatewayRunner`` is ``web.AppRunner`` serving with that protocol; ``server.py`` uses it, and
tests that send malformed HTTP start the gateway with it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler

from gateway.errors import (
    GatewayError,
    HeadersTooLarge,
    InternalError,
    MalformedHTTP,
    UnsupportedContentEncoding,
)
from gateway.logs import request_id_var
from gateway.middleware import REQUEST_ID, error_response, new_request_id

log = logging.getLogger(__name__)

# aiohttp's defaults, passed explicitly because the answers and tests name them.
MAX_FIELD_SIZE = 8190  # bytes of one header line (name and value)
MAX_HEADERS = 128
# The placeholder request aiohttp builds for a refused message, as HTTP/1.1: the answer's
# status line takes the request's version.
_REFUSED = ERROR._replace(version=HttpVersion11)


def refusal(exc: BaseException | None) -> GatewayError:
    """The gateway error for what aiohttp's parser raised. Only the exception's class (and,
    for a header count, aiohttp's fixed text) is read: its message quotes the client's bytes."""
    if isinstance(exc, LineTooLong):
        return HeadersTooLarge("A header field or the request line is too long.")
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return HeadersTooLarge(f"More than {MAX_HEADERS} header fields.")
    if isinstance(exc, ContentEncodingError):
        # Raised while reading the headers, for a coding aiohttp has no decoder for (br, zstd
        # without their packages); a body that fails to decode is the handler's to refuse.
        return UnsupportedContentEncoding()
    return MalformedHTTP()


class GatewayRequestHandler(RequestHandler):
    """aiohttp's protocol with ``handle_error`` answering in the OpenAI shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        request_id = request.get(REQUEST_ID) or new_request_id()
        token = request_id_var.set(request_id)
        try:
            if status >= 500:
                # An exception escaped every middleware (the error middleware renders all
                # the others): a bug, logged with its traceback.
                err: GatewayError = InternalError()
                log.error("unhandled error", exc_info=exc)
            else:
                err = refusal(exc)
                log.info("refused by the HTTP parser: %s (%s)", err.code, type(exc).__name__)
        finally:
            request_id_var.reset(token)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has started: no error answer can follow")
        response = error_response(err)
        response.headers["X-Request-Id"] = request_id
        response.force_close()
        return response


class GatewayServer(web.Server):
    """``web.Server`` whose connections speak ``GatewayRequestHandler``."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        make_request = self.request_factory

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: Any,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            refused = _REFUSED if message is ERROR else message
            return make_request(refused, payload, protocol, writer, task)

        self.request_factory = request_factory

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving the app with ``GatewayServer``."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app; aiohttp's own server
        return GatewayServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
