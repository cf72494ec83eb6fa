"""`python -m tests.bench.ab REV [REV ...]`: the gateway at other commits against the working
tree, side by side in one run (runs alternate, so machine noise falls on all alike): req/s,
CPU per request and TTFT p99 (and what it adds over the mock worker, direct) under `make
bench`'s scenarios (the paced ones in perf's steady window), one serving process each. For
checking that a change to the hot path pays before it lands. `--processes 1 2` runs the
working tree once per process count instead (REVs optional): what `server.processes` is worth
on this machine; the REVs run with the first count (`--processes 2`: every system with two
processes, as the keeper of per-key limits needs). `--patches FILE ...` runs HEAD with each patch
applied (``tests/bench/ablations``): what taking a piece of the request path out would save."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

import uvloop
import yaml

from tests.bench.loadgen import quantile
from tests.bench.perf import SCENARIOS, measure
from tests.bench.systems import CACHE, FEATURES, MODELS, ROOT, System, mock_worker
from tests.processes import START_TIMEOUT, Proc, http_status, poll_until


def _git(*args: str) -> str:
    """``git -C ROOT args``; its own message, not only a status, when it fails."""
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _worktree(path: Path, sha: str) -> None:
    _git("worktree", "prune")  # a worktree deleted by hand is still registered until then
    _git("worktree", "add", "--detach", str(path), sha)


def checkout(rev: str) -> Path:
    # By commit, not by name: a worktree made for `HEAD` must not stand for a later HEAD.
    sha = _git("rev-parse", "--short", rev)
    path = CACHE / f"ab-{sha}"
    if not path.exists():
        _worktree(path, sha)
    return path


APPLIED = ".ablation-applied"  # written in a patched worktree once the patch is in


def patched(patch: Path) -> Path:
    """A worktree of HEAD with ``patch`` applied, made once per commit and patch. A patch that
    no longer applies fails here, by name; a worktree left half made (the patch refused, or
    the run interrupted) is made again, never measured as if patched."""
    head = _git("rev-parse", "--short", "HEAD")
    digest = hashlib.sha256(patch.read_bytes()).hexdigest()[:8]
    path = CACHE / f"ab-{head}-{patch.stem}-{digest}"
    if (path / APPLIED).exists():
        return path
    if path.exists():
        _git("worktree", "remove", "--force", str(path))
    _worktree(path, head)
    try:
        subprocess.run(["git", "-C", str(path), "apply", str(patch.resolve())], check=True)
        (path / APPLIED).touch()
    except BaseException:
        _git("worktree", "remove", "--force", str(path))
        raise
    return path


def start(
    name: str,
    tree: Path,
    worker: str,
    workdir: Path,
    processes: int | str = 1,
    features: bool = False,
) -> System:
    config = workdir / f"{name}.yaml"
    server: dict[str, object] = {"host": "127.0.0.1", "port": 0}
    if "processes" in (tree / "gateway" / "settings.py").read_text():
        server["processes"] = processes  # older commits have one process and no such key
    config.write_text(yaml.safe_dump({
        "server": server,
        "workers": [{"url": worker, "models": list(MODELS)}],
        "limits": {"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 4096},
        "logging": {"level": "INFO", "format": "json"},
        **(FEATURES if features else {}),
    }))  # fmt: skip
    args = [sys.executable, "-m", "gateway", "--config", str(config)]
    proc = Proc(args, cwd=tree, name=name, log_file=workdir / f"{name}.log")
    match = proc.wait_line(r"listening on (http://127\.0\.0\.1:\d+)", START_TIMEOUT)
    url = match.group(1)
    poll_until(lambda: http_status(url, "/ready") == 200, START_TIMEOUT, f"{name} ready")
    return System(name, url, proc)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ab")
    parser.add_argument("revs", nargs="*")
    parser.add_argument("--processes", type=int, nargs="+", default=[1])
    parser.add_argument("--scenarios", nargs="+", default=["c64-stream", "c64-json", "open-200"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--features", action="store_true", help="keys, rate limits, resume, affinity on (perf's)"
    )
    parser.add_argument("--patches", type=Path, nargs="+", default=[],
                        help="HEAD with each patch applied, one system a patch")  # fmt: skip
    args = parser.parse_args()
    workdir = CACHE / "ab-run"
    workdir.mkdir(parents=True, exist_ok=True)
    # Every tree first: a commit or patch that fails leaves no process behind.
    trees = [(rev, checkout(rev)) for rev in args.revs]
    trees += [(p.stem, patched(p)) for p in args.patches]
    direct, worker = mock_worker()
    systems: list[System] = []
    try:
        for name, tree in trees:
            systems.append(start(name, tree, direct.url, workdir, args.processes[0], args.features))
        for n in args.processes:
            name = "working-tree" if args.processes == [1] else f"working-tree x{n}"
            systems.append(
                start(name.replace(" ", "-"), ROOT, direct.url, workdir, n, args.features)
            )
    except BaseException:
        for system in systems:
            if system.proc is not None:
                system.proc.kill()
        worker.kill()
        raise
    await asyncio.sleep(2)  # first probes done
    systems.insert(0, direct)  # for added TTFT: its figures are the baseline of each repeat
    table: dict[tuple[str, str], list[tuple[float, float, float, float, int]]] = {}
    try:
        for i in range(args.repeats):
            for key in args.scenarios:
                sc = next(s for s in SCENARIOS if s.key == key)
                for system in systems[i % len(systems) :] + systems[: i % len(systems)]:
                    s = await measure(system, sc, args.seconds, f"#{i + 1} {key} {system.name}")
                    done = max(len(s.total), 1)
                    p99 = 1000 * quantile(s.ttft, 0.99)
                    table.setdefault((key, system.name), []).append(
                        (s.rate, 1000 * s.cpu / done, 1000 * s.kernel / done, p99, s.errors)
                    )
                    await asyncio.sleep(0.5)
    finally:
        for system in systems:
            if system.proc is not None:
                system.proc.kill()
        worker.kill()
    print("| scenario | gateway | req/s | CPU ms / req | of which kernel | TTFT p99 (ms) per "
          "repeat | added over direct | errors |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for (key, name), runs in table.items():
        if name == "direct":
            continue
        rates, cpus, kernels, p99s, errors = ([run[i] for run in runs] for i in range(5))
        base = [run[3] for run in table[(key, "direct")]]
        added = ", ".join(f"{a - b:+.1f}" for a, b in zip(p99s, base, strict=True))
        print(f"| {key} | {name} | {statistics.median(rates):.0f} ({min(rates):.0f}-"
              f"{max(rates):.0f}) | {statistics.median(cpus):.3f} ({min(cpus):.3f}-"
              f"{max(cpus):.3f}) | {statistics.median(kernels):.3f} | "
              f"{', '.join(f'{p:.1f}' for p in p99s)} | {added} | {sum(errors)} |")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    uvloop.run(main())
