"""The aiohttp application of one simulated vLLM worker: routes, request-level faults, the
shutdown that aborts in-flight requests as vLLM's does, and the app keys that hold its state
(no module globals: each `create_app` is independent).

Like vLLM, the worker adopts an incoming `X-Request-Id` as the base of the response id
(`chatcmpl-<id>`) and does not echo the header.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.kvwire import rank_endpoint
from gateway.prompttokens import Tokenizes, prompt_token_ids

from . import shapes
from .abort import Shutdown
from .config import FaultSpec, FaultSpecError, SimConfig, parse_fault
from .engine import Engine
from .errors import SimError, bad_request
from .generate import Sim, complete, forever, overloaded
from .kvpublish import EventPublisher
from .metrics import SimMetrics
from .once import Claims
from .prefix_cache import PrefixCache
from .protocol import GenerationRequest, parse_chat, parse_completion, parse_embedding
from .streaming import stream
from .text import embedding

SIM = web.AppKey("sim", Sim)
ENGINE = web.AppKey("sim_engine", Engine)
CLAIMS = web.AppKey("sim_claims", Claims)
FAULT_HEADER = "X-Sim-Fault"
REQUEST_ID_HEADER = "X-Request-Id"
NO_FAULT = FaultSpec()

Parser = Callable[[dict[str, Any], SimConfig], GenerationRequest]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    config: SimConfig, registry: CollectorRegistry | None = None, claims: Claims | None = None
) -> web.Application:
    """A worker serving `config.models`; metrics go to `registry` (a fresh one by default).

    `claims` is what `once` faults remember; pass one object to every worker of a fleet (a
    fresh one, private to this worker, by default).
    """
    registry = registry if registry is not None else CollectorRegistry()
    engine = Engine(config.max_num_seqs, config.kv_cache_tokens, config.max_num_queued_reqs)
    metrics = SimMetrics(registry, engine, config.models)
    app = web.Application(middlewares=[_sim_errors])
    caches = tuple(
        PrefixCache(config.prefix_cache_blocks, config.block_tokens)
        for _ in range(config.data_parallel_size)
    )
    shutdown = Shutdown()
    tokenizer = _tokenizer(config.tokenizer) if config.tokenizer is not None else None
    turns = itertools.cycle(range(config.data_parallel_size))
    app[SIM] = Sim(config, engine, metrics, registry, caches, shutdown, turns, tokenizer)
    app[ENGINE] = engine
    app[CLAIMS] = claims if claims is not None else Claims()
    app.on_shutdown.append(lambda _: _start_shutdown(shutdown))
    if config.kv_events_endpoint is not None:
        app.cleanup_ctx.append(lambda _: _kv_events(config, caches))
    app.add_routes(
        [
            web.post("/v1/chat/completions", chat_completions),
            web.post("/v1/completions", completions),
            web.post("/v1/embeddings", embeddings),
            web.get("/v1/models", models),
            web.get("/health", health),
            web.get("/metrics", metrics_text),
            web.get("/version", version),
            web.get("/kv_event_sources", kv_event_sources),
            web.post("/sim/prefix_cache/match", prefix_cache_match),
        ]
    )
    return app


@web.middleware
async def _sim_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimError as exc:
        return exc.response()


def _tokenizer(path: str) -> Tokenizes:
    """The model's tokenizer for the prefix cache's ids (needs the `tokenizer` extra)."""
    from gateway.tokenizer import PromptTokenizer

    return PromptTokenizer(Path(path))


async def _kv_events(config: SimConfig, caches: tuple[PrefixCache, ...]) -> AsyncIterator[None]:
    """Publishes each rank's prefix cache changes while the app runs (binds at start-up)."""
    endpoint, replay = config.kv_events_endpoint, config.kv_events_replay_endpoint
    assert endpoint is not None
    publishers = []
    try:
        for rank, cache in enumerate(caches):
            publisher = EventPublisher(
                rank_endpoint(endpoint, rank),
                rank_endpoint(replay, rank) if replay is not None else None,
                config.kv_events_topic,
                rank=rank,
            )
            publishers.append(publisher)
            publisher.start()
            cache.on_events = publisher.publish
        yield
    finally:
        for cache in caches:
            cache.on_events = None
        for publisher in publishers:
            await publisher.close()


async def _start_shutdown(shutdown: Shutdown) -> None:
    """aiohttp runs this before it waits for the handlers: in-flight requests end with vLLM's
    abort (see `abort.py`) instead of running to completion or being cut."""
    shutdown.start()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat, "chatcmpl")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion, "cmpl")


