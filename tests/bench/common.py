"""What the benchmarks share: their command line, a scratch folder, serving a small app,
and the machine line every report states."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from collections.abc import Callable
from pathlib import Path

import uvloop
from aiohttp import web


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} x {model}, Python {platform.python_version()}"


def options(
    name: str,
    seconds: float,
    repeats: int,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, Path]:
    """``--seconds`` and ``--repeats`` with these defaults (``more`` adds a benchmark's own
    options), and a scratch folder for the run."""
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{name}")
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each run")
    parser.add_argument("--repeats", type=int, default=repeats, help="runs per system")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{name}-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    return args, workdir


def serve(app: web.Application, port: int) -> None:
    """Run a benchmark helper app on loopback with uvloop and no access log."""
    web.run_app(
        app, host="127.0.0.1", port=port, print=None, access_log=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip
