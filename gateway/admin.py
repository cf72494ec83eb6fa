"""Admin routes: loading and unloading LoRA adapters on the workers.

vLLM serves ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` to anyone who can reach
it; through the gateway they need a key with ``admin: true`` (refused even when the gateway
has no keys, so an open gateway never opens these). One call goes to every worker in rotation
that serves the base model, so the adapter is routable wherever the model is; the workers are
then probed again so ``/v1/models`` lists (or drops) the adapter at once.

The base model is the ``model`` query parameter (the gateway's, not forwarded), else the
adapter's ``parent`` in the model list (unload), else the fleet's one model.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import keys
from gateway.errors import (
    AdminKeyRequired,
    InvalidField,
    ModelNotFound,
    NoHealthyWorker,
    UpstreamStatusError,
)
from gateway.middleware import CLIENT, REQUEST_ID
from gateway.routes import PASSTHROUGH, default_model, json_body
from gateway.upstream import passthrough_headers
from gateway.workers import Fleet, Worker

ANSWER_LIMIT = 64 * 1024
PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


async def lora_adapter(request: web.Request) -> web.Response:
    if not request[CLIENT].admin:
        raise AdminKeyRequired()
    body, data = await json_body(request)
    fleet = request.app[keys.FLEET]
    base = _base_model(request, fleet, data)
    workers = [w for w in fleet.pool(base) if w.in_rotation]
    if not workers:
        raise NoHealthyWorker(retry_after=request.app[keys.SETTINGS].limits.retry_after)
    answers = await asyncio.gather(
        *(_send(request, w, body) for w in workers), return_exceptions=True
    )
    await _probe_again(request, workers)
    done: list[tuple[int, bytes, str]] = []
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer  # the first failure; the others' outcome is in the log and models
        if answer[0] >= 400:
            raise UpstreamStatusError(answer[0], answer[1], {})
        done.append(answer)
    status, text, content_type = done[0]
    response = web.Response(status=status, body=text)
    response.headers["Content-Type"] = content_type
    response.headers["X-Gateway-Workers"] = str(len(workers))
    return response


def _base_model(request: web.Request, fleet: Fleet, data: dict[str, object]) -> str:
    asked = request.query.get("model")
    if asked:
        if not fleet.serves(asked):
            raise ModelNotFound(asked)
        return asked
    name = data.get("lora_name")
    for card in fleet.model_cards():
        if card.get("id") == name and isinstance(card.get("parent"), str):
            return str(card["parent"])
    only = default_model(fleet)
    if only is None:
        raise InvalidField(
            "Several models are served: name the base model as ?model=<name>.", param="model"
        )
    return only


async def _send(request: web.Request, worker: Worker, body: bytes) -> tuple[int, bytes, str]:
    upstream = request.app[PASSTHROUGH].upstream
    headers = passthrough_headers(request.raw_headers, request[REQUEST_ID])
    async with asyncio.timeout(request.app[keys.SETTINGS].timeouts.total):
        answer = await upstream.open("POST", worker, request.path, headers, body)
        try:
            text = await answer.read_all(ANSWER_LIMIT)
        finally:
            answer.close()
    return answer.status, text, answer.headers.get("Content-Type", "text/plain")


async def _probe_again(request: web.Request, workers: list[Worker]) -> None:
    fleet = request.app[keys.FLEET]
    upstream = request.app[PASSTHROUGH].upstream
    results = await asyncio.gather(*(upstream.probe(w) for w in workers))
    for worker, result in zip(workers, results, strict=True):
        fleet.apply_probe(worker, result)


__all__ = ["PATHS", "lora_adapter"]
