"""`make run` and `make demo`: the gateway in front of simulated vLLM workers, as child processes.

    python -m gateway.simulator.fleet --config config/demo.yaml --fault 8001=cut_after=3

Each worker is `python -m gateway.simulator` on its own port; the gateway is `python -m gateway`
with its port and worker list set through the environment, so the config file holds everything
else. The workers share a claims directory, so a `once` fault strikes only a request's first
attempt. Ctrl-C or SIGTERM stops the gateway first, so it drains what is in flight while the
workers still answer, then the workers (each within `STOP_TIMEOUT`, then killed), and exits 0:
a normal stop prints no error. On Linux the children run in sessions of their own, so a
terminal's Ctrl-C (sent to the whole foreground group) reaches the fleet alone, and the kernel
sends each child SIGTERM if the fleet dies without stopping them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from .config import FaultSpecError, parse_fault

HOST = "127.0.0.1"
STOP_TIMEOUT = 15.0  # seconds a child gets to exit after SIGTERM: the gateway drains first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulator.fleet",
        description="The gateway in front of simulated vLLM workers; Ctrl-C stops all.",
    )
    add = parser.add_argument
    add("--config", default="config/local.yaml", help="the gateway's settings file")
    # The gateway's own environment override, if the caller set one: the fleet sets the port
    # through that variable, which would otherwise overrule it.
    port = int(os.environ.get("VLLM_GATEWAY_SERVER__PORT", "8080"))
    add("--port", type=int, default=port, help="the gateway's port (8080)")
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


PR_SET_PDEATHSIG = 1
OWN_SESSIONS = sys.platform == "linux"  # elsewhere no parent-death signal: the children stay
# in the fleet's group, and a terminal's Ctrl-C stops them all at once


def _own_session(parent: int) -> None:
    """In the child before exec: a session of its own, SIGTERM when the fleet dies."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the fleet died before the signal was set up
        os._exit(1)


def spawn(command: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    if not OWN_SESSIONS:
        return subprocess.Popen(command, env=env)  # noqa: S603
    parent = os.getpid()
    # The commands are this interpreter and its own modules, with the caller's arguments.
    return subprocess.Popen(command, env=env, preexec_fn=lambda: _own_session(parent))  # noqa: S603


def stop(children: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each child still running, one after another in the order given (the gateway
    first: it drains while the workers answer); kill one that outstays ``STOP_TIMEOUT``."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(args: argparse.Namespace, claims: Path) -> int:
    """Start the fleet, wait for a stop signal or a child's exit; the exit status."""
    ports = [int(p) for p in args.workers.split(",")]
    faults = worker_faults(args.fault, ports)
    stopping = threading.Event()
    # SIGHUP too: with the children in sessions of their own, a closed terminal reaches the
    # fleet alone, and the fleet must still stop them.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopping.set())
    workers = [
        spawn(worker_command(p, args.model, claims, faults.get(p), args.worker_arg)) for p in ports
    ]
    gateway = [sys.executable, "-m", "gateway", "--config", args.config]
    children = [spawn(gateway, gateway_env(args.port, ports)), *workers]
    try:
        while not stopping.wait(0.2):
            if any(child.poll() is not None for child in children):
                return 1  # a child died on its own: its output says why
        return 0
    finally:
        stop(children)


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
