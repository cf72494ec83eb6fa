"""vLLM's routes beyond chat, completions and embeddings: which path goes where, and the thin
handlers that read what routing needs (the model, a stored response's id) and hand over.

- JSON routes with one JSON answer (tokenize, pooling, score, rerank, ...) go through the
  proxy, like embeddings.
- The Responses API, Anthropic's Messages, audio uploads and ``/version`` go through
  ``passthrough``. A stored response's follow-ups (``GET``, cancel, ``previous_response_id``)
  go to the worker holding it (``holders``).
- LoRA adapter loading and unloading (``admin``, registered beside these) need an admin key
  and go to every worker of the base model.
- ``GET /v1/models/{id}`` is answered from the fleet's model list (vLLM serves no such route).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from gateway import __version__, keys
from gateway.errors import (
    InvalidField,
    InvalidJSON,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RequestBodyTimeout,
    ResponseHolderLost,
    ResponseHolderUnavailable,
    ResponseNotFound,
    UnsupportedMediaType,
    UpstreamError,
)
from gateway.holders import ResponseHolders, response_id_in
from gateway.jsonsplice import BodyError, loads
from gateway.middleware import REQUEST_ID
from gateway.multipart import FieldFinder, boundary_of
from gateway.passthrough import Passthrough
from gateway.request import JSON_ROUTES, Route, default_model_var, lax_int, request_model
from gateway.upstream import passthrough_headers
from gateway.workers import Fleet, Worker

PASSTHROUGH = web.AppKey("passthrough", Passthrough)
HOLDERS = web.AppKey("response_holders", ResponseHolders)
GATEWAY_VERSION_HEADER = "X-Gateway-Version"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def register(app: web.Application, expect: ExpectHandler) -> None:
    """Adds the routes; ``expect`` is the ``Expect`` header handler every route uses."""
    app[HOLDERS] = ResponseHolders()
    for route in JSON_ROUTES:
        app.router.add_post(route.path, proxied(route), expect_handler=expect)
    posts: dict[str, Handler] = {
        "/v1/responses": create_response,
        "/v1/responses/{response_id}/cancel": cancel_response,
        "/v1/messages": messages,
        "/v1/audio/transcriptions": audio,
        "/v1/audio/translations": audio,
    }
    gets: dict[str, Handler] = {
        "/v1/responses/{response_id}": get_response,
        "/v1/models/{model:.+}": get_model,
        "/version": version,
    }
    for path, handler in posts.items():
        app.router.add_post(path, handler, expect_handler=expect)
    for path, handler in gets.items():
        app.router.add_get(path, handler, expect_handler=expect)


def default_model(fleet: Fleet) -> str | None:
    """The model a request without one goes to: the fleet's one base model, if it has one
    (adapters, which name a ``parent``, do not count), as vLLM serves its one model."""
    bases = {str(c["id"]) for c in fleet.model_cards() if not c.get("parent")}
    return bases.pop() if len(bases) == 1 else None


def proxied(route: Route) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        token = default_model_var.set(functools.partial(default_model, request.app[keys.FLEET]))
        try:
            return await request.app[keys.PROXY].handle(request, route)
        finally:
            default_model_var.reset(token)

    handler.__name__ = route.name
    return handler


# --- request bodies ---------------------------------------------------------------------------


async def read_body(request: web.Request) -> bytes:
    """The whole body, bounded by ``server.max_body_bytes`` and, while it arrives, by the idle
    timeout."""
    settings = request.app[keys.SETTINGS]
    limit = settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            async with asyncio.timeout(settings.timeouts.idle):
                chunk = await request.content.readany()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(limit)
            parts.append(chunk)
    except TimeoutError:
        raise RequestBodyTimeout() from None
    except web.RequestPayloadError:
        raise InvalidRequest("The request body could not be read as sent.") from None


async def json_body(request: web.Request) -> tuple[bytes, dict[str, object]]:
    if request.content_type != "application/json":
        raise UnsupportedMediaType()
    body = await read_body(request)
    try:
        data, _ = loads(body)
    except BodyError:
        raise InvalidJSON() from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body, data


def token_estimate(body: bytes, data: dict[str, object], field: str) -> int:
    """For the key's token limits, as the proxy estimates: the body's bytes / 4 plus the
    output tokens asked for (``field``: the route's name for them), read as the worker would."""
    return len(body) // 4 + max(lax_int(data.get(field)) or 0, 0)


def model_of(request: web.Request, data: dict[str, object]) -> str:
    token = default_model_var.set(functools.partial(default_model, request.app[keys.FLEET]))
    try:
        return request_model(data)
    finally:
        default_model_var.reset(token)


# --- the Responses API ------------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    body, data = await json_body(request)
    model = model_of(request, data)
    passthrough = request.app[PASSTHROUGH]
    previous = data.get("previous_response_id")
    if isinstance(previous, str) and previous:
        worker = await holder(request, previous, "previous_response_id")
    else:
        worker = passthrough.pick(model)
    holders = request.app[HOLDERS]
    return await passthrough.forward(
        request, worker, "responses", model, body=body, on_answer=_remember(holders),
        tokens=token_estimate(body, data, "max_output_tokens"),
    )  # fmt: skip


async def get_response(request: web.Request) -> web.StreamResponse:
    response_id = request.match_info["response_id"]
    worker = await holder(request, response_id, "response_id")
    model = worker.models[0] if worker.models else ""
    passthrough = request.app[PASSTHROUGH]
    return await passthrough.forward(request, worker, "responses", model, method="GET")


async def cancel_response(request: web.Request) -> web.StreamResponse:
    response_id = request.match_info["response_id"]
    body = await read_body(request)
    worker = await holder(request, response_id, "response_id")
    model = worker.models[0] if worker.models else ""
    passthrough = request.app[PASSTHROUGH]
    return await passthrough.forward(request, worker, "responses", model, body=body)


def _remember(holders: ResponseHolders) -> Callable[[bytes, Worker], None]:
    def remember(head: bytes, worker: Worker) -> None:
        response_id = response_id_in(head)
        if response_id is not None:
            holders.remember(response_id, worker.url)

    return remember


async def holder(request: web.Request, response_id: str, param: str) -> Worker:
    """The worker holding a stored response: remembered, else found by asking every worker
    in rotation (the id may come from another gateway process or replica)."""
    fleet = request.app[keys.FLEET]
    holders = request.app[HOLDERS]
    url = holders.holder(response_id)
    if url is None:
        found = await _search(request, response_id)
        if found is None:
            raise ResponseNotFound(response_id, param)
        holders.remember(response_id, found.url)
        return found
    worker = next((w for w in fleet.workers if w.url == url), None)
    if worker is None:
        holders.forget(response_id)
        raise ResponseHolderLost(response_id, param)
    if not worker.in_rotation:
        raise ResponseHolderUnavailable(retry_after=request.app[keys.SETTINGS].limits.retry_after)
    return worker


async def _search(request: web.Request, response_id: str) -> Worker | None:
    if "/" in response_id or "?" in response_id:
        return None
    workers = [w for w in request.app[keys.FLEET].workers if w.in_rotation]
    upstream = request.app[PASSTHROUGH].upstream
    settings = request.app[keys.SETTINGS]

    async def holds(worker: Worker) -> bool:
        headers = passthrough_headers((), request[REQUEST_ID])
        try:
            async with asyncio.timeout(settings.health.timeout):
                answer = await upstream.open(
                    "GET", worker, f"/v1/responses/{response_id}", headers, None
                )
                answer.close()
        except (UpstreamError, TimeoutError):
            return False  # a worker that cannot answer does not hold it
        return answer.status == 200

    found = await asyncio.gather(*(holds(w) for w in workers))
    return next((w for w, yes in zip(workers, found, strict=True) if yes), None)


# --- Messages, audio, version -----------------------------------------------------------------


async def messages(request: web.Request) -> web.StreamResponse:
    body, data = await json_body(request)
    model = model_of(request, data)
    passthrough = request.app[PASSTHROUGH]
    worker = passthrough.pick(model)
    tokens = token_estimate(body, data, "max_tokens")
    return await passthrough.forward(request, worker, "messages", model, body=body, tokens=tokens)


async def audio(request: web.Request) -> web.StreamResponse:
    """Multipart upload: read up to the ``model`` field, then stream the rest as it comes."""
    settings = request.app[keys.SETTINGS]
    limit = settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    boundary = boundary_of(request.headers.get("Content-Type", ""))
    if request.content_type != "multipart/form-data" or boundary is None:
        raise UnsupportedMediaType("Content-Type must be multipart/form-data.")
    finder = FieldFinder(boundary)
    head: list[bytes] = []
    size = 0
    try:
        while not finder.value:
            async with asyncio.timeout(settings.timeouts.idle):
                chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(limit)
            head.append(chunk)
            finder.feed(chunk)
    except TimeoutError:
        raise RequestBodyTimeout() from None
    model = finder.value or default_model(request.app[keys.FLEET])
    if not model:
        raise InvalidField("'model' is required.", param="model")
    passthrough = request.app[PASSTHROUGH]
    worker = passthrough.pick(model)
    route = request.path.rsplit("/", 1)[-1]
    body = _rest(request, head, size, limit)
    return await passthrough.forward(request, worker, route, model, body=body)


async def _rest(
    request: web.Request, head: list[bytes], size: int, limit: int
) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        yield chunk


async def version(request: web.Request) -> web.StreamResponse:
    """A worker's ``/version`` as it answers it, with the gateway's own in a header; the
    gateway's alone when no worker is up."""
    fleet = request.app[keys.FLEET]
    workers = [w for w in fleet.workers if w.in_rotation]
    response: web.StreamResponse
    if not workers:
        body = orjson.dumps({"version": None, "gateway_version": __version__})
        response = web.Response(body=body, content_type="application/json")
    else:
        worker = min(workers, key=lambda w: w.in_flight)
        passthrough = request.app[PASSTHROUGH]
        model = worker.models[0] if worker.models else ""
        response = await passthrough.forward(
            request, worker, "version", model, method="GET", tokens=None
        )
    response.headers[GATEWAY_VERSION_HEADER] = __version__
    return response


# --- models -----------------------------------------------------------------------------------


async def get_model(request: web.Request) -> web.Response:
    """One model card, as in ``/v1/models``; the OpenAI SDK's ``models.retrieve``."""
    wanted = request.match_info["model"]
    for card in request.app[keys.FLEET].model_cards():
        if card.get("id") == wanted:
            data = {"object": "model", "owned_by": "vllm", **card}
            return web.Response(body=orjson.dumps(data), content_type="application/json")
    raise ModelNotFound(wanted)
