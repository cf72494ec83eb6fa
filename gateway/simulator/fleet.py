"""`make run` and `make demo`: the gateway in front of simulated vLLM workers, as child processes.

    python -m gateway.simulator.fleet --config config/demo.yaml --fault 8001=cut_after=3

Each worker is `python -m gateway.simulator` on its own port; the gateway is `python -m gateway`
with its port and worker list set through the environment, so the config file holds everything
else. The workers share a claims directory, so a `once` fault strikes only a request's first
attempt. Ctrl-C or SIGTERM stops the gateway first, so it drains what is in flight while the
workers still answer (within its own grace and drain time), then the workers (each within
`STOP_TIMEOUT`), and exits 0: a normal stop prints no error. A second Ctrl-C kills what is
left. On Linux the children run in sessions of their own, so a terminal's Ctrl-C (sent to the
whole foreground group) reaches the fleet alone, and the kernel sends each child SIGTERM if the
fleet dies without stopping them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.settings import load_settings

from .config import FaultSpecError, parse_fault

HOST = "127.0.0.1"
STOP_TIMEOUT = 15.0  # seconds a worker gets to exit after SIGTERM (the gateway: its drain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulator.fleet",
        description="The gateway in front of simulated vLLM workers; Ctrl-C stops all.",
    )
    add = parser.add_argument
    add("--config", default="config/local.yaml", help="the gateway's settings file")
    add(
        "--port",
        type=int,
        help="the gateway's port (default: VLLM_GATEWAY_SERVER__PORT, else 8080)",
    )
    add("--workers", default="8001,8002", help="comma-separated worker ports")
    add("--model", default="sim-model", help="the model every worker serves")
    add(
        "--fault",
        action="append",
        default=[],
        metavar="PORT=SPEC",
        help="a fault on every request of one worker, e.g. 8001=cut_after=3 (repeatable)",
    )
    add("--worker-arg", action="append", default=[], help="passed to every worker, e.g. --itl=0.05")
    return parser


def worker_faults(items: Sequence[str], ports: Sequence[int]) -> dict[int, str]:
    """`PORT=SPEC` items as a map; raises ValueError naming a bad port or spec."""
    faults: dict[int, str] = {}
    for item in items:
        port, sep, spec = item.partition("=")
        if not sep or not port.isdigit() or int(port) not in ports:
            raise ValueError(f"--fault {item!r}: expected PORT=SPEC with PORT one of {ports}")
        try:
            parse_fault(spec)
        except FaultSpecError as exc:
            raise ValueError(f"--fault {item!r}: {exc}") from None
        faults[int(port)] = spec
    return faults


def worker_command(
    port: int, model: str, claims: Path, fault: str | None, extra: Sequence[str]
) -> list[str]:
    command = [sys.executable, "-m", "gateway.simulator", "--host", HOST, "--port", str(port)]
    command += ["--model", model, "--claims-dir", str(claims), *extra]
    return command + (["--fault", fault] if fault else [])


def gateway_env(port: int, worker_ports: Sequence[int]) -> dict[str, str]:
    workers = [{"url": f"http://{HOST}:{p}"} for p in worker_ports]
    env = dict(os.environ)
    env["VLLM_GATEWAY_SERVER__PORT"] = str(port)
    env["VLLM_GATEWAY_WORKERS"] = json.dumps(workers)
    return env


def port_of(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``--port``, else the gateway's own override (the fleet sets the port through that
    variable, which would otherwise overrule the caller's), else 8080."""
    if args.port is not None:
        return int(args.port)
    raw = environ.get("VLLM_GATEWAY_SERVER__PORT", "8080")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"VLLM_GATEWAY_SERVER__PORT={raw!r}: not a port")
    return int(raw)


def drain_limit(config: str, environ: Mapping[str, str]) -> float:
    """How long the gateway may take to stop: its grace and drain, with the supervisor's own
    margin and ours (settings it cannot read fail it at start, so any bound does then)."""
    try:
        server = load_settings(Path(config), environ).server
    except Exception:
        return STOP_TIMEOUT
    return server.shutdown_grace + server.drain_timeout + 10.0


PR_SET_PDEATHSIG = 1
# Elsewhere no parent-death signal: the children stay in the fleet's group, and a terminal's
# Ctrl-C stops them all at once (a stream in flight is cut).
OWN_SESSIONS = sys.platform == "linux"
# Looked up here, not in the forked child, where only the call itself should run.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if OWN_SESSIONS else None


def _die_with(parent: int) -> None:
    """In the child before exec: SIGTERM when the fleet dies."""
    assert _PRCTL is not None
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the fleet died before the signal was set up
        os._exit(1)


def spawn(command: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # The commands are this interpreter and its own modules, with the caller's arguments.
    if not OWN_SESSIONS:
        return subprocess.Popen(command, env=env)  # noqa: S603
    parent = os.getpid()
    return subprocess.Popen(  # noqa: S603
        command, env=env, start_new_session=True, preexec_fn=lambda: _die_with(parent)
    )


def kill(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the child and, in its own session, everything it started (the gateway's
    serving processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if OWN_SESSIONS:
            os.killpg(child.pid, signal.SIGKILL)
        else:
            child.kill()
    child.wait()


class StopSignals:
    """Ctrl-C, SIGTERM or SIGHUP: the first stops the fleet in order, a second hurries it."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.hurry = threading.Event()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # An ignored signal stays ignored: `nohup make run` must outlive its terminal.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        (self.hurry if self.asked.is_set() else self.asked).set()


def stop(
    children: Sequence[subprocess.Popen[bytes]], limits: Sequence[float], hurry: threading.Event
) -> None:
    """SIGTERM to each child still running, one after another in the order given (the gateway
    first: it drains while the workers answer); one that outstays its limit is killed, and
    after a second stop signal every one left is."""
    for child, limit in zip(children, limits, strict=True):
        if child.poll() is None and not hurry.is_set():
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + limit
        while child.poll() is None:
            if hurry.wait(0.1) or time.monotonic() > deadline:
                kill(child)


def run(args: argparse.Namespace, claims: Path) -> int:
    """Start the fleet, wait for a stop signal or a child's exit; the exit status."""
    ports = [int(p) for p in args.workers.split(",")]
    faults = worker_faults(args.fault, ports)
    signals = StopSignals()
    # SIGHUP too: with the children in sessions of their own, a closed terminal reaches the
    # fleet alone, and the fleet must still stop them.
    signals.install()
    port = port_of(args, os.environ)
    workers = [
        spawn(worker_command(p, args.model, claims, faults.get(p), args.worker_arg)) for p in ports
    ]
    gateway = [sys.executable, "-m", "gateway", "--config", args.config]
    env = gateway_env(port, ports)
    children = [spawn(gateway, env), *workers]
    limits = [drain_limit(args.config, env), *(STOP_TIMEOUT for _ in workers)]
    try:
        while not signals.asked.wait(0.2):
            if any(child.poll() is not None for child in children):
                return 1  # a child died on its own: its output says why
        return 0
    finally:
        stop(children, limits, signals.hurry)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="sim-claims-") as claims:
            sys.exit(run(args, Path(claims)))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