async def _generate(request: web.Request, parse: Parser, prefix: str) -> web.StreamResponse:
    sim = request.app[SIM]
    fault = await _request_fault(request, sim.config)
    body = await _json_body(request)
    gen = replace(parse(body, sim.config), dp_rank=_rank(request, sim))
    if sim.tokenizer is not None:
        ids = prompt_token_ids(body, sim.tokenizer)
        if ids:
            gen = replace(gen, cache_ids=tuple(ids))
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    fingerprint = system_fingerprint(sim.config)
    header = shapes.Header(gen.kind, f"{prefix}-{request_id}", gen.model, shapes.now(), fingerprint)
    if gen.stream:
        return await stream(request, sim, gen, fault, header)
    return await complete(request, sim, gen, fault, header)


async def embeddings(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    await _request_fault(request, sim.config)
    req = parse_embedding(await _json_body(request), sim.config)
    vectors = [embedding(item, sim.config.embedding_dim) for item in req.inputs]
    body = shapes.embeddings(req.model, vectors, req.prompt_tokens, req.base64)
    return _json(body)


async def models(request: web.Request) -> web.Response:
    config = request.app[SIM].config
    body = shapes.model_list(config.models, config.max_model_len, shapes.now())
    return _json(body)


async def health(request: web.Request) -> web.Response:
    """200 with an empty body; 503 when the engine is dead (the only fault /health obeys)."""
    fault = _spec(request, request.app[SIM].config)
    return web.Response(status=503 if fault.dead and not fault.once else 200)


async def metrics_text(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[SIM].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def version(request: web.Request) -> web.Response:
    return _json({"version": request.app[SIM].config.version})


async def kv_event_sources(request: web.Request) -> web.Response:
    """As vLLM answers it: each data-parallel rank's publisher settings as configured (its
    endpoints offset by the rank), keyed by rank; {} when events are off."""
    config = request.app[SIM].config
    endpoint, replay = config.kv_events_endpoint, config.kv_events_replay_endpoint
    if endpoint is None:
        return _json({})
    return _json(
        {
            str(rank): {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": rank_endpoint(endpoint, rank),
                "replay_endpoint": rank_endpoint(replay, rank) if replay is not None else None,
                "topic": config.kv_events_topic,
            }
            for rank in range(config.data_parallel_size)
        }
    )


async def prefix_cache_match(request: web.Request) -> web.Response:
    """Simulator only, for the routing benchmark's oracle: how many leading tokens of
    ``token_ids`` (as the model's tokenizer makes them) this worker's prefix cache holds for
    ``model``, exactly and now. Changes nothing."""
    body = await _json_body(request)
    ids, model = body.get("token_ids"), body.get("model")
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise bad_request("token_ids must be a list of integers", "token_ids")
    if not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    rank = body.get("rank", 0)
    caches = request.app[SIM].prefix_caches
    if type(rank) is not int or not 0 <= rank < len(caches):
        raise bad_request(f"rank must be an integer in [0, {len(caches)})", "rank")
    return _json({"cached_tokens": caches[rank].match(ids, salt=model)})


def _rank(request: web.Request, sim: Sim) -> int:
    """The data-parallel rank the request asks for (vLLM ignores a header that is not an
    integer and refuses one out of range), else the next in turn."""
    try:
        rank = int(request.headers.get("X-data-parallel-rank", ""))
    except ValueError:
        return next(sim.turns)
    size = sim.config.data_parallel_size
    if not 0 <= rank < size:
        raise bad_request(f"data_parallel_rank {rank} is out of range [0, {size}).", None)
    return rank


def _spec(request: web.Request, config: SimConfig) -> FaultSpec:
    """The fault asked for: the `X-Sim-Fault` header wins over the configured one."""
    spec = request.headers.get(FAULT_HEADER)
    if spec is None:
        return config.fault or NO_FAULT
    try:
        return parse_fault(spec)
    except FaultSpecError as exc:
        raise bad_request(f"invalid {FAULT_HEADER} header: {exc}") from None


def _fault(request: web.Request, config: SimConfig) -> FaultSpec:
    """The fault that strikes this request: a `once` spec only on its id's first request."""
    fault = _spec(request, config)
    if not fault.once:
        return fault
    request_id = request.headers.get(REQUEST_ID_HEADER)
    if request_id is None or request.app[CLAIMS].claim(request_id):
        return fault
    return NO_FAULT


async def _request_fault(request: web.Request, config: SimConfig) -> FaultSpec:
    """Apply the faults that strike before the request is even read; return the fault."""
    fault = _fault(request, config)
    if fault.dead:
        raise SimError(500, "The engine is dead (simulated fault).")
    if fault.status is not None:
        raise SimError(fault.status, f"Simulated error (fault status={fault.status}).")
    if fault.overload:
        raise overloaded()
    if fault.hang:
        await forever()
    return fault


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise bad_request(f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


def _json(body: Any) -> web.Response:
    """A JSON body with vLLM's (FastAPI's) content type, which names no charset."""
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def system_fingerprint(config: SimConfig) -> str:
    """vLLM's default (`--fingerprint-mode full`) form: version and a hash of the config."""
    digest = hashlib.blake2b(repr((config.models, config.max_model_len)).encode(), digest_size=4)
    return f"vllm-{config.version}-{digest.hexdigest()}"
