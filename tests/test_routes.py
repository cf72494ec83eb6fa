"""vLLM's routes beyond chat, completions and embeddings (issue 17), through the gateway to
scripted workers on real sockets: each answer equals the worker's own, bytes and status; a
stored response's follow-ups reach the worker holding it; admin routes need an admin key.
Real vLLM runs the same routes in ``tests/vllm/test_vllm_routes.py``."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.jsonsplice import loads, member_span, replace_member
from gateway.multipart import FieldFinder
from tests.conftest import GatewayFactory

pytestmark = pytest.mark.timeout(20)
MODEL = "base"
ADMIN_KEY = "admin-secret"
USER_KEY = "user-secret"


@dataclass
class FakeVllm:
    """A worker answering vLLM's routes with fixed shapes, recording what it was sent."""

    name: str
    adapters: list[str] = field(default_factory=list)
    stored: set[str] = field(default_factory=set)
    bodies: list[tuple[str, bytes, CIMultiDict[str]]] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/responses", self.create_response)
        app.router.add_get("/v1/responses/{id}", self.get_response)
        app.router.add_post("/v1/audio/transcriptions", self.transcribe)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/chat/completions", self.record_json)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.bodies.append((request.path, body, request.headers.copy()))
        return body

    async def models(self, request: web.Request) -> web.Response:
        cards = [{"id": MODEL, "object": "model", "root": MODEL, "parent": None}]
        cards += [
            {"id": a, "object": "model", "root": "/lora", "parent": MODEL} for a in self.adapters
        ]
        return web.json_response({"object": "list", "data": cards})

    async def tokenize(self, request: web.Request) -> web.Response:
        data = loads(await self._record(request))[0]
        tokens = [ord(c) for c in data.get("prompt", "")]
        return web.json_response({"count": len(tokens), "tokens": tokens, "max_model_len": 1024})

    async def record_json(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"error": {"message": "no", "type": "BadRequestError",
                                            "param": None, "code": 400}}, status=400)  # fmt: skip

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        data = loads(await self._record(request))[0]
        previous = data.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            message = f"Response with id '{previous}' not found."
            error = {"message": message, "type": "NotFoundError", "param": "previous", "code": 404}
            return web.json_response({"error": error}, status=404)
        response_id = f"resp_{self.name}{len(self.bodies)}"
        self.stored.add(response_id)
        if not data.get("stream"):
            return web.json_response({"id": response_id, "object": "response", "worker": self.name})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for kind in ("response.created", "response.output_text.delta", "response.completed"):
            event = {"type": kind, "response": {"id": response_id}}
            await out.write(f"event: {kind}\ndata: ".encode() + orjson.dumps(event) + b"\n\n")
        await out.write_eof()
        return out

    async def get_response(self, request: web.Request) -> web.Response:
        if request.match_info["id"] not in self.stored:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.json_response({"id": request.match_info["id"], "worker": self.name})

    async def transcribe(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.json_response({"text": hashlib.sha256(body).hexdigest()})

    async def load(self, request: web.Request) -> web.Response:
        data = loads(await self._record(request))[0]
        self.adapters.append(data["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{data['lora_name']}' added successfully.")


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeVllm]]:
    workers = [FakeVllm("a"), FakeVllm("b")]
    servers = []
    for worker in workers:
        server = TestServer(worker.app())
        await server.start_server()
        servers.append(server)
        worker.url = str(server.make_url("")).rstrip("/")
    yield workers
    for server in servers:
        await server.close()


async def _exchange(
    client: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, bytes]:
    async with client.request(method, url, **kwargs) as resp:
        return resp.status, await resp.read()


async def test_tokenize_equals_the_workers_answer(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url)
    body = {"model": MODEL, "prompt": "hello"}
    through = await _exchange(client, "POST", f"{gw.url}/tokenize", json=body)
    direct = await _exchange(client, "POST", f"{fakes[0].url}/tokenize", json=body)
    assert through == direct
    assert through[0] == 200


