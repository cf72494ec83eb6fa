"""``python -m tests.bench.cpusplit``: where a streamed SSE event's CPU goes, the gateway's
against vllm-router's: user and kernel time, read and write system calls and context switches
per event, read from /proc for each system's whole process tree (every thread), around a
closed loop of 64 streams on the mock worker.

The gateway runs as one serving process (so no supervisor or second process shares the count)
with its shipped settings; vllm-router as in ``make bench``. Each system runs a paced scenario
(``sim-realistic``: a token every 5 ms, each event its own read and write) and a zero-sleep one
(``sim-model``: the whole answer in one or two reads), twice, in turns. The answers have the
same 52 events, so the zero-sleep run's CPU is what a request costs apart from its events, and
the difference between the two, over the 50 extra reads, is what one more event costs.

``--patches FILE ...`` adds HEAD with each patch applied (``tests/bench/ablations``), as
``tests.bench.ab`` runs them: with ``pump-writes-only.patch`` it says how much of an event's CPU
is the pump's own work and how much is left with none of it.

/proc's ``syscr`` and ``syscw`` count read- and write-class calls (``recvfrom`` is not one:
vllm-router's reads show as 0).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import uvloop
import yaml

from tests.bench import loadgen
from tests.bench.ab import patched, start
from tests.bench.loadgen import chat_body
from tests.bench.systems import (
    FEATURES,
    MODELS,
    System,
    mock_worker,
    start_system,
    tree,
    vllm_router,
)
from tests.processes import Proc, start_gateway

# The gateway's configurations beside the shipped one (``--variants``): each production feature
# alone, and all of them as ``make bench``'s vllm-gateway+features runs them.
VARIANTS: dict[str, dict[str, object]] = {
    "vllm-gateway": {},
    "keys": {"auth": FEATURES["auth"]},
    "resume": {"resume": FEATURES["resume"]},
    "affinity": {"routing": FEATURES["routing"]},
    "vllm-gateway+features": FEATURES,
}
EVENTS = 52  # a mock answer's SSE events: the role chunk, 50 tokens, [DONE]
STREAMS = 64
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Counts:
    reads: float = 0.0
    writes: float = 0.0
    waits: float = 0.0  # voluntary context switches
    preempted: float = 0.0  # involuntary ones
    user: float = 0.0  # seconds
    kernel: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(
            *(a - b for a, b in zip(vars(self).values(), vars(other).values(), strict=True))
        )


def _task(path: Path) -> Counts:
    io = dict(line.split(": ") for line in (path / "io").read_text().splitlines())
    status = dict(
        line.split(":\t") for line in (path / "status").read_text().splitlines() if ":\t" in line
    )
    stat = (path / "stat").read_text().rsplit(")", 1)[1].split()
    return Counts(
        float(io["syscr"]),
        float(io["syscw"]),
        float(status["voluntary_ctxt_switches"]),
        float(status["nonvoluntary_ctxt_switches"]),
        int(stat[11]) / TICK,
        int(stat[12]) / TICK,
    )


def counts(pid: int) -> Counts:
    """Summed over every thread of ``pid`` and of its descendants."""
    total = Counts()
    for each in tree(pid):
        for task in Path(f"/proc/{each}/task").iterdir():
            try:
                one = _task(task)
            except OSError:
                continue  # a thread that just ended
            for name, value in vars(one).items():
                setattr(total, name, getattr(total, name) + value)
    return total


async def measure(system: System, model: str, seconds: float) -> tuple[float, Counts]:
    """req/s and the counts per event over a closed loop of ``seconds``."""
    assert system.proc is not None
    url = f"{system.url}/v1/chat/completions"
    data = chat_body(model, True)
    await loadgen.closed_loop(url, data, True, STREAMS, 1.5, "warm-up")
    before = counts(system.proc.popen.pid)
    sample = await loadgen.closed_loop(url, data, True, STREAMS, seconds, f"{system.name} {model}")
    spent = counts(system.proc.popen.pid).minus(before)
    events = len(sample.total) * EVENTS
    return sample.rate, Counts(*(v / events for v in vars(spent).values()))


def line(name: str, model: str, rate: float, c: Counts) -> str:
    return (
        f"| {name} | {model} | {rate:.0f} | {c.user * 1e6:.1f} | {c.kernel * 1e6:.1f} | "
        f"{c.reads:.2f} | {c.writes:.2f} | {c.waits:.2f} | {c.preempted:.3f} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cpusplit")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["vllm-gateway"],
        help="gateway configurations to run beside vllm-router, each its own process",
    )  # fmt: skip
    parser.add_argument(
        "--peers", nargs="*", choices=["python-floor", "passthrough"], default=[],
        help="Python relays without features to run beside (each one process)",
    )  # fmt: skip
    parser.add_argument("--patches", type=Path, nargs="+", default=[],
                        help="HEAD with each patch applied, shipped settings")  # fmt: skip
    parser.add_argument(
        "--processes", default="1",
        help="the gateway's serving processes (make bench runs 'auto')",
    )  # fmt: skip
    args = parser.parse_args()
    processes: int | str = int(args.processes) if args.processes.isdigit() else args.processes
    trees = [(patch.stem, patched(patch)) for patch in args.patches]  # before any process
    direct, worker = mock_worker()
    workdir = Path(f"/tmp/bench-cpusplit-{os.getpid()}")
    workdir.mkdir(exist_ok=True)
    systems: list[System] = []
    try:
        for name in args.variants:
            config = workdir / f"{name}.yaml"
            settings: dict[str, object] = {
                "server": {"host": "127.0.0.1", "port": 0, "processes": processes},
                "workers": [{"url": direct.url, "models": list(MODELS)}],
                "limits": {"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 4096},
                "logging": {"level": "INFO", "format": "json"},
                **VARIANTS[name],
            }
            config.write_text(yaml.safe_dump(settings))
            gw = start_gateway(config, log_file=workdir / f"{name}.log")
            systems.append(System(name, gw.url, gw.proc))
        for name, tree in trees:
            systems.append(start(name, tree, direct.url, workdir, processes))
        systems += [start_system(name, direct.url, workdir) for name in args.peers]
        systems.append(vllm_router(direct.url))
    except BaseException:
        _stop(systems, worker)
        raise
    rows = [
        "| system | worker | req/s | user µs / event | kernel µs / event | reads / event | "
        "writes / event | waits / event | preempted / event |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        for _ in range(args.repeats):
            for model in ("sim-realistic", "sim-model"):
                for system in systems:
                    rate, per_event = await measure(system, model, args.seconds)
                    rows.append(line(system.name, model, rate, per_event))
    finally:
        _stop(systems, worker)
    print("\n".join(rows))


def _stop(systems: list[System], worker: Proc) -> None:
    for system in systems:
        if system.proc is not None:
            system.proc.kill()
    worker.kill()


if __name__ == "__main__":
    uvloop.run(main())
