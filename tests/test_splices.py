"""The gateway's body edits are byte splices (issue 17, "forward the client's bytes").

1. An array member's items are found at every nesting and quoting (``item_spans``), and a body
   cut to a slice of them keeps every other byte (``slice_member``).
2. Asking for token ids (resume) appends one member and keeps every other byte.
3. An embeddings batch fanned out to two workers: each receives the client's bytes of its slice,
   a 30-digit integer and a lone ``\\ud800`` included, and the client gets the merged answer
   (this was a 500: the fan-out re-read the body with orjson).
4. Bodies only Python's JSON parser reads (vLLM's), on every OpenAI route, streamed or not: the
   worker's answer or a 4xx, never a 5xx from the gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.jsonsplice import item_spans, loads, member_span, replace_member, slice_member
from gateway.resume import ask_for_token_ids
from tests.conftest import GatewayFactory, SimFactory

pytestmark = pytest.mark.timeout(20)

MODEL = "base"
JSON = {"Content-Type": "application/json"}
WIDE_INT = b"123456789012345678901234567890"


def test_array_items_are_found_whatever_their_quoting_and_nesting() -> None:
    body = b'{"input" : [ "a, [b]" ,{"x": [1, 2]},[3,[4]],  "d\\"]" ,null ] , "k": 1}'
    span = member_span(body, "input")
    assert span is not None
    items = item_spans(body, span)
    assert items is not None
    assert [body[a:b] for a, b in items] == [
        b'"a, [b]"', b'{"x": [1, 2]}', b"[3,[4]]", b'"d\\"]"', b"null"
    ]  # fmt: skip
    assert item_spans(b'{"input": []}', (10, 12)) == []
    assert item_spans(b'{"input": "text"}', (10, 16)) is None


def test_a_slice_of_an_array_member_keeps_every_other_byte() -> None:
    body = b'{"input": [1, "two" ,  [3]], "input": ["a","b" , "c"], "user": ' + WIDE_INT + b"}"
    parts = slice_member(body, "input", [slice(0, 2), slice(2, 4), slice(5, 9)])
    assert parts == [
        body.replace(b'["a","b" , "c"]', b'["a","b"]'),
        body.replace(b'["a","b" , "c"]', b'["c"]'),
        body.replace(b'["a","b" , "c"]', b"[]"),
    ]  # the last "input" is the one Python's parser keeps
    assert slice_member(body, "absent", [slice(0, 1)]) is None


def test_asking_for_token_ids_appends_one_member() -> None:
    body = b'{ "temperature" : 1.50, "seed": ' + WIDE_INT + b', "messages": [] }'
    assert ask_for_token_ids(body, loads(body)[0]) == body[:-1] + b',"return_token_ids":true}'
    no = b'{"return_token_ids": false, "messages": []}'
    assert ask_for_token_ids(no, loads(no)[0]) == b'{"return_token_ids": true, "messages": []}'
    assert ask_for_token_ids(b'{"return_token_ids": true}', {"return_token_ids": True}) is None


def test_a_member_the_parsed_body_lacks_is_appended_and_one_it_has_is_replaced() -> None:
    """With the parsed body at hand, a member it lacks is appended without scanning the bytes
    (its name inside a string is no member); one it has, under an escaped name too, has its
    value's bytes replaced, every other byte the client's."""
    body = b'{"a": "\\"stream_options\\": 1", "messages": []}'
    assert replace_member(body, "stream_options", b"{}", loads(body)[0]) == (
        body[:-1] + b',"stream_options":{}}'
    )
    escaped = b'{"stream\\u005foptions" : {"x": 1} , "n": 1}'
    assert replace_member(escaped, "stream_options", b"{}", loads(escaped)[0]) == (
        b'{"stream\\u005foptions" : {} , "n": 1}'
    )


# --- through the gateway -----------------------------------------------------------------------


class Recorder:
    """A worker that records every body and answers embeddings for what it was sent, and any
    other route with vLLM's 400."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/chat/completions", self.refuse)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        inputs = json.loads(body)["input"]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(i)]} for i in range(len(inputs))
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return web.json_response({"object": "list", "model": MODEL, "data": data, "usage": usage})

    async def refuse(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        error = {"message": "no", "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response({"error": error}, status=400)


@pytest.fixture
async def recorders() -> AsyncIterator[list[tuple[str, Recorder]]]:
    out: list[tuple[str, Recorder]] = []
    servers: list[TestServer] = []
    for _ in range(2):
        recorder = Recorder()
        server = TestServer(recorder.app())
        await server.start_server()
        servers.append(server)
        out.append((str(server.make_url("")).rstrip("/"), recorder))
    yield out
    for server in servers:
        await server.close()


async def test_embedding_shards_are_the_clients_bytes(
    recorders: list[tuple[str, Recorder]],
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    workers = [{"url": url, "models": [MODEL]} for url, _ in recorders]
    gw = await gateway(*workers, routing={"embedding_shard_size": 2})
    body = (
        b'{"model": "base", "input": ["a, [b]", "\\ud800" ,"c" ,  "d\\"]"], "user": '
        + WIDE_INT
        + b"}"
    )
    async with client.post(f"{gw.url}/v1/embeddings", data=body, headers=JSON) as response:
        answer = await response.read()
    assert response.status == 200, answer
    assert [d["index"] for d in orjson.loads(answer)["data"]] == [0, 1, 2, 3]
    sent = sorted(b for _, recorder in recorders for b in recorder.bodies)
    items = b'"a, [b]", "\\ud800" ,"c" ,  "d\\"]"'
    assert sent == sorted(
        [
            body.replace(items, b'"a, [b]", "\\ud800"'),
            body.replace(items, b'"c" ,  "d\\"]"'),
        ]
    )


async def test_asking_for_token_ids_on_the_wire_is_a_splice(
    recorders: list[tuple[str, Recorder]],
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    url, recorder = recorders[0]
    gw = await gateway({"url": url, "models": [MODEL]}, resume={"enabled": True})
    body = b'{"model": "base", "temperature": 1.50, "stream": true, "messages": [{"role": "user", "content": "hi"}] }'  # noqa: E501
    async with client.post(f"{gw.url}/v1/chat/completions", data=body, headers=JSON) as response:
        await response.read()
    assert response.status == 400
    added = b',"stream_options":{"include_usage":true},"return_token_ids":true'
    assert recorder.bodies == [body[:-1] + added + b"}"]


PYTHON_ONLY = [
    b'{"model": "sim-model", "seed": ' + WIDE_INT + b", %s}",
    b'{"model": "sim-model", "user": "\\ud800", %s}',
    b'{"model": "sim-model", "temperature": NaN, %s}',
]
ROUTES = {
    "/v1/chat/completions": b'"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2',
    "/v1/completions": b'"prompt": "hi", "max_tokens": 2',
    "/v1/embeddings": b'"input": ["a", "b", "c"]',
}


@pytest.mark.parametrize("stream", [b"true", b"false"])
@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("template", PYTHON_ONLY, ids=["wide int", "lone surrogate", "NaN"])
async def test_bodies_only_python_reads_are_never_a_gateway_5xx(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    template: bytes,
    path: str,
    stream: bytes,
) -> None:
    a, b = await sim(), await sim()
    gw = await gateway(a, b, routing={"embedding_shard_size": 1}, resume={"enabled": True})
    body = template % (ROUTES[path] + b', "stream": ' + stream)
    async with client.post(gw.url + path, data=body, headers=JSON) as response:
        answer = await response.read()
    assert response.status < 500, (response.status, answer)
    if response.status >= 400:
        assert isinstance(orjson.loads(answer)["error"]["message"], str)