async def test_a_response_stream_passes_byte_for_byte(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """Typed events without [DONE] end the stream cleanly, as the worker sent them."""
    gw = await gateway(fakes[0].url)
    body = {"model": MODEL, "input": "hi", "stream": True}
    status, through = await _exchange(client, "POST", f"{gw.url}/v1/responses", json=body)
    _, direct = await _exchange(client, "POST", f"{fakes[0].url}/v1/responses", json=body)
    assert status == 200
    assert through.replace(b"resp_a1", b"resp_aN") == direct.replace(b"resp_a2", b"resp_aN")
    assert through.endswith(b'response.completed"}}\n\n') or b"response.completed" in through


async def test_stored_response_follow_ups_reach_its_holder(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """1. Each of two workers stores one response. 2. GET and previous_response_id for each
    reach the worker that holds it, whichever the balancer would pick."""
    gw = await gateway(fakes[0].url, fakes[1].url)
    ids: dict[str, str] = {}
    for _ in range(8):
        _, data = await _exchange(
            client, "POST", f"{gw.url}/v1/responses", json={"model": MODEL, "input": "x"}
        )
        answer = orjson.loads(data)
        ids.setdefault(answer["worker"], answer["id"])
        if len(ids) == 2:
            break
    assert set(ids) == {"a", "b"}
    for name, response_id in ids.items():
        status, data = await _exchange(client, "GET", f"{gw.url}/v1/responses/{response_id}")
        assert (status, orjson.loads(data)["worker"]) == (200, name)
        follow = {"model": MODEL, "input": "y", "previous_response_id": response_id}
        status, data = await _exchange(client, "POST", f"{gw.url}/v1/responses", json=follow)
        assert (status, orjson.loads(data)["worker"]) == (200, name)


async def test_unknown_and_lost_holders_are_clear_404s(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url, fakes[1].url)
    status, data = await _exchange(client, "GET", f"{gw.url}/v1/responses/resp_nowhere")
    assert status == 404
    assert orjson.loads(data)["error"]["code"] == "response_not_found"
    # Stored on a, found by asking the workers (another gateway process relayed it).
    fakes[0].stored.add("resp_elsewhere")
    status, data = await _exchange(client, "GET", f"{gw.url}/v1/responses/resp_elsewhere")
    assert (status, orjson.loads(data)["worker"]) == (200, "a")
    holder = next(w for w in gw.fleet.workers if w.url == fakes[0].url)
    gw.fleet.remove(holder)
    follow = {"model": MODEL, "input": "y", "previous_response_id": "resp_elsewhere"}
    status, data = await _exchange(client, "POST", f"{gw.url}/v1/responses", json=follow)
    assert status == 404
    assert orjson.loads(data)["error"]["code"] == "response_holder_lost"


async def test_audio_upload_streams_as_sent_and_routes_on_its_model_field(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url)
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode()
        + bytes(range(256)) * 400
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        f"{MODEL}\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    url = "/v1/audio/transcriptions"
    through = await _exchange(client, "POST", gw.url + url, data=body, headers=headers)
    direct = await _exchange(client, "POST", fakes[0].url + url, data=body, headers=headers)
    assert through == direct
    assert fakes[0].bodies[0][1] == body
    headers["Content-Type"] = "multipart/form-data; boundary=other"
    status, _ = await _exchange(client, "POST", gw.url + url, data=body, headers=headers)
    assert status == 200  # no model field found: the fleet's one model, the worker judges


async def test_model_retrieve_and_version(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url)
    status, data = await _exchange(client, "GET", f"{gw.url}/v1/models/{MODEL}")
    assert status == 200
    assert orjson.loads(data)["id"] == MODEL
    status, data = await _exchange(client, "GET", f"{gw.url}/v1/models/org/missing")
    assert (status, orjson.loads(data)["error"]["code"]) == (404, "model_not_found")
    async with client.get(f"{gw.url}/version") as resp:
        assert await resp.json() == {"version": "0.32.0"}
        assert resp.headers["X-Gateway-Version"]


async def test_lora_loading_needs_an_admin_key_and_reaches_every_worker(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    keys = [{"name": "admin", "key": ADMIN_KEY, "admin": True}, {"name": "user", "key": USER_KEY}]
    gw = await gateway(fakes[0].url, fakes[1].url, auth={"keys": keys})
    body = {"lora_name": "sql", "lora_path": "/lora/sql"}
    url = f"{gw.url}/v1/load_lora_adapter"
    for key in (USER_KEY,):
        headers = {"Authorization": f"Bearer {key}"}
        status, data = await _exchange(client, "POST", url, json=body, headers=headers)
        assert (status, orjson.loads(data)["error"]["code"]) == (403, "admin_key_required")
    assert not fakes[0].adapters
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    status, data = await _exchange(client, "POST", url, json=body, headers=headers)
    assert status == 200, data
    assert [f.adapters for f in fakes] == [["sql"], ["sql"]]
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    async with client.get(f"{gw.url}/v1/models", headers=headers) as resp:
        assert "sql" in {card["id"] for card in (await resp.json())["data"]}
    tokenize = {"model": "sql", "prompt": "a"}
    status, _ = await _exchange(
        client, "POST", f"{gw.url}/tokenize", json=tokenize, headers=headers
    )
    assert status == 200


async def test_an_open_gateway_keeps_its_admin_routes_shut(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url)
    body = {"lora_name": "sql", "lora_path": "/lora/sql"}
    status, _ = await _exchange(client, "POST", f"{gw.url}/v1/load_lora_adapter", json=body)
    assert status == 403
    assert not fakes[0].adapters


# --- the body as the client sent it ------------------------------------------------------------


WIDE = b'{"model": "base", "seed": 123456789012345678901234567890, "messages": [{"role": "user", "content": "\\ud800 x"}], "stream": true}'  # noqa: E501


async def test_a_usage_request_is_a_splice_that_keeps_every_other_byte(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url)
    headers = {"Content-Type": "application/json"}
    await _exchange(client, "POST", f"{gw.url}/v1/chat/completions", data=WIDE, headers=headers)
    sent = fakes[0].bodies[0][1]
    assert sent == WIDE[:-1] + b',"stream_options":{"include_usage":true}}'


def test_splices_replace_only_the_member_value() -> None:
    body = b'{"a": "}\\"stream_options\\":", "stream_options" : {"x": [1, {"y": 2}]} , "z": 1}'
    span = member_span(body, "stream_options")
    assert span is not None and body[span[0] : span[1]] == b'{"x": [1, {"y": 2}]}'
    assert replace_member(body, "stream_options", b"{}") == body.replace(
        b'{"x": [1, {"y": 2}]}', b"{}"
    )
    assert replace_member(b"{}", "model", b'"m"') == b'{"model":"m"}'
    assert replace_member(b'{"model": 1, "model": "x"}', "model", b'"m"') == (
        b'{"model": 1, "model": "m"}'
    )
    assert loads(WIDE)[0]["seed"] == 123456789012345678901234567890


def test_the_model_field_is_found_at_any_chunk_boundary() -> None:
    body = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--B\r\n'
        b'Content-Disposition: form-data; name="file"\r\n\r\nxx\r\n--B--\r\n'
    )
    for cut in range(1, len(body)):
        finder = FieldFinder(b"B")
        finder.feed(body[:cut])
        finder.feed(body[cut:])
        assert finder.value == "whisper-1", cut


# --- HTTP at the edges -------------------------------------------------------------------------


async def test_edges_allow_cors_encoding_and_one_request_id(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url)
    async with client.get(f"{gw.url}/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    async with client.options(f"{gw.url}/v1/chat/completions", headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    headers = {"Origin": "https://app.example"}
    async with client.get(f"{gw.url}/v1/models", headers=headers) as resp:
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
    body = orjson.dumps({"model": MODEL, "messages": []})
    encoded = {"Content-Type": "application/json", "Content-Encoding": "foo"}
    status, data = await _exchange(
        client, "POST", f"{gw.url}/v1/chat/completions", data=body, headers=encoded
    )
    assert (status, orjson.loads(data)["error"]["code"]) == (415, "unsupported_content_encoding")
    sent = {"Content-Type": "application/json", "X-Request-Id": "mine", "Connection": "X-Hop",
            "X-Hop": "1"}  # fmt: skip
    await _exchange(client, "POST", f"{gw.url}/v1/chat/completions", data=body, headers=sent)
    got = fakes[0].bodies[-1][2]
    assert got.getall("X-Request-Id") == ["mine"]
    assert "X-Hop" not in got


async def test_cors_off_leaves_preflights_unanswered(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(fakes[0].url, cors={"allow_origins": []})
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with client.options(f"{gw.url}/v1/chat/completions", headers=preflight) as resp:
        assert resp.status == 405
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_pass_through_routes_count_against_the_keys_limits(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A key's rpm holds across the proxy's routes and the pass-through ones alike: once it is
    spent, a Responses request is refused by the gateway and never reaches the worker."""
    keys = [{"name": "user", "key": USER_KEY, "rpm": 2}]
    gw = await gateway(fakes[0].url, auth={"keys": keys})
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    body = {"model": MODEL, "input": "hi"}
    async with client.post(f"{gw.url}/v1/responses", json=body, headers=auth) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "2"
        assert resp.headers["x-ratelimit-remaining-requests"] == "1"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat, headers=auth) as resp:
        assert resp.status == 400  # the fake worker's own answer: admitted, and counted
    sent = len(fakes[0].bodies)
    async with client.post(f"{gw.url}/v1/responses", json=body, headers=auth) as resp:
        assert resp.status == 429
        assert "Retry-After" in resp.headers
        assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    assert len(fakes[0].bodies) == sent


async def test_a_pass_through_requests_tokens_are_estimated_as_the_proxys(
    fakes: list[FakeVllm], gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """tpm: a Responses request asking for more output tokens than the key's minute holds is
    refused, as a chat request asking for them would be."""
    keys = [{"name": "user", "key": USER_KEY, "tpm": 1000}]
    gw = await gateway(fakes[0].url, auth={"keys": keys})
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    small = {"model": MODEL, "input": "hi", "max_output_tokens": 10}
    async with client.post(f"{gw.url}/v1/responses", json=small, headers=auth) as resp:
        assert resp.status == 200
    large = {"model": MODEL, "input": "hi", "max_output_tokens": 5000}
    async with client.post(f"{gw.url}/v1/responses", json=large, headers=auth) as resp:
        assert resp.status == 429, await resp.text()
