"""The gateway's OpenAPI document: served, loadable by an OpenAPI tool, and equal to what the
app really routes and answers."""

from __future__ import annotations

import aiohttp
import schemathesis

from gateway import errors
from gateway.app import create_app
from gateway.openapi import document
from gateway.settings import build_settings
from tests.conftest import GatewayFactory, SimFactory

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app = create_app(build_settings({"workers": [{"url": "http://w:1"}]}))
    routed = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in document()["paths"].items() for method in item}
    assert routed == documented


def test_schemathesis_loads_the_document_and_sees_every_operation() -> None:
    schema = schemathesis.openapi.from_dict(document())
    operations = {(r.ok().method, r.ok().path) for r in schema.get_all_operations()}
    assert len(operations) == len({(m, p) for p, i in document()["paths"].items() for m in i})


def test_every_status_the_error_tree_can_send_is_documented_on_the_openai_routes() -> None:
    # 405 answers a method the path does not have, so no documented operation can return it.
    statuses = {str(cls.status) for cls in _error_classes(errors.GatewayError)} - {"405"}
    for path in OPENAI_ROUTES:
        documented = set(document()["paths"][path]["post"]["responses"])
        assert statuses <= documented, (path, statuses - documented)
    for status in ("429", "503"):
        headers = document()["paths"]["/v1/chat/completions"]["post"]["responses"][status][
            "headers"
        ]
        assert "Retry-After" in headers


def _error_classes(cls: type[errors.GatewayError]) -> list[type[errors.GatewayError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _error_classes(sub)
    return out


async def test_openapi_json_is_served_and_open(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim(), auth={"keys": [{"name": "a", "key": "sk-test-openapi-1"}]})
    async with client.get(f"{gw.url}/openapi.json") as resp:
        assert resp.status == 200
        assert await resp.json() == document()
