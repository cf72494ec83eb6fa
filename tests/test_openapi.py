"""The gateway's OpenAPI document: valid OpenAPI 3.1, served, and equal to what the app really
routes, reads and answers (its routes, the fields it checks, every status and code of the error
tree). ``tests/test_fuzz.py`` checks the answers of a running gateway against it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
import schemathesis

from gateway import errors
from gateway.app import create_app
from gateway.openapi import document
from gateway.settings import build_settings
from tests.conftest import GatewayFactory, SimFactory

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Each route's request schema and the fields the gateway reads from its body (request.py,
# usage.py, affinity.py, resume.py).
READ_FIELDS = {
    "ChatCompletionRequest": {"model", "messages", "stream", "stream_options", "n",
                              "max_tokens", "max_completion_tokens", "user", "logprobs",
                              "top_logprobs", "tools"},
    "CompletionRequest": {"model", "prompt", "stream", "stream_options", "n", "max_tokens"},
    "EmbeddingRequest": {"model", "input"},
}  # fmt: skip


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    return operations_of(document())


def operations_of(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def error_classes(cls: type[errors.GatewayError] = errors.GatewayError) -> Iterator[type[Any]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from error_classes(sub)


# --- valid ---------------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    # schemathesis validates against the OpenAPI 3.1 meta-schema; it raises on the first error.
    schemathesis.openapi.from_dict(doc).validate()


def test_the_validation_bites() -> None:
    broken = document()
    del broken["paths"]["/health"]["get"]["responses"]["200"]["description"]
    with pytest.raises(ValueError, match='"description" is a required property'):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_schema_is_valid_json_schema_2020_12() -> None:
    for name, schema in document()["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise AssertionError(f"{name}: {exc.message}") from None


def test_every_reference_resolves() -> None:
    doc = document()
    refs = list(_refs(doc))
    assert refs
    for ref in refs:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, ref
            node = node[part]


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_plain_json_and_a_fresh_tree() -> None:
    doc = document()
    assert orjson.loads(orjson.dumps(doc)) == doc
    # No node is shared, within the document or with the next one: a tool that edits what it
    # was given (schemathesis writes into schemas) cannot change what the gateway serves.
    seen = [id(node) for node in _nodes(doc)]
    assert len(seen) == len(set(seen))
    assert not set(seen) & {id(node) for node in _nodes(document())}


def _nodes(node: object) -> Iterator[object]:
    if isinstance(node, dict | list):
        yield node
        for value in node.values() if isinstance(node, dict) else node:
            yield from _nodes(value)


# --- equal to the app ----------------------------------------------------------------------------


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app = create_app(build_settings({"workers": [{"url": "http://w:1"}]}))
    routed = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, method, _ in operations()}
    assert routed == documented


def test_the_v1_routes_and_only_they_need_a_key() -> None:
    from gateway.middleware import _PROTECTED

    for path, method, operation in operations():
        expected: list[dict[str, list[str]]] | None = (
            [{"bearer": []}] if path.startswith("/v1/") or path in _PROTECTED else None
        )
        assert operation.get("security") == expected, (method, path)
    assert document()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_bearer_auth_only_when_keys_are_configured_and_caps_as_maximum() -> None:
    from gateway.settings import build_settings

    open_ = build_settings({"workers": [{"url": "http://w:1"}], "input": {"max_n": 4}})
    doc = document(open_)
    assert "securitySchemes" not in doc["components"]
    assert all("security" not in op for _, _, op in operations_of(doc))
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 4
    keyed = build_settings({"workers": [{"url": "http://w:1"}], "auth": {"keys": [
        {"name": "a", "key": "sk-test-0123456789"}]}})  # fmt: skip
    assert document(keyed)["components"]["securitySchemes"]


@pytest.mark.parametrize("name", list(READ_FIELDS))
def test_every_field_the_gateway_reads_is_documented(name: str) -> None:
    schema = document()["components"]["schemas"][name]
    assert READ_FIELDS[name] <= set(schema["properties"]), READ_FIELDS[name] - set(
        schema["properties"]
    )
    assert schema["required"][0] == "model"
    assert schema["additionalProperties"] is True  # vLLM takes many more; they pass through


def test_every_status_of_the_error_tree_is_documented_on_the_openai_routes() -> None:
    # 405 answers a method a path does not have: no documented operation can answer it.
    statuses = {str(cls.status) for cls in error_classes()} - {"405"}
    for path in OPENAI_ROUTES:
        documented = set(document()["paths"][path]["post"]["responses"])
        assert statuses <= documented, (path, statuses - documented)


def test_every_code_of_the_error_tree_is_named_under_its_status() -> None:
    responses = document()["paths"]["/v1/chat/completions"]["post"]["responses"]
    for cls in error_classes():
        if cls in (errors.MethodNotAllowed, errors.RouteNotFound, errors.UpstreamStatusError):
            continue  # no operation's answers; UpstreamStatusError's are the worker's own
        description = responses[str(cls.status)]["description"]
        assert cls.code in description, (cls.__name__, cls.status, cls.code)


def test_every_answer_has_its_headers_and_every_error_the_openai_shape() -> None:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, method, operation in operations():
        for status, response in operation["responses"].items():
            assert "X-Request-Id" in response["headers"], (method, path, status)
            if int(status) >= 400 and (path, status) != ("/ready", "503"):  # that one is a state
                assert response["content"] == error, (method, path, status)
    responses = document()["paths"]["/v1/chat/completions"]["post"]["responses"]
    limits = {f"x-ratelimit-{p}-{k}" for p in ("limit", "remaining", "reset")
              for k in ("requests", "tokens")}  # fmt: skip
    assert {"Retry-After", *limits} <= set(responses["429"]["headers"])
    assert limits <= set(responses["200"]["headers"])
    assert "Retry-After" in responses["503"]["headers"]


def test_streams_are_documented_where_the_route_can_stream() -> None:
    for path in OPENAI_ROUTES:
        content = document()["paths"][path]["post"]["responses"]["200"]["content"]
        assert ("text/event-stream" in content) == (path != "/v1/embeddings"), path


# --- served --------------------------------------------------------------------------------------


async def test_the_document_is_served_without_a_key(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), auth={"keys": [{"name": "a", "key": "sk-test-openapi-1"}]})
    async with client.get(f"{gw.url}/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == document()
