"""The gateway's own OpenAPI 3.1 document, served at ``/openapi.json``: the routes it registers,
the request fields it or vLLM reads (bodies allow other properties: vLLM takes many more and the
gateway forwards them untouched), the answers (JSON, or server-sent events for a stream), and
every error it can answer with, in the OpenAI error shape, with the headers that go with them.

A plain data structure built by small functions, once per app, from its settings.
``tests/test_openapi.py`` keeps it equal to the app's routes and to the error tree in
``gateway/errors.py``; ``tests/test_fuzz.py`` fuzzes a running gateway from it.
"""

from __future__ import annotations

from typing import Any

from gateway.settings import InputLimitSettings, Settings

Schema = dict[str, Any]

VERSION = "3.1.0"
JSON = "application/json"
SSE = "text/event-stream"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **constraints: Any) -> Schema:
    return {"type": [kind, "null"], **constraints}


# --- errors -----------------------------------------------------------------------------------


def error_schema() -> Schema:
    """``{"error": {...}}``: a response body, and an event of a stream that failed midway."""
    return {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _error_fields()},
    }


def _error_fields() -> Schema:
    return {
        "type": "object",
        "required": ["message", "type", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {
                "type": ["string", "integer", "null"],
                "description": "A stable string for the gateway's own errors; a worker's error "
                "is relayed as the worker wrote it (vLLM puts the HTTP status here).",
            },
        },
    }


# Why each status can answer an OpenAI route, with the codes of gateway/errors.py (a test checks
# that every code of the tree is named under its status).
OPENAI_ROUTE_ERRORS: dict[str, str] = {
    "400": "The body is not JSON (invalid_json), not an object or nested too deep "
    "(invalid_body), or a field the gateway checks is wrong or over a limit (invalid_field); "
    "or the request is not valid HTTP/1.1 (invalid_http); or the worker's own 400, relayed, "
    "such as a context-length error.",
    "401": "Missing, unknown or revoked API key (invalid_api_key).",
    "403": "An admin route called without an admin key (admin_key_required).",
    "404": "No worker serves the model (model_not_found), or no worker holds the stored "
    "response named (response_not_found, response_holder_lost).",
    "408": "The request body did not arrive in time (request_body_timeout), or the client "
    "stopped reading the answer (client_too_slow).",
    "413": "The body is larger than server.max_body_bytes (request_too_large).",
    "415": "Content-Type is not application/json (unsupported_media_type), or the body's "
    "Content-Encoding is not one the gateway decodes (unsupported_content_encoding).",
    "417": "An Expect header other than 100-continue (expectation_failed).",
    "431": "A header field is too long, or there are too many (headers_too_large).",
    "429": "The key used up a rate limit (rate_limit_exceeded; `type` names it: requests, "
    "tokens or concurrency), or the worker's own 429, relayed (upstream_unavailable).",
    "500": "A bug in the gateway (internal_error; details only in its log), or the worker's "
    "own 500 once retries ran out (upstream_http_500, with the worker's message).",
    "502": "The worker failed (upstream_error): could not connect (upstream_connect_error), "
    "closed the connection (upstream_disconnected, upstream_stale_connection), answered "
    "with an error (upstream_unavailable, upstream_http_<status>) or with something invalid "
    "(upstream_bad_response, upstream_bad_answer, upstream_malformed_event), or failed "
    "mid-stream (upstream_stream_error, upstream_stream_truncated), or stopped before the "
    "answer was complete (upstream_aborted).",
    "503": "Try again later (unavailable): the gateway is at capacity (gateway_overloaded), no "
    "healthy worker serves the model (no_healthy_worker), every worker of the model asked for "
    "time (workers_cooling_down), the worker holding a stored response is down "
    "(response_holder_unavailable), or it is shutting down (shutting_down); or the worker's "
    "own 503, relayed (upstream_unavailable).",
    "504": "A timeout phase expired (upstream_timeout): connecting (connect_timeout), waiting "
    "for the first token (first_token_timeout), between tokens (idle_timeout), or the whole "
    "request (request_timeout).",
}
INTERNAL_ERROR = "A bug in the gateway (internal_error; details only in its log)."
UNAUTHORIZED = OPENAI_ROUTE_ERRORS["401"]

# --- request bodies ---------------------------------------------------------------------------


def _model() -> Schema:
    return {"type": "string", "minLength": 1, "description": "Routes the request."}


def _token_limit() -> Schema:
    return _nullable("integer", minimum=1, description="At most input.max_tokens when set.")


