"""The systems a benchmark compares, each a process tree on loopback in front of the same mock
worker: direct (no proxy: the limit), the bare pass-through (the Python floor), vllm-gateway
as shipped and with its production features on (``vllm-gateway+features``: API keys with rate
limits, resume, prefix affinity), and the peers, vllm-router and the LiteLLM proxy, installed by the
benchmark into their own virtual environments under ``.cache/bench``.

CPU seconds and resident memory are read from /proc for the whole tree of each system (the
gateway's parent and its serving processes, LiteLLM's workers), so several processes are
neither hidden nor double counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.processes import Proc, free_port, http_status, poll_until, start_gateway, tree

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "bench"
PY = sys.executable
VLLM_ROUTER = "vllm-router==0.1.17"
LITELLM = "litellm[proxy]==1.108.7"
MODELS = ("sim-model", "sim-realistic", "sim-itl20", "sim-slow")  # the mock worker's paces
MASTER_KEY = "sk-bench-0123456789"
START_TIMEOUT = 120.0  # LiteLLM takes ~25 s to import on these machines


@dataclass
class System:
    name: str
    url: str
    proc: Proc | None  # None for direct
    version: str = ""
    notes: str = ""
    _rss_peak: float = field(default=0.0, repr=False)

    def pids(self) -> list[int]:
        return tree(self.proc.popen.pid) if self.proc else []

    def cpu_seconds(self) -> float:
        return sum(_cpu(pid) for pid in self.pids())

    def kernel_seconds(self) -> float:
        """The system (kernel) share of ``cpu_seconds``: syscalls, loopback TCP, wake-ups."""
        return sum(_cpu(pid, user=False) for pid in self.pids())

    def rss_mb(self) -> float:
        return sum(_rss(pid) for pid in self.pids())


def _cpu(pid: int, user: bool = True) -> float:
    """utime + stime of ``pid`` in seconds (stime alone with ``user=False``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[12]) + (int(fields[11]) if user else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The peak of a system's summed RSS while a run lasts, sampled every 50 ms."""

    def __init__(self, system: System) -> None:
        self._system = system
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._system.rss_mb())
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self._system.rss_mb())


def _up(proc: Proc, url: str, path: str, what: str, ok: tuple[int, ...] = (200,)) -> None:
    """Returns once ``path`` answers one of ``ok``; else the process is killed, not left
    behind (the caller has no ``System`` to stop yet)."""
    try:
        poll_until(
            lambda: proc.popen.poll() is not None or http_status(url, path) in ok,
            START_TIMEOUT,
            what,
        )
    except BaseException:
        proc.kill()
        raise
    if proc.popen.poll() is not None:
        raise RuntimeError(f"{what}: exited\n{proc.output[-3000:]}")


def mock_worker() -> tuple[System, Proc]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc([PY, "-m", "tests.bench.mockworker", "--port", str(port)], name="mock worker")
    _up(proc, url, "/health", "mock worker")
    return System("direct", url, None), proc


