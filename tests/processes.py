"""Subprocess helpers for tests that run the real command lines: ``python -m gateway`` and
``python -m gateway.simulator``.

Every process starts in its own session (a new process group), so ``Proc.kill`` reaches any
child it forks. stderr is drained by a thread into ``Proc.lines`` (the pipe never fills, and a
test can wait for a log line); stdout goes to /dev/null. All waits poll with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

HOST = "127.0.0.1"
START_TIMEOUT = 20.0  # generous: two interpreters importing aiohttp on a loaded 2-core machine
POLL = 0.01


def poll_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Sync twin of ``tests.helpers.wait_for``: poll until true, fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what}")
        time.sleep(POLL)


# Ports this process has handed out. A port is only free until its user binds it, so two
# callers in a row (worker processes started from threads at once) could each be given the
# other's event port; handed ports are never given again. The kernel picks port 0 at random
# among about 14,000 (odd) ports here: a session hands out a few thousand at most.
_handed: set[int] = set()
_handing = threading.Lock()


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for port 0), never one handed out
    before by this process."""
    return free_port_with(0)


def free_port_with(*offsets: int) -> int:
    """A free port whose neighbours at these offsets are free too (a worker's HTTP port and the
    event and replay ports derived from it)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        ports = {port, *(port + offset for offset in offsets)}
        if max(ports) > 65535:
            continue
        with _handing:
            if ports & _handed:
                continue
            try:
                for each in ports - {port}:
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                        sock.bind((HOST, each))
            except OSError:
                continue
            _handed.update(ports)
        return port
    raise AssertionError(f"no free port with free ports at {offsets}")


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def http_status(url: str, path: str, timeout: float = 2.0) -> int | None:
    """Status of ``GET path`` on ``url`` (``http://127.0.0.1:PORT``); None if it can't connect.

    http.client, not urllib: no proxy from the environment can get in the way.
    """
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class Proc:
    """One subprocess in its own process group, with its stderr collected line by line."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path | None = None,
        name: str = "",
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``log_file``: stderr goes to that file instead of a pipe drained here (benchmarks:
        a drain thread competing with the load generator would slow the process logging)."""
        self.name = name or " ".join(args)
        self._lines: list[str] = []
        self._log_file = log_file
        stderr = log_file.open("wb") if log_file is not None else subprocess.PIPE
        self.popen = subprocess.Popen(
            list(args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        if log_file is None:
            self._reader.start()
        else:
            stderr.close()  # type: ignore[union-attr]

    @property
    def lines(self) -> list[str]:
        if self._log_file is not None:
            return self._log_file.read_text(errors="replace").splitlines()
        return self._lines

    def _drain(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            self._lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fail if the process dies or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            lines = self.lines
            while seen < len(lines):
                match = regex.search(lines[seen])
                seen += 1
                if match:
                    return match
            if self.popen.poll() is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before logging "
                    f"{pattern!r}:\n{self.output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not log {pattern!r} within {timeout}s:\n{self.output}"
                )
            time.sleep(POLL)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fail if still running after ``timeout`` (``kill`` cleans up)."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s:\n{self.output}"
            ) from None
        if self._reader.is_alive():
            self._reader.join(5)
        return code

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the whole process group, and the groups of any descendants that left it
        (the simulated fleet's children run in sessions of their own), then reap; safe to call
        twice."""
        groups = {self.popen.pid}
        for pid in tree(self.popen.pid)[1:]:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        if self._reader.is_alive():
            self._reader.join(5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/PID/task/*/children (Linux; ``root`` alone
    elsewhere or once it is gone)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def start_simulator(*args: str, model: str = "sim-model") -> Sim:
    """A simulated vLLM worker on a free port; returns once its /health answers 200."""
    for _ in range(3):  # another process can take the free port before the simulator binds it
        sim = _try_simulator(free_port(), model, args)
        if sim is not None:
            return sim
    raise AssertionError("the simulator could not bind a free port in 3 tries")


def _try_simulator(port: int, model: str, args: Sequence[str]) -> Sim | None:
    cmd = [sys.executable, "-m", "gateway.simulator", "--host", HOST, "--port", str(port)]
    proc = Proc([*cmd, "--model", model, "--log-level", "WARNING", *args], name="simulator")
    url = f"http://{HOST}:{port}"
    try:
        poll_until(
            lambda: proc.popen.poll() is not None or http_status(url, "/health") == 200,
            START_TIMEOUT,
            f"simulator on {url} healthy",
        )
    except BaseException:
        proc.kill()
        raise
    if proc.popen.poll() is None:
        return Sim(url, proc)
    proc.kill()
    if "address already in use" not in proc.output.lower():
        raise AssertionError(f"the simulator exited:\n{proc.output}")
    return None


class Sim:
    def __init__(self, url: str, proc: Proc) -> None:
        self.url = url
        self.proc = proc


class GatewayProc:
    def __init__(self, url: str, proc: Proc, config: Path) -> None:
        self.url = url
        self.proc = proc
        self.config = config

    def ready(self) -> int | None:
        return http_status(self.url, "/ready")


def write_config(path: Path, workers: Sequence[str], **sections: Any) -> Path:
    """A gateway YAML file listening on a port of the kernel's choice, logging text at INFO."""
    data: dict[str, Any] = {
        # One serving process unless a test asks for more: most tests watch one process's
        # state machines (ejection, budgets); tests/test_processes.py covers several.
        "server": {"host": HOST, "port": 0, "processes": 1},
        "workers": [{"url": url, "models": ["sim-model"]} for url in workers],
        "health": {"interval": 60.0, "timeout": 2.0},
        "logging": {"level": "INFO", "format": "text"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def start_gateway(config: Path, log_file: Path | None = None) -> GatewayProc:
    """``python -m gateway --config FILE``; returns once ``/ready`` answers 200."""
    args = [sys.executable, "-m", "gateway", "--config", str(config)]
    proc = Proc(args, name="gateway", log_file=log_file)
    try:
        match = proc.wait_line(r"listening on (http://127\.0\.0\.1:\d+)", START_TIMEOUT)
        gateway = GatewayProc(match.group(1), proc, config)
        poll_until(lambda: gateway.ready() == 200, START_TIMEOUT, f"{gateway.url}/ready is 200")
    except BaseException:
        proc.kill()
        raise
    return gateway
