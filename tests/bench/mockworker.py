"""A minimal OpenAI-shaped worker for throughput benchmarks: every chat request gets the same
pre-built answer, as one JSON body or streamed as CHUNKS events. It costs as little CPU as an
aiohttp server can, so what a benchmark measures is the proxy in front of it.

The model name picks the pace (``PACES``): ``sim-model`` writes its events with no sleeps;
``sim-realistic`` (5 ms steps), ``sim-itl20`` (20 ms) and ``sim-slow`` wait ``ttft`` before the
first token (prefill), then send one token per engine step of ``itl`` seconds, one SSE event
each, as vLLM does. As in vLLM's continuous batching, one clock steps every running stream of a
pace at once, so thousands of streams cost one timer, not thousands. A request with
``return_token_ids`` (the gateway's resume asks for them) gets vLLM's ``prompt_token_ids`` on the
role chunk and ``token_ids`` on every token chunk.
`python -m tests.bench.mockworker --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import orjson
from aiohttp import web

from tests.bench.common import serve

CHUNKS = 50


@dataclass(frozen=True)
class Pace:
    ttft: float
    itl: float
    tokens: int


PACES = {
    "sim-model": Pace(0.0, 0.0, CHUNKS),
    "sim-realistic": Pace(0.020, 0.005, CHUNKS),  # first token after 20 ms, then every 5 ms
    "sim-itl20": Pace(0.020, 0.020, CHUNKS),  # first token after 20 ms, then every 20 ms
    "sim-slow": Pace(0.020, 0.500, 20),  # long-lived streams: 10 s each
}


PROMPT_IDS = [1, 2, 3, 4, 5]


def _event(
    model: str,
    delta: dict[str, str],
    finish: str | None = None,
    ids: list[int] | None = None,
    prompt_ids: list[int] | None = None,
) -> bytes:
    choice: dict[str, object] = {"index": 0, "delta": delta, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    chunk: dict[str, object] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [choice],
    }
    if prompt_ids is not None:
        chunk["prompt_token_ids"] = prompt_ids
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@dataclass(frozen=True)
class Answer:
    role: bytes
    tokens: list[bytes]
    usage: bytes
    body: bytes


def _answer(model: str, n: int, with_ids: bool = False) -> Answer:
    text = [f" tok{i}" for i in range(n)]
    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": "length",
            }
        ],
        "usage": usage,
    }
    usage_chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [],
        "usage": usage,
    }
    return Answer(
        role=_event(
            model,
            {"role": "assistant", "content": ""},
            ids=[] if with_ids else None,
            prompt_ids=PROMPT_IDS if with_ids else None,
        ),
        tokens=[
            _event(
                model,
                {"content": t},
                "length" if i == n - 1 else None,
                ids=[100 + i] if with_ids else None,
            )
            for i, t in enumerate(text)
        ],
        usage=b"data: " + orjson.dumps(usage_chunk) + b"\n\n",
        body=orjson.dumps(body),
    )


ANSWERS = {model: _answer(model, pace.tokens) for model, pace in PACES.items()}
WITH_IDS = {model: _answer(model, pace.tokens, with_ids=True) for model, pace in PACES.items()}
DONE = b"data: [DONE]\n\n"


class EngineClock:
    """One engine step every ``itl`` seconds for every stream waiting on it."""

    def __init__(self, itl: float) -> None:
        self._itl = itl
        self._step: asyncio.Future[None] | None = None

    def next_step(self) -> asyncio.Future[None]:
        if self._step is None:
            loop = asyncio.get_running_loop()
            self._step = loop.create_future()
            loop.call_later(self._itl, self._tick)
        return self._step

    def _tick(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.set_result(None)


CLOCKS = web.AppKey("clocks", dict)


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    model = body.get("model") if body.get("model") in PACES else "sim-model"
    pace = PACES[model]
    answer = (WITH_IDS if body.get("return_token_ids") else ANSWERS)[model]
    if not body.get("stream"):
        if pace.ttft:
            await asyncio.sleep(pace.ttft + pace.itl * pace.tokens)
        return web.Response(body=answer.body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(answer.role)
    if pace.ttft:
        await asyncio.sleep(pace.ttft)
    clock: EngineClock | None = request.app[CLOCKS].get(model)
    for i, token in enumerate(answer.tokens):
        if clock is not None and i:
            await clock.next_step()
        await response.write(token)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(answer.usage)
    await response.write(DONE)
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    data = {"object": "list", "data": [{"id": m, "object": "model"} for m in PACES]}
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")


async def health(request: web.Request) -> web.Response:
    return web.Response()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.mockworker")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[CLOCKS] = {m: EngineClock(p.itl) for m, p in PACES.items() if p.itl}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    serve(app, args.port)


if __name__ == "__main__":
    main()
