"""Command line: ``vllm-gateway --config FILE [--check]`` (also ``python -m gateway``).

Start-up and ``--check`` run the same steps up to serving: load the settings, read every file
they name, bind the port (``preflight``). Any failure is one line on stderr and exit code 2
(settings, files, port) or 1 (a later start-up failure, e.g. of a serving process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.logs import configure_logging
from gateway.preflight import PreflightError, check_files, listen
from gateway.settings import Settings, SettingsError, load_settings, per_process

STOP_MARGIN = 5.0  # the parent's wait for its children: their drain budget plus this


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        # Spawned with SIGINT blocked (supervisor.py): the parent alone answers a Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return _child(args)
    try:
        settings = load_settings(args.config, os.environ)
        check_files(settings, args.config, os.environ)
        listener = listen(settings, args.config, os.environ)
    except (SettingsError, PreflightError) as exc:
        print(f"vllm-gateway: {exc}", file=sys.stderr)
        return 2
    from gateway.supervisor import exec_supervisor, process_count

    processes = process_count(settings.server.processes)
    if args.check:
        port = listener.getsockname()[1]
        listener.close()
        print(
            f"settings OK: {len(settings.workers)} worker(s), port {port} free, "
            f"{processes} serving process(es)"
        )
        return 0
    configure_logging(settings.logging)
    if processes > 1:
        server = settings.server
        exec_supervisor(
            processes, listener, server.shutdown_grace + server.drain_timeout + STOP_MARGIN,
            server.heartbeat_timeout, settings.logging.level, settings.logging.format,
            args.config,
        )  # fmt: skip
    return _serve(settings, listener)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway", description="OpenAI-compatible gateway for vLLM workers."
    )
    parser.add_argument("--config", type=Path, help="YAML settings file (config/gateway.yaml)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the settings, the files they name and that the port is free, then exit",
    )
    parser.add_argument("--version", action="version", version=f"vllm-gateway {__version__}")
    # Set by the parent of several serving processes (gateway/supervisor.py): one of N, this
    # child's socket on the port and its end of its channel, both inherited.
    parser.add_argument("--child", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, help=argparse.SUPPRESS)
    return parser


def _child(args: argparse.Namespace) -> int:
    from gateway.supervisor import METRICS_DIR_ENV

    listener = socket.socket(fileno=args.listen_fd)
    parent = socket.socket(fileno=args.channel_fd)
    try:
        settings = per_process(load_settings(args.config, os.environ), args.child)
    except SettingsError as exc:  # the file changed since the parent read it
        reason = " ".join(str(exc).split())
        _tell_parent(parent, reason)
        print(f"vllm-gateway: {reason}", file=sys.stderr)
        return 2
    configure_logging(settings.logging)
    return _serve(settings, listener, os.environ[METRICS_DIR_ENV], parent)


def _tell_parent(parent: socket.socket, reason: str) -> None:
    import json

    parent.sendall(json.dumps(["failed", reason]).encode() + b"\n")


def _serve(
    settings: Settings,
    listener: socket.socket,
    metrics_dir: str | None = None,
    parent: socket.socket | None = None,
) -> int:
    from gateway.server import StartFailed, serve  # not needed (nor paid for) by --check

    try:
        _run(serve(settings, listener, metrics_dir=metrics_dir, parent=parent))
    except StartFailed as exc:
        if parent is None:  # else the supervisor says it, once for the gateway
            print(f"vllm-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(main_coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    sys.exit(main())
