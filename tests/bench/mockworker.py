"""A minimal OpenAI-shaped worker for throughput benchmarks: every chat request gets the same
pre-built answer, streamed as CHUNKS events written one by one with no sleeps (or as one JSON
body). It costs as little CPU as an aiohttp server can, so what a benchmark measures is the
proxy in front of it. `python -m tests.bench.mockworker --port N`.
"""

from __future__ import annotations

import argparse

import orjson
from aiohttp import web

from tests.bench.common import serve

CHUNKS = 50


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "sim-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


ROLE = _event({"role": "assistant", "content": ""})
TOKENS = [
    _event({"content": f" tok{i}"}, "length" if i == CHUNKS - 1 else None) for i in range(CHUNKS)
]
USAGE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"sim-model","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":50,'
    b'"total_tokens":55}}\n\n'
)
DONE = b"data: [DONE]\n\n"
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "sim-model",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(f" tok{i}" for i in range(CHUNKS)),
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55},
    }
)


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=ANSWER, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(ROLE)
    for token in TOKENS:
        await response.write(token)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(USAGE)
    await response.write(DONE)
    await response.write_eof()
    return response


async def ok(request: web.Request) -> web.Response:
    return web.Response(body=b'{"object":"list","data":[{"id":"sim-model","object":"model"}]}',
                        content_type="application/json")  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.mockworker")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", ok)
    app.router.add_get("/v1/models", ok)
    app.router.add_get("/metrics", metrics)
    serve(app, args.port)


if __name__ == "__main__":
    main()