def python_relay(name: str, module: str, worker: str, notes: str) -> System:
    """A bare relay of ours (``tests.bench.passthrough``, ``tests.bench.floor``) in front of
    ``worker``: it serves POSTs only, so any answer to a GET says it is up."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [PY, "-m", f"tests.bench.{module}", "--port", str(port), "--upstream", worker]
    proc = Proc(args, name=name)
    _up(proc, url, "/health", name, ok=(200, 404, 405))
    return System(name, url, proc, notes=notes)


# What ``vllm-gateway+features`` turns on over the defaults: the benchmark's key (loadgen's
# ``AUTH``) with every kind of rate limit set (high: each is checked, none sheds), resume for
# every stream (the worker is asked for token ids and the transcript reads every event), and
# prefix affinity.
FEATURES: dict[str, object] = {
    "auth": {"keys": [{
        "name": "bench", "key": MASTER_KEY,
        "rpm": 100_000_000, "tpm": 10_000_000_000, "max_concurrent": 100_000,
    }]},
    "resume": {"enabled": True},
    "routing": {"affinity": "prefix"},
}  # fmt: skip


def gateway(
    worker: str, workdir: Path, features: bool = False, models: Sequence[str] = MODELS
) -> System:
    name = "vllm-gateway+features" if features else "vllm-gateway"
    config = workdir / f"{name}.yaml"
    settings: dict[str, object] = {
        "server": {"host": "127.0.0.1", "port": 0, "processes": "auto"},
        "workers": [{"url": worker, "models": list(models)}],
        # Only the limits are raised, so it does not shed the benchmark's own load; metrics,
        # routing (least-loaded, scraping the worker), timeouts, the access log stay on.
        "limits": {"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 4096},
        "logging": {"level": "INFO", "format": "json"},
    }
    if features:
        settings.update(FEATURES)
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    # Its log (the JSON access log, a line per request) goes to a file, as to a log collector.
    gw = start_gateway(config, log_file=workdir / f"{name}.log")
    from gateway.supervisor import cpu_count

    extra = "; keys + rate limits, resume, prefix affinity" if features else ""
    return System(
        name, gw.url, gw.proc, version=_own_version(),
        notes=f"{cpu_count()} serving processes (processes: auto){extra}",
    )  # fmt: skip


def _own_version() -> str:
    with contextlib.suppress(subprocess.CalledProcessError, OSError):
        return subprocess.check_output(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True
        ).strip()
    return "?"


def venv(name: str, requirement: str) -> Path:
    """A virtual environment under .cache/bench with ``requirement`` installed (once)."""
    env = CACHE / name
    stamp = env / f".installed-{requirement}"
    if not stamp.exists():
        print(f"installing {requirement} into {env} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        subprocess.run(
            [str(env / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
             requirement],
            check=True,
        )  # fmt: skip
        stamp.touch()
    return env


def vllm_router(
    worker: str | Sequence[str], policy: str = "round_robin", extra: Sequence[str] = ()
) -> System:
    """vllm-router in front of ``worker`` (or several), routing by ``policy`` with its own
    defaults unless ``extra`` flags say otherwise."""
    env = venv("vllm-router", VLLM_ROUTER)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workers = [worker] if isinstance(worker, str) else list(worker)
    args = [
        str(env / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *workers, "--policy", policy, *extra,
        # Its admission limits raised like ours, so it does not shed the benchmark's load.
        "--max-concurrent-requests", "4096", "--queue-size", "4096",
        "--log-level", "warning",
        # Its Prometheus exporter stays on, like our /metrics, on a port of its own.
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
    ]  # fmt: skip
    proc = Proc(args, name="vllm-router")
    _up(proc, url, "/health", "vllm-router")
    return System("vllm-router", url, proc, version=VLLM_ROUTER.split("==")[1],
                  notes=f"Rust, {policy}")  # fmt: skip


def litellm(worker: str, workdir: Path) -> System:
    env = venv("litellm", LITELLM)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = workdir / "litellm.yaml"
    lines = ["model_list:"]
    for model in MODELS:
        lines.append(f"  - model_name: {model}")
        lines.append(
            f"    litellm_params: {{model: openai/{model}, api_base: '{worker}/v1', api_key: none}}"
        )
    lines += ["general_settings:", f"  master_key: {MASTER_KEY}"]
    config.write_text("\n".join(lines) + "\n")
    workers = os.cpu_count() or 1
    args = [
        str(env / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", str(workers),
    ]  # fmt: skip
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at start
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    proc = Proc(args, name="litellm")
    _up(proc, url, "/health/liveliness", "litellm")
    return System("litellm", url, proc, version=LITELLM.split("==")[1],
                  notes=f"Python, {workers} workers")  # fmt: skip


@contextlib.contextmanager
def started(names: list[str], workdir: Path) -> Iterator[list[System]]:
    """The mock worker (as ``direct``) and every named system; all killed on the way out."""
    direct, worker = mock_worker()
    procs = [worker]
    systems = [direct]
    try:
        for name in names:
            t0 = time.monotonic()
            system = start_system(name, direct.url, workdir)
            assert system.proc is not None
            procs.append(system.proc)
            systems.append(system)
            print(f"{name} up in {time.monotonic() - t0:.1f}s at {system.url}", file=sys.stderr)
        yield systems
    finally:
        for proc in procs:
            proc.kill()


def start_system(name: str, worker: str, workdir: Path) -> System:
    if name == "passthrough":
        return python_relay(name, "passthrough", worker, "bare aiohttp + uvloop, 1 process")
    if name == "python-floor":
        return python_relay(name, "floor", worker, "uvloop + httptools, no framework, 1 process")
    if name == "vllm-gateway":
        return gateway(worker, workdir)
    if name == "vllm-gateway+features":
        return gateway(worker, workdir, features=True)
    if name == "vllm-router":
        return vllm_router(worker)
    if name == "litellm":
        return litellm(worker, workdir)
    raise ValueError(f"unknown system {name!r}")