def _sampling() -> Schema:
    """The fields chat and text completions share."""
    return {
        "model": _model(),
        "stream": _nullable("boolean", description="Answer with server-sent events."),
        "stream_options": _nullable(
            "object",
            properties={
                "include_usage": {"type": "boolean"},
                "continuous_usage_stats": {"type": "boolean"},
            },
            description="Only with stream; the gateway asks for usage itself when not asked.",
        ),
        "max_tokens": _token_limit(),
        "n": _nullable("integer", minimum=1, description="At most input.max_n when set."),
        "temperature": _nullable("number", minimum=0),
        "top_p": _nullable("number", exclusiveMinimum=0, maximum=1),
        "presence_penalty": _nullable("number", minimum=-2, maximum=2),
        "frequency_penalty": _nullable("number", minimum=-2, maximum=2),
        "logit_bias": _nullable("object", additionalProperties={"type": "number"}),
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "null"},
            ]
        },
        "seed": _nullable("integer"),
        "user": {"type": "string", "description": "Keys session affinity when that is on."},
    }


def _message() -> Schema:
    part = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
    }
    return {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "description": "system, developer, user, assistant, tool"},
            "content": {"type": ["string", "array", "null"], "items": part},
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": {"type": "string"},
        },
        "additionalProperties": True,
    }


def _tool() -> Schema:
    function = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "parameters": {"type": "object"},
        },
    }
    return {
        "type": "object",
        "required": ["type", "function"],
        "properties": {"type": {"const": "function"}, "function": function},
    }


def _text_or_tokens() -> Schema:
    """A prompt or an embeddings input: text, texts, token ids, or lists of token ids."""
    return {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            _token_ids(),
            {"type": "array", "items": _token_ids(), "minItems": 1},
        ]
    }


def _token_ids() -> Schema:
    return {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


_BODY_RULES = (
    "The gateway reads model, stream, stream_options, max_tokens, max_completion_tokens, n "
    "and messages, holds the body to the input limits (JSON nesting at most "
    "input.max_json_depth, 32 by default) and forwards it untouched; the worker judges the rest."
)


def _request(required: list[str], fields: Schema, description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "required": ["model", *required],
        "properties": fields,
        "additionalProperties": True,
    }


def _streaming_request(required: list[str], fields: Schema) -> Schema:
    """A request that can stream: vLLM takes ``stream_options`` only with ``stream: true``."""
    return {
        **_request(required, fields, _BODY_RULES),
        "if": {
            "required": ["stream_options"],
            "properties": {"stream_options": {"type": "object"}},
        },
        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
    }


def chat_request() -> Schema:
    fields = {
        **_sampling(),
        "messages": {
            "type": "array",
            "items": _message(),
            "minItems": 1,
            "description": "At most input.max_messages (1024 by default).",
        },
        "max_completion_tokens": _token_limit(),
        "tools": _nullable("array", items=_tool()),
        "tool_choice": {"type": ["string", "object", "null"]},
        "parallel_tool_calls": _nullable("boolean"),
        "response_format": _nullable("object"),
        "logprobs": _nullable("boolean"),
        "top_logprobs": _nullable("integer", minimum=0),
    }
    return _streaming_request(["messages"], fields)


def completion_request() -> Schema:
    fields = {
        **_sampling(),
        "prompt": _text_or_tokens(),
        "suffix": _nullable("string"),
        "echo": _nullable("boolean"),
        "best_of": _nullable("integer", minimum=1),
        "logprobs": _nullable("integer", minimum=0),
    }
    return _streaming_request(["prompt"], fields)


def embedding_request() -> Schema:
    fields = {
        "model": _model(),
        "input": {
            **_text_or_tokens(),
            "description": "A batch larger than routing.embedding_shard_size is split across "
            "workers and put back together in order.",
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    }
    return _request(["input"], fields, _BODY_RULES)


# --- answers ----------------------------------------------------------------------------------


def _answer(kind: str, item: str) -> Schema:
    return {
        "type": "object",
        "required": ["object", item],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "model": {"type": "string"},
            item: {"type": "array", "items": {"type": "object"}},
            "usage": _nullable("object"),
        },
    }


def stream_event() -> Schema:
    """One server-sent event of a stream: a chunk, an in-band error after the stream started
    (the status was sent already), or the final ``[DONE]``."""
    chunk = {
        "type": "object",
        "anyOf": [{"required": ["choices"]}, {"required": ["error"]}],
        "properties": {
            "object": {"enum": ["chat.completion.chunk", "text_completion"]},
            "choices": {"type": "array", "items": {"type": "object"}},
            "error": _error_fields(),
        },
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": JSON, "contentSchema": chunk},
                ]
            },
            "event": {"type": "string"},
            "id": {"type": "string"},
        },
    }


