"""Command line: ``vllm-gateway --config FILE [--check]`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from gateway.logs import configure_logging
from gateway.settings import SettingsError, load_settings, per_process

T = TypeVar("T")


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
    from gateway.supervisor import METRICS_DIR_ENV, process_count, supervise

    processes = args.child or process_count(settings)
    if args.check:
        print(
            f"settings OK: {len(settings.workers)} worker(s), port {settings.server.port}, "
            f"{processes} serving process(es)"
        )
        return 0
    configure_logging(settings.logging)
    from gateway.server import serve  # not needed (nor paid for) by --check

    if args.child:
        _run(serve(per_process(settings, args.child), metrics_dir=os.environ[METRICS_DIR_ENV]))
        return 0
    if processes == 1:
        _run(serve(settings))
        return 0
    return _run(supervise(settings, args.config, processes))


def _run(main_coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main_coro)
    return uvloop.run(main_coro)


if __name__ == "__main__":
    sys.exit(main())
