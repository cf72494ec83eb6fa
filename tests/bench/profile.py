"""`python -m tests.bench.profile SCENARIO`: where the gateway's CPU goes under one of
``make bench``'s scenarios. One serving process (so one profile holds all of it) runs under
py-spy while the load generator drives it; prints the top functions by own time and the
gateway's own functions by inclusive time; the raw profile is kept for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

import uvloop
import yaml

from tests.bench import loadgen
from tests.bench.loadgen import chat_body
from tests.bench.perf import SCENARIOS
from tests.bench.systems import FEATURES, MODELS, mock_worker
from tests.processes import start_gateway


async def drive(url: str, key: str, seconds: float) -> loadgen.Sample:
    sc = next(s for s in SCENARIOS if s.key == key)
    data = chat_body(sc.model, sc.stream, sc.prompt)
    if sc.rate:
        return await loadgen.open_loop(url, data, sc.stream, sc.rate, seconds, key)
    return await loadgen.closed_loop(url, data, sc.stream, sc.concurrency, seconds, key)


def py_spy() -> Path:
    """py-spy beside this interpreter; `make bench` installs it (the ``bench`` extra), and a
    checkout that only ran `make test` gets the extra's pin here, on first use."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        print("installing py-spy ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy>=0.4"],
                       check=True)  # fmt: skip
    return exe


def top(raw: Path, n: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"{total} samples", "-- own time"]
    lines += [f"{100 * c / total:5.1f}% {f}" for f, c in own.most_common(n)]
    lines.append("-- inclusive, the gateway's own functions")
    ours = [(f, c) for f, c in inclusive.most_common() if "gateway/" in f and "__main__" not in f]
    lines += [f"{100 * c / total:5.1f}% {f}" for f, c in ours[:n]]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    parser.add_argument("scenario", choices=[s.key for s in SCENARIOS])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=int, default=250, help="py-spy's samples per second")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vllm-gateway-profile.txt"))
    parser.add_argument(
        "--features",
        action="store_true",
        help="keys and rate limits, resume, affinity on (vllm-gateway+features)",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="py-spy --native: C frames too (aiohttp's, uvloop's, the kernel's)",
    )
    args = parser.parse_args()
    spy_exe = py_spy()
    direct, worker = mock_worker()
    config = args.out.with_suffix(".yaml")
    settings: dict[str, object] = {
        "server": {"host": "127.0.0.1", "port": 0, "processes": 1},
        "workers": [{"url": direct.url, "models": list(MODELS)}],
        "limits": {"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 4096},
        "logging": {"level": "INFO", "format": "json"},
    }
    if args.features:
        settings.update(FEATURES)
    config.write_text(yaml.safe_dump(settings))
    # As in `make bench`: the access log goes to a file, not a pipe the profiler's process reads.
    gw = start_gateway(config, log_file=args.out.with_suffix(".log"))
    try:
        url = f"{gw.url}/v1/chat/completions"
        await drive(url, args.scenario, 2.0)  # warm up
        spy = subprocess.Popen(
            [str(spy_exe), "record", "--rate", str(args.rate),
             "--format", "raw", "--output", str(args.out), "--duration", str(int(args.seconds)),
             "--pid", str(gw.proc.popen.pid), *(["--native"] if args.native else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        s = await drive(url, args.scenario, args.seconds + 1)
        spy.wait(30)
        sc = next(x for x in SCENARIOS if x.key == args.scenario)
        print(
            f"{args.scenario}: {s.rate:.0f} req/s, {s.rate * sc.events:.0f} SSE events/s, "
            f"{s.errors} errors"
        )
        print(top(args.out, args.top))
    finally:
        gw.proc.kill()
        worker.kill()


if __name__ == "__main__":
    uvloop.run(main())
