"""Several serving processes on one port: the parent that starts, watches and stops them.

With ``server.processes`` above 1, ``vllm-gateway`` checks its settings, binds the listening
socket (one owner of the port: a second gateway on it fails there, at start) and then replaces
itself (``exec``, same pid: still PID 1 in a container) with ``python -m gateway.supervisor``,
which imports nothing but the standard library, uvloop, the log format and the rate-limit
arithmetic, so the parent costs a fraction of a serving process. The parent

1. turns the listening socket it was handed, which proved the port free, into the port's
   holder: a socket bound with ``SO_REUSEPORT`` that never listens (``hold``), and makes a
   fresh folder for prometheus_client's multiprocess files;
2. starts N children (``python -m gateway --child N ...``), each handed a listening socket of
   its own in the holder's ``SO_REUSEPORT`` group (``member``), so the kernel hashes new
   connections over the children (one shared accept queue let whichever child woke first
   take a whole burst), and its end of a channel (``channel``) on which it asks the
   ``keeper`` for per-key limits and answers the heartbeat. Each child takes 1/N of the
   connection and global in-flight limits (``settings.per_process``);
3. treats a child that exits, or says it failed, before it reports ready as a start-up failure:
   it stops the others and exits 1, logging the child's one-line reason (a missing file will
   not appear by restarting);
4. pings each ready child every quarter of ``server.heartbeat_timeout`` and kills one that has
   said nothing for that long (a stuck event loop); a child that dies after it was ready is
   restarted (after a second, so a crash loop does not spin), and what it held of the per-key
   in-flight limits is given back;
5. on SIGTERM or SIGINT closes the holder, passes SIGTERM to every child, which drains as
   ``server.py`` says (its socket closes when it stops listening), waits for them (bounded by
   the drain's own budget plus a margin, then SIGKILL), removes the metrics folder and exits 0
   if every child did.

One owner of the port still holds: the holder has ``SO_REUSEADDR`` off once bound, so a socket
without ``SO_REUSEPORT`` (another gateway's ``preflight.listen``) cannot bind the port, whether
children are listening or all restarting: it fails at start with "address in use". What the
group gives up against one shared queue: a program of the same user that binds with
``SO_REUSEPORT`` could join it; a stuck child keeps receiving its share of new connections
until the heartbeat kills it; and the connections queued on a child that dies are reset, not
served by the others (unless the host sets ``net.ipv4.tcp_migrate_req``, which moves them).

Children ignore SIGINT from their first instruction on: a Ctrl-C reaches the whole process
group, and a child must not count it and the parent's SIGTERM as the two signals that cut the
grace period short, nor die of it mid-import with a traceback.

``/metrics`` in any child reads every child's files, so it is correct for the whole gateway
(counters and histograms summed, in-flight gauges summed over live children, health and load
from the latest writer), but for the other children's last tenth of a second: each adds its
updates to its files every ``metrics.FLUSH_INTERVAL``. prometheus_client cannot remove a series
in multiprocess mode: a worker that leaves the fleet keeps its series until the gateway
restarts.
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

from gateway.channel import Channel, Message
from gateway.keeper import Holdings, Keeper
from gateway.logs import configure

log = logging.getLogger("gateway.supervisor")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it at import
RESTART_DELAY = 1.0
LAST_WORDS = 1.0  # seconds a gone child's channel is read for what it wrote before it went
# A child imports aiohttp, reads its files and probes every worker (each probe bounded by
# health.timeout) before it is ready; one slower than this is taken as failed to start.
START_TIMEOUT = 120.0
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


def hold(listener: socket.socket) -> socket.socket:
    """The port's holder, in place of ``listener`` (closed), which proved the port free by
    listening without ``SO_REUSEPORT``: bound to the same address before ``listener`` closes,
    so nobody can take the port in between. Connections queued on ``listener`` are reset."""
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # lets the holder bind
        holder = member(listener)
    finally:
        listener.close()
    # With SO_REUSEADDR on, a socket bound but not listening lets any other socket with it
    # listen on the port (Linux): off, only SO_REUSEPORT sockets of this user may bind.
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return holder


def member(holder: socket.socket) -> socket.socket:
    """A socket bound to the holder's address in its ``SO_REUSEPORT`` group: for one child,
    which listens on it when it is ready to serve, or (from ``hold``) the holder itself."""
    sock = socket.socket(holder.family, socket.SOCK_STREAM)
    try:
        _reuse(sock)
        sock.bind(holder.getsockname())
    except OSError:
        sock.close()
        raise
    return sock


def _reuse(sock: socket.socket) -> None:
    # SO_REUSEADDR: binding past connections in TIME_WAIT, as ``preflight.listen`` does; the
    # TIME_WAITs a child's connections leave then carry it too and never block a restart.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def exec_supervisor(
    processes: int, listener: socket.socket, stop_budget: float, heartbeat: float,
    log_level: str, log_format: str, config: Path | None,
) -> None:  # fmt: skip
    """Become the parent of ``processes`` serving processes on the port ``listener`` holds
    (never returns)."""
    child = ["--child", str(processes)] + (["--config", str(config)] if config else [])
    listener.set_inheritable(True)
    argv = [
        sys.executable, "-m", "gateway.supervisor", "--processes", str(processes),
        "--listen-fd", str(listener.fileno()), "--stop-budget", str(stop_budget),
        "--heartbeat", str(heartbeat), "--log-level", log_level, "--log-format", log_format,
        "--", *child,
    ]  # fmt: skip
    # exec discards what is buffered: the batched log handler's lines included.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # noqa: S606 (our own interpreter, our own module)


async def supervise(args: argparse.Namespace) -> int:
    try:
        holder = hold(socket.socket(fileno=args.listen_fd))
    except OSError as exc:
        log.error("cannot hold the port: %s", exc.strerror)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="vllm-gateway-metrics-")
    plan = _Plan(
        argv=[sys.executable, "-m", "gateway", *args.child],
        env={**os.environ, METRICS_DIR_ENV: metrics_dir},
        holder=holder,
        metrics_dir=metrics_dir,
        keeper=Keeper(),
        heartbeat=args.heartbeat,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("starting %d serving processes on port %d", args.processes, holder.getsockname()[1])
    slots = [_Slot(plan) for _ in range(args.processes)]
    failures: list[str] = []

    async def run(slot: _Slot) -> None:
        reason = await slot.run(stopping)
        if reason:
            failures.append(reason)
            stopping.set()

    runs = [asyncio.create_task(run(slot)) for slot in slots]
    try:
        await stopping.wait()
        if failures:
            log.error("serving process failed to start: %s", failures[0])
        else:
            log.info("stopping: SIGTERM to %d serving processes", args.processes)
        holder.close()  # each child's socket closes when it stops listening
        codes = await asyncio.gather(*(slot.stop(args.stop_budget) for slot in slots))
        await asyncio.gather(*runs)
        return 1 if failures or any(code != 0 for code in codes) else 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _Plan:
    """What every slot starts its child with."""

    def __init__(
        self, argv: list[str], env: dict[str, str], holder: socket.socket, metrics_dir: str,
        keeper: Keeper, heartbeat: float,
    ) -> None:  # fmt: skip
        self.argv = argv
        self.env = env
        self.holder = holder
        self.metrics_dir = metrics_dir
        self.keeper = keeper
        self.heartbeat = heartbeat


class _Slot:
    """One serving process: started, watched by heartbeat, restarted when it dies unasked."""

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: Channel | None = None
        self._holdings: Holdings | None = None
        self._ready = asyncio.Event()
        self._reason = ""
        # Held while a child is being started, so that ``stop`` sees the child it must stop.
        self._starting = asyncio.Lock()

    async def run(self, stopping: asyncio.Event) -> str:
        """Keep a child running until ``stopping``; a start-up failure's reason ends it early."""
        while True:
            try:
                proc = await self._start(stopping)
            except OSError as exc:
                return f"cannot listen on port {self._plan.holder.getsockname()[1]}: {exc.strerror}"
            if proc is None:
                return ""
            reason = await self._until_ready(proc, stopping)
            if reason or stopping.is_set():
                return reason
            code = await self._watch(proc)
            if stopping.is_set():
                return ""
            log.error("serving process %d exited with %d: restarting it", proc.pid, code)
            await self._forget(proc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESTART_DELAY):
                    await stopping.wait()

    async def _start(self, stopping: asyncio.Event) -> asyncio.subprocess.Process | None:
        async with self._starting:
            return None if stopping.is_set() else await self._spawn()

    async def _spawn(self) -> asyncio.subprocess.Process:
        plan = self._plan
        listener = member(plan.holder)
        ours, theirs = socket.socketpair()
        fds = (listener.fileno(), theirs.fileno())
        args = ["--listen-fd", str(fds[0]), "--channel-fd", str(fds[1])]
        # The child starts with SIGINT blocked (a signal mask survives fork and exec) and
        # ignores it before unblocking, so a Ctrl-C during its imports is not a traceback. Ours
        # stays pending meanwhile, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *plan.argv, *args, env=plan.env, stdin=asyncio.subprocess.DEVNULL, pass_fds=fds
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            # Not ours to keep: the child's socket must close when the child stops listening.
            listener.close()
            theirs.close()
        self._ready.clear()
        self._reason = ""
        self._holdings = plan.keeper.holdings()
        self._channel = await Channel.over(ours)
        self._channel.start(self._handle)
        return self._proc

    def _handle(self, message: Message) -> Message | None:
        if message[0] == "ready":
            self._ready.set()
            return None
        if message[0] == "failed":
            self._reason = str(message[1])
            return None
        assert self._holdings is not None
        return self._holdings.handle(message)

    async def _until_ready(self, proc: asyncio.subprocess.Process, stopping: asyncio.Event) -> str:
        """Empty once the child says it is ready (or a stop is asked for); else why not."""
        waits = [
            asyncio.create_task(self._ready.wait()),
            asyncio.create_task(proc.wait()),
            asyncio.create_task(stopping.wait()),
        ]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()
        if self._ready.is_set() or stopping.is_set():
            return ""
        if not done:
            proc.kill()
            return f"serving process {proc.pid} was not ready within {START_TIMEOUT:.0f}s"
        code = await proc.wait()
        await self._forget(proc)
        return self._reason or f"serving process {proc.pid} exited with {code} during start-up"

    async def _watch(self, proc: asyncio.subprocess.Process) -> int:
        """Wait for the child to exit, killing it when it stops answering the heartbeat."""
        assert self._channel is not None
        channel, bound = self._channel, self._plan.heartbeat
        loop = asyncio.get_running_loop()
        while True:
            channel.note("ping")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound / 4):
                    return await proc.wait()
            silent = loop.time() - channel.last_heard
            if silent > bound and proc.returncode is None:
                log.error(
                    "serving process %d did not answer the heartbeat for %.1fs: killing it",
                    proc.pid,
                    silent,
                )
                proc.kill()

    async def stop(self, budget: float) -> int:
        async with self._starting:
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
        await self._forget(proc)
        return code

    async def _forget(self, proc: asyncio.subprocess.Process) -> None:
        """A gone child's channel is closed, its in-flight slots are free again, and its live
        gauges (in flight) no longer count; its counters stay."""
        if self._channel is not None:
            # What the child wrote before it went (its last stock spent, slots released) is
            # read to the end first, so that its holdings are settled from all of it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._channel.closed.wait(), LAST_WORDS)
            await self._channel.close()
            self._channel = None
        if self._holdings is not None:
            self._holdings.release_all()
            self._holdings = None
        # Imported here: the parent pays for prometheus_client only once a child has died.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, self._plan.metrics_dir)  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.supervisor")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--stop-budget", type=float, required=True)
    parser.add_argument("--heartbeat", type=float, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("child", nargs=argparse.REMAINDER, help="-- the children's arguments")
    args = parser.parse_args(argv)
    if args.child[:1] == ["--"]:
        args.child = args.child[1:]
    configure(args.log_level, args.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(supervise(args))
    # The keeper answers every limited request of every child: uvloop's I/O roughly halves
    # what each answer costs the parent (see the commit that made the keeper).
    return uvloop.run(supervise(args))


if __name__ == "__main__":
    sys.exit(main())