def model_list() -> Schema:
    card = {
        "type": "object",
        "required": ["id", "object"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": card}},
    }


def _status(*values: str) -> Schema:
    return {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": list(values)}},
    }


def schemas() -> dict[str, Schema]:
    return {
        "Error": error_schema(),
        "ChatCompletionRequest": chat_request(),
        "CompletionRequest": completion_request(),
        "EmbeddingRequest": embedding_request(),
        "ChatCompletion": _answer("chat.completion", "choices"),
        "Completion": _answer("text_completion", "choices"),
        "EmbeddingList": _answer("list", "data"),
        "StreamEvent": stream_event(),
        "ModelList": model_list(),
    }


# --- headers ----------------------------------------------------------------------------------


def _request_id_header() -> Schema:
    return {
        "X-Request-Id": {
            "required": True,
            "description": "The client's own X-Request-Id when it is 1-128 of [A-Za-z0-9._:-], "
            "else a new one; also sent to the worker and logged with the request.",
            "schema": {"type": "string"},
        }
    }


def _retry_after_header() -> Schema:
    return {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}


def _rate_limit_headers() -> Schema:
    return {
        f"x-ratelimit-{part}-{kind}": {
            "description": f"The key's {kind} per minute: {part} (for keys with such a limit).",
            "schema": {"type": "string"},
        }
        for kind in ("requests", "tokens")
        for part in ("limit", "remaining", "reset")
    }


# --- operations -------------------------------------------------------------------------------


def _request_id_parameter() -> Schema:
    return {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "Kept and echoed when sane, replaced otherwise.",
        "schema": {"type": "string"},
    }


def _json(schema: Schema, description: str = "OK", media: str = JSON) -> Schema:
    return {
        "description": description,
        "headers": _request_id_header(),
        "content": {media: {"schema": schema}},
    }


def _error(description: str) -> Schema:
    return {
        "description": description,
        "headers": _request_id_header(),
        "content": {JSON: {"schema": _ref("Error")}},
    }


def openai_errors() -> dict[str, Schema]:
    """Every error an OpenAI route can answer with (405 is no operation's: it answers a method
    a path does not have)."""
    out = {status: _error(why) for status, why in OPENAI_ROUTE_ERRORS.items()}
    out["429"]["headers"].update(_retry_after_header(), **_rate_limit_headers())
    out["503"]["headers"].update(_retry_after_header())
    return out


def _generation(operation_id: str, body: str, answer: str, *, stream: bool) -> Schema:
    content: Schema = {JSON: {"schema": _ref(answer)}}
    if stream:
        content[SSE] = {"schema": _ref("StreamEvent")}
    return {
        "operationId": operation_id,
        "description": "The worker's answer is passed through; with `stream: true` as "
        "server-sent events, one per chunk, then `data: [DONE]`. A failure after the first "
        "event cannot change the status any more: it is sent in-band as an error event.",
        "security": [{"bearer": []}],
        "parameters": [_request_id_parameter()],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(body)}}},
        "responses": {
            "200": {
                "description": "The answer.",
                "headers": {**_request_id_header(), **_rate_limit_headers()},
                "content": content,
            },
            **openai_errors(),
        },
    }


def _models() -> Schema:
    return {
        "operationId": "listModels",
        "description": "The models the healthy workers serve.",
        "security": [{"bearer": []}],
        "parameters": [_request_id_parameter()],
        "responses": {
            "200": _json(_ref("ModelList")),
            "401": _error(UNAUTHORIZED),
            "500": _error(INTERNAL_ERROR),
        },
    }


def _open(operation_id: str, description: str, responses: dict[str, Schema]) -> Schema:
    """An operation outside /v1: it needs no key."""
    return {
        "operationId": operation_id,
        "description": description,
        "parameters": [_request_id_parameter()],
        "responses": {**responses, "500": _error(INTERNAL_ERROR)},
    }


def _vllm_route(operation_id: str, *, body: str | None = JSON) -> Schema:
    """One of vLLM's other routes: the worker's own request and answer shapes, passed through
    (vLLM's own API document describes them); only the gateway's errors are written here."""
    operation: Schema = {
        "operationId": operation_id,
        "description": "Passed through to a worker serving the model; the answer is the "
        "worker's, status and body.",
        "security": [{"bearer": []}],
        "parameters": [_request_id_parameter()],
        "responses": {
            "200": {"description": "The worker's answer.", "headers": _request_id_header()},
            **openai_errors(),
        },
    }
    if body is not None:
        schema: Schema = {"type": "object", "properties": {"model": _model()}}
        operation["requestBody"] = {"required": True, "content": {body: {"schema": schema}}}
    return operation


def _path_parameter(name: str) -> Schema:
    return {"in": "path", "name": name, "required": True, "schema": {"type": "string"}}


def _vllm_paths() -> dict[str, Schema]:
    from gateway.admin import PATHS as ADMIN_PATHS
    from gateway.request import JSON_ROUTES

    out: dict[str, Schema] = {
        route.path: {"post": _vllm_route(route.name + route.path.replace("/", "_"))}
        for route in JSON_ROUTES
    }
    for path in ("/v1/responses", "/v1/messages", *ADMIN_PATHS):
        out[path] = {"post": _vllm_route(path.strip("/").replace("/", "_"))}
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        name = path.strip("/").replace("/", "_")
        out[path] = {"post": _vllm_route(name, body="multipart/form-data")}
    out["/v1/responses/{response_id}"] = {"get": _vllm_route("getResponse", body=None)}
    out["/v1/responses/{response_id}/cancel"] = {"post": _vllm_route("cancelResponse", body=None)}
    for item in (out["/v1/responses/{response_id}"]["get"],
                 out["/v1/responses/{response_id}/cancel"]["post"]):  # fmt: skip
        item["parameters"] = [*item["parameters"], _path_parameter("response_id")]
    retrieve = _vllm_route("retrieveModel", body=None)
    retrieve["parameters"] = [*retrieve["parameters"], _path_parameter("model")]
    out["/v1/models/{model}"] = {"get": retrieve}
    version = _open("version", "A worker's /version; the gateway's in X-Gateway-Version.",
                    {"200": _json({"type": "object"})})  # fmt: skip
    out["/version"] = {"get": version}
    return out


def paths() -> dict[str, Schema]:
    return {
        **_vllm_paths(),
        "/v1/chat/completions": {
            "post": _generation(
                "createChatCompletion", "ChatCompletionRequest", "ChatCompletion", stream=True
            )
        },
        "/v1/completions": {
            "post": _generation("createCompletion", "CompletionRequest", "Completion", stream=True)
        },
        "/v1/embeddings": {
            "post": _generation(
                "createEmbedding", "EmbeddingRequest", "EmbeddingList", stream=False
            )
        },
        "/v1/models": {"get": _models()},
        "/health": {
            "get": _open(
                "health",
                "Liveness: the process answers. It says nothing about workers.",
                {"200": _json(_status("ok"))},
            )
        },
        "/ready": {
            "get": _open(
                "ready",
                "Readiness: not draining, and a healthy worker to send requests to.",
                {
                    "200": _json(_status("ready")),
                    "503": _json(_status("draining", "no healthy worker"), "Not ready."),
                },
            )
        },
        "/metrics": {
            "get": _open(
                "metrics",
                "The gateway's Prometheus metrics.",
                {"200": _json({"type": "string"}, media="text/plain")},
            )
        },
        "/openapi.json": {
            "get": _open(
                "openapi",
                "This document.",
                {"200": _json({"type": "object", "required": ["openapi", "paths"]})},
            )
        },
    }


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The document for a gateway built from ``settings``: bearer auth only when it has keys,
    and the input limits it enforces as schema constraints (``maximum``)."""
    doc = _document()
    limits = settings.input if settings is not None else InputLimitSettings()
    schemas_ = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        fields = schemas_.get(name, {}).get("properties", {})
        for field_name, cap in (
            ("max_tokens", limits.max_tokens),
            ("max_completion_tokens", limits.max_tokens),
            ("n", limits.max_n),
        ):
            if cap is not None and field_name in fields:
                _cap(fields[field_name], cap)
    if settings is not None and not (settings.auth.keys or settings.auth.keys_file):
        del doc["components"]["securitySchemes"]
        for operations in doc["paths"].values():
            for operation in operations.values():
                operation.pop("security", None)
                operation["responses"].pop("401", None)
    return doc


def _cap(schema: Schema, cap: int) -> None:
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        schema["maximum"] = cap


def _document() -> dict[str, Any]:
    return {
        "openapi": VERSION,
        "info": {
            "title": "vllm-gateway",
            "version": "0.1.0",
            "description": "An OpenAI-compatible gateway in front of vLLM workers: streaming "
            "pass-through, bounded waits, backpressure, load-aware routing. Every error is "
            '`{"error": {"message", "type", "param", "code"}}`.',
        },
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from auth.keys or auth.keys_file. A gateway "
                    "without keys configured is open to anyone.",
                }
            },
        },
        "paths": paths(),
    }
