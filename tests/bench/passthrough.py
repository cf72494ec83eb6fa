"""The Python floor: a bare aiohttp pass-through proxy with uvloop and no features at all (no
timeouts, limits, metrics, retries or parsing). Whatever a real gateway costs above this is
the price of its features. `python -m tests.bench.passthrough --port N --upstream URL`.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

from tests.bench.common import serve

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM] + request.path,
        data=await request.read(),
        headers={"Content-Type": "application/json"},
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.passthrough")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", proxy)
    serve(app, args.port)


if __name__ == "__main__":
    main()
