"""Several serving processes on one port: the parent that starts, watches and stops them.

With ``server.processes`` above 1, ``vllm-gateway`` checks its settings and then replaces
itself (``exec``, same pid: still PID 1 in a container) with ``python -m gateway.supervisor``,
which imports nothing but the standard library and the log format, so the parent costs about
15 MB instead of a serving process's 60. The parent

1. picks the port (binding port 0 once, and keeping that socket bound, not listening, so the
   port stays ours), and makes a fresh folder for prometheus_client's multiprocess files;
2. starts N children (``python -m gateway --child N --config ...``), each listening on the same
   address with ``SO_REUSEPORT``, so the kernel spreads new connections over them; each child
   takes 1/N of the connection and in-flight limits (``settings.per_process``);
3. restarts a child that dies on its own (after a second, so a crash loop does not spin);
4. on SIGTERM or SIGINT passes SIGTERM to every child, which drains as ``server.py`` says, waits
   for them (bounded by the drain's own budget plus a margin, then SIGKILL), removes the metrics
   folder and exits 0 if every child did.

Children ignore SIGINT: a Ctrl-C reaches the whole process group, and a child must not count
it and the parent's SIGTERM as the two signals that cut the grace period short.

``/metrics`` in any child reads every child's files, so it is correct for the whole gateway
(counters and histograms summed, in-flight gauges summed over live children, health and load
from the latest writer). prometheus_client cannot remove a series in multiprocess mode: a
worker that leaves the fleet keeps its series until the gateway restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from gateway.logs import configure

log = logging.getLogger("gateway.supervisor")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it at import
RESTART_DELAY = 1.0
CGROUP = Path("/sys/fs/cgroup")


def cpu_count(cgroup: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up:
    a pod limited to 1.5 CPUs gets 2 processes)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(usable, math.ceil(quota)) if quota else usable)


def cgroup_cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota in CPUs (cgroup v2 ``cpu.max``, else v1's CFS files); None when unlimited."""
    with contextlib.suppress(OSError, ValueError):
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def process_count(wanted: int | str) -> int:
    return cpu_count() if wanted == "auto" else int(wanted)


def exec_supervisor(
    processes: int, host: str, port: int, stop_budget: float, log_level: str, log_format: str,
    config: Path | None,
) -> None:  # fmt: skip
    """Become the parent of ``processes`` serving processes (never returns)."""
    child = ["--child", str(processes)] + (["--config", str(config)] if config else [])
    argv = [
        sys.executable, "-m", "gateway.supervisor", "--processes", str(processes),
        "--host", host, "--port", str(port), "--stop-budget", str(stop_budget),
        "--log-level", log_level, "--log-format", log_format, "--", *child,
    ]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # noqa: S606 (our own interpreter, our own module)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and not listening: it keeps a port of
    the kernel's choice (port 0) ours while the children bind it too, and takes no connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


async def supervise(args: argparse.Namespace) -> int:
    reserved = reserve_port(args.host, args.port)
    port = reserved.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="vllm-gateway-metrics-")
    env = {**os.environ, METRICS_DIR_ENV: metrics_dir, "VLLM_GATEWAY_SERVER__PORT": str(port)}
    child_args = [sys.executable, "-m", "gateway", *args.child]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("starting %d serving processes on port %d", args.processes, port)
    try:
        slots = [_Slot(child_args, env, metrics_dir) for _ in range(args.processes)]
        await asyncio.gather(*(slot.start() for slot in slots))
        watchers = [asyncio.create_task(slot.keep_running(stopping)) for slot in slots]
        await stopping.wait()
        log.info("stopping: SIGTERM to %d serving processes", args.processes)
        codes = await asyncio.gather(*(slot.stop(args.stop_budget) for slot in slots))
        for watcher in watchers:
            watcher.cancel()
        return 0 if all(code == 0 for code in codes) else 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _Slot:
    """One serving process, restarted when it dies unasked."""

    def __init__(self, args: list[str], env: dict[str, str], metrics_dir: str) -> None:
        self._args = args
        self._env = env
        self._metrics_dir = metrics_dir
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._args, env=self._env, stdin=asyncio.subprocess.DEVNULL
        )

    async def keep_running(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            assert self._proc is not None
            code = await self._proc.wait()
            if stopping.is_set():
                return
            log.error("serving process %d exited with %d: restarting it", self._proc.pid, code)
            _forget(self._metrics_dir, self._proc.pid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESTART_DELAY):
                    await stopping.wait()
            if not stopping.is_set():
                await self.start()

    async def stop(self, budget: float) -> int:
        proc = self._proc
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(budget):
                code = await proc.wait()
        except TimeoutError:
            log.error("serving process %d did not stop within %.0fs: killing it", proc.pid, budget)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
        _forget(self._metrics_dir, proc.pid)
        return code


def _forget(metrics_dir: str, pid: int) -> None:
    """A dead child's live gauges (in flight) must not count any more; its counters stay.
    (Imported here: the parent pays for prometheus_client only once a child has died.)"""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.supervisor")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stop-budget", type=float, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("child", nargs=argparse.REMAINDER, help="-- the children's arguments")
    args = parser.parse_args(argv)
    if args.child[:1] == ["--"]:
        args.child = args.child[1:]
    configure(args.log_level, args.log_format)
    return asyncio.run(supervise(args))


if __name__ == "__main__":
    sys.exit(main())
