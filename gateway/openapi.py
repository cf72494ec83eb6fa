"""The gateway's own OpenAPI 3.1 document, served at ``/openapi.json``: its routes, the request
bodies it reads (other fields pass through to vLLM, so bodies allow extra properties), and
every error it can answer with, in the OpenAI shape. ``tests/test_openapi.py`` keeps it equal
to the routes the app registers; ``tests/test_fuzz.py`` fuzzes the gateway from it.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds."}}
_RATE_HEADERS = {
    f"x-ratelimit-{part}-{kind}": {"schema": {"type": "string"}}
    for part in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")
}

# Statuses the gateway itself answers an OpenAI route with (gateway/errors.py), and why.
_ROUTE_ERRORS = {
    "400": "Invalid JSON or field (invalid_json, invalid_body, invalid_field), or the "
    "worker's own 400 such as a context-length error",
    "401": "Missing, wrong or revoked API key (invalid_api_key)",
    "404": "Unknown model (model_not_found)",
    "408": "The request body or the client's reading stalled (request_body_timeout, "
    "client_too_slow)",
    "413": "Body larger than server.max_body_bytes (request_too_large)",
    "415": "Content-Type is not application/json (unsupported_media_type)",
    "429": "A rate limit of the key (rate_limit_exceeded), or the worker's own 429",
    "500": "An internal error, or the worker's own 500",
    "502": "The worker failed (upstream_*)",
    "503": "Overloaded, no healthy worker, shutting down, or the worker's own 503",
    "504": "A timeout phase expired (connect_timeout, first_token_timeout, idle_timeout, "
    "request_timeout)",
}

_MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string"},
        "content": {"type": ["string", "array", "null"]},
        "name": {"type": "string"},
    },
    "additionalProperties": True,
}

_GENERATION: Schema = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"]},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"]},
    "top_p": {"type": ["number", "null"]},
    "stop": {"type": ["string", "array", "null"]},
    "seed": {"type": ["integer", "null"]},
    "user": {"type": "string"},
}

_BODIES: dict[str, Schema] = {
    "chat": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_GENERATION,
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
            "tools": {"type": ["array", "null"]},
            "logprobs": {"type": ["boolean", "null"]},
        },
        "additionalProperties": True,
    },
    "completion": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {**_GENERATION, "prompt": {"type": ["string", "array"]}},
        "additionalProperties": True,
    },
    "embedding": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {"type": ["string", "array"]},
            "encoding_format": {"enum": ["float", "base64"]},
            "user": {"type": "string"},
        },
        "additionalProperties": True,
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vllm-gateway",
            "version": "0.1.0",
            "description": "An OpenAI-compatible gateway in front of vLLM workers.",
        },
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/chat/completions": {"post": _generation("chat", "Chat completion")},
            "/v1/completions": {"post": _generation("completion", "Text completion")},
            "/v1/embeddings": {"post": _generation("embedding", "Embeddings", stream=False)},
            "/v1/models": {"get": _models()},
            "/health": {"get": _plain("Liveness: the process answers.")},
            "/ready": {"get": _plain("Readiness: 503 while draining or with no healthy worker.")},
            "/metrics": {"get": _plain("Prometheus metrics.", "text/plain")},
            "/openapi.json": {"get": _plain("This document.")},
        },
    }


def _generation(body: str, summary: str, stream: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "summary": summary,
        "security": [{"bearer": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _BODIES[body]}},
        },
        "responses": {
            "200": {
                "description": "The worker's answer, passed through (a stream when asked).",
                "headers": _RATE_HEADERS,
                "content": content,
            },
            **_errors(),
        },
    }


def _models() -> dict[str, Any]:
    listing = {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
    }
    return {
        "summary": "The models served by healthy workers.",
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": listing}}},
            "401": _error_response(_ROUTE_ERRORS["401"]),
        },
    }


def _plain(summary: str, media: str = "application/json") -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {media: {"schema": {}}}},
            "503": {"description": "Not ready", "content": {media: {"schema": {}}}},
        },
    }


def _errors() -> dict[str, Any]:
    out = {}
    for status, why in _ROUTE_ERRORS.items():
        response = _error_response(why)
        if status in ("429", "503"):
            response["headers"] = {**_RETRY_AFTER, **(_RATE_HEADERS if status == "429" else {})}
        out[status] = response
    return out


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
