"""Command line: ``vllm-gateway --config FILE [--check]`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway.logs import configure_logging
from gateway.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway", description="OpenAI-compatible gateway for vLLM workers."
    )
    parser.add_argument("--config", type=Path, help="YAML settings file (config/gateway.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the settings and exit")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, os.environ)
    except SettingsError as exc:
        print(f"vllm-gateway: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"settings OK: {len(settings.workers)} worker(s), port {settings.server.port}")
        return 0
    configure_logging(settings.logging)
    from gateway.server import serve  # not needed (nor paid for) by --check

    _run(serve(settings))
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
