"""`python -m tests.bench.spread [N ...]`: how N connections opened at once spread over the
gateway's serving processes (`processes: auto`), eight bursts each. A closed-loop benchmark
(and a client pool) opens its connections in one burst and keeps them, so this spread is the
spread of the load for the whole run. Read from `ss -tnp` (the owning pid of each connection).

The gateway has spread connections this way since 381bf5f (a ``SO_REUSEPORT`` socket per serving
process); before, one shared socket let the first process awake take whole bursts.
`--reuseport` measures the layout without the gateway: this process binds the
port with ``SO_REUSEPORT`` and never listens (holding it, as the supervisor holds its socket),
and two servers (uvloop, ``asyncio.start_server``) each listen on a ``SO_REUSEPORT`` socket of
their own on it, so the kernel hashes connections over the two.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
from collections import Counter

import uvloop

from tests.bench.common import options
from tests.bench.systems import gateway, mock_worker
from tests.processes import Proc, http_status, poll_until

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


def reuseport_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def serve(port: int) -> None:
    """One of ``--reuseport``'s servers: answers ``/health`` on every request of a connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    sock = reuseport_socket(port)
    sock.listen(1024)
    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        await server.serve_forever()


async def reuseport(args: argparse.Namespace) -> None:
    holder = reuseport_socket()  # bound, never listening: the kernel hashes over listeners only
    port = holder.getsockname()[1]
    servers = [
        Proc([sys.executable, "-m", "tests.bench.spread", "--serve", str(port)], name="server")
        for _ in range(2)
    ]
    try:
        poll_until(lambda: http_status(f"http://127.0.0.1:{port}", "/health") == 200, 20, "up")
        await asyncio.sleep(0.5)  # the second server listening too
        await bursts(port, args)
    finally:
        for proc in servers:
            proc.kill()
        holder.close()


async def bursts(port: int, args: argparse.Namespace) -> None:
    for n in args.counts:
        spreads = []
        for _ in range(args.repeats):
            spreads.append(await burst(port, n))
            await asyncio.sleep(0.5)
        print(f"{n} connections at once, per serving process, {args.repeats} bursts: {spreads}")


def more_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("counts", nargs="*", type=int, default=[64, 256])
    parser.add_argument("--reuseport", action="store_true", help="SO_REUSEPORT per server")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)


async def main() -> None:
    args, workdir = options("spread", 0.0, BURSTS, more_options)
    if args.serve:
        return await serve(args.serve)
    if args.reuseport:
        return await reuseport(args)
    direct, worker = mock_worker()
    gw = gateway(direct.url, workdir)
    try:
        await bursts(int(gw.url.rsplit(":", 1)[1]), args)
    finally:
        assert gw.proc is not None
        gw.proc.kill()
        worker.kill()


if __name__ == "__main__":
    uvloop.run(main())
