"""`python -m tests.bench.spread [N ...]`: how N connections opened at once spread over the
gateway's serving processes (`processes: auto`), eight bursts each. A closed-loop benchmark
(and a client pool) opens its connections in one burst and keeps them, so this spread is the
spread of the load for the whole run. Read from `ss -tnp` (the owning pid of each connection).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
from collections import Counter

import uvloop

from tests.bench.common import options
from tests.bench.systems import gateway, mock_worker

BURSTS = 8


async def burst(port: int, n: int) -> list[int]:
    """Connections per serving process, fewest first, after ``n`` connects at once (each sends
    one request, so every connection has surely been accepted)."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    try:
        for _, writer in conns:
            writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in conns))
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        for _, writer in conns:
            writer.close()
    return sorted(Counter(re.findall(r"pid=(\d+)", out)).values())


def more_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("counts", nargs="*", type=int, default=[64, 256])


async def main() -> None:
    args, workdir = options("spread", 0.0, BURSTS, more_options)
    direct, worker = mock_worker()
    gw = gateway(direct.url, workdir)
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        for n in args.counts:
            spreads = []
            for _ in range(args.repeats):
                spreads.append(await burst(port, n))
                await asyncio.sleep(0.5)
            print(f"{n} connections at once, per serving process, {args.repeats} bursts: {spreads}")
    finally:
        assert gw.proc is not None
        gw.proc.kill()
        worker.kill()


if __name__ == "__main__":
    uvloop.run(main())
