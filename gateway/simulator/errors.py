"""vLLM's error body (`{"error": {"message", "type", "param", "code"}}`, vLLM >= 0.10.1) and the
one exception the simulator raises to answer with it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

# The `type` vLLM puts in error bodies, by HTTP status; others derive from the status phrase.
_TYPES = {
    400: "BadRequestError",
    401: "Unauthorized",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


def error_type(status: int) -> str:
    """The error `type` for an HTTP status, e.g. 404 -> "NotFoundError"."""
    if status in _TYPES:
        return _TYPES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return phrase.title().replace(" ", "").replace("-", "") + "Error"


class SimError(Exception):
    """A request failure with its HTTP status and the fields of vLLM's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=orjson.dumps(self.body()), content_type="application/json"
        )


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    error = {"message": message, "type": error_type(status), "param": param, "code": status}
    return {"error": error}


def bad_request(message: str, param: str | None = None) -> SimError:
    return SimError(400, message, param)


def invalid(param: str, message: str, value: object) -> SimError:
    """A 400 worded as vLLM's `VLLMValidationError`: the parameter and value appended."""
    detail = f"parameter={param}" if value is None else f"parameter={param}, value={value}"
    return SimError(400, f"{message} ({detail})", param)
