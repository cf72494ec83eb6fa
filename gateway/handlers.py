"""Thin endpoint handlers: the OpenAI routes hand over to the proxy; the rest answer locally."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import keys, openapi
from gateway.request import CHAT, COMPLETIONS, EMBEDDINGS
from gateway.routes import proxied
from gateway.settings import Settings

chat_completions = proxied(CHAT)
completions = proxied(COMPLETIONS)
embeddings = proxied(EMBEDDINGS)


async def list_models(request: web.Request) -> web.Response:
    """The union of the models served by healthy workers, in OpenAI's list shape."""
    cards = request.app[keys.FLEET].model_cards()
    now = int(time.time())
    data = [{"object": "model", "created": now, "owned_by": "vllm", **card} for card in cards]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. It says nothing about workers, by design."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: not draining, and at least one healthy worker to send requests to."""
    lifecycle = request.app[keys.LIFECYCLE]
    if lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not request.app[keys.FLEET].any_healthy():
        return web.json_response({"status": "no healthy worker"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    # Rendering every series (and, with several serving processes, reading their files) is
    # work the event loop must not wait on: a thread does it.
    loop = asyncio.get_running_loop()
    metrics = request.app[keys.METRICS]
    metrics.flush()  # the batched updates, here on the loop's thread
    body = await loop.run_in_executor(None, metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_document(request: web.Request) -> web.Response:
    """The gateway's own OpenAPI document (routes, request bodies, error responses)."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


OPENAPI = web.AppKey("openapi", bytes)


def openapi_bytes(settings: Settings) -> bytes:
    return orjson.dumps(openapi.document(settings))
