"""Command line: ``vllm-gateway --config FILE [--check]`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway.logs import configure_logging
from gateway.settings import Settings, SettingsError, load_settings, per_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway", description="OpenAI-compatible gateway for vLLM workers."
    )
    parser.add_argument("--config", type=Path, help="YAML settings file (config/gateway.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the settings and exit")
    # Set by the parent of several serving processes (gateway/supervisor.py): one of N.
    parser.add_argument("--child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, os.environ)
    except SettingsError as exc:
        print(f"vllm-gateway: {exc}", file=sys.stderr)
        return 2
    from gateway.supervisor import METRICS_DIR_ENV, exec_supervisor, process_count

    processes = args.child or process_count(settings.server.processes)
    if args.check:
        print(
            f"settings OK: {len(settings.workers)} worker(s), port {settings.server.port}, "
            f"{processes} serving process(es)"
        )
        return 0
    configure_logging(settings.logging)
    if processes > 1 and not args.child:
        _warn_local_rate_limits(settings, processes)
        server = settings.server
        exec_supervisor(
            processes, server.host, server.port,
            server.shutdown_grace + server.drain_timeout + STOP_MARGIN,
            settings.logging.level, settings.logging.format, args.config,
        )  # fmt: skip
    from gateway.server import serve  # not needed (nor paid for) by --check

    if args.child:
        settings = per_process(settings, args.child)
        _run(serve(settings, metrics_dir=os.environ[METRICS_DIR_ENV]))
    else:
        _run(serve(settings))
    return 0


STOP_MARGIN = 5.0  # the parent's wait for its children: their drain budget plus this


def _warn_local_rate_limits(settings: Settings, processes: int) -> None:
    auth = settings.auth
    if settings.redis.url is None and (auth.keys or auth.keys_file is not None):
        logging.getLogger("gateway").warning(
            "per-key rate limits are counted by each of the %d serving processes on its own; "
            "set redis.url to share them",
            processes,
        )


def _run(main_coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    sys.exit(main())
