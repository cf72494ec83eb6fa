"""`make bench-resume`: streams that survive a dying worker, resume on vs off, side by side.

Method: 3 simulated vLLM workers (subprocesses) behind one gateway subprocess. A closed-loop
client keeps CONCURRENCY chat streams running (each a distinct question, MAX_TOKENS tokens at
ITL seconds apart). Every KILL_EVERY seconds one worker (in turn) is SIGKILLed and restarted on
its port RESTART_AFTER seconds later, so at most one of three is down at a time. A stream is
intact when it ends with `[DONE]`, carries no error event, and its text equals the answer an
uninterrupted worker gives (the simulator's text is a deterministic function of the request,
computed here with its own functions). Runs alternate resume on / off (REPEATS each) so both
see the same machine; the result table goes to tests/bench/RESUME.md.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from gateway.simulator.text import answer_key, token_text
from tests.bench.common import machine, options
from tests.processes import GatewayProc, Sim, _try_simulator, free_port, start_gateway, write_config

RESULTS = Path(__file__).with_name("RESUME.md")
CONCURRENCY = 24
MAX_TOKENS = 60
ITL = 0.01
KILL_EVERY = 2.0
RESTART_AFTER = 1.0
SIM_ARGS = ("--itl", str(ITL), "--itl-per-seq", "0", "--ttft", "0.01", "--max-num-seqs", "64")


@dataclass
class Tally:
    started: int = 0
    intact: int = 0
    broken: int = 0  # ended with an error event, cut, or wrong text
    refused: int = 0  # an error status before any byte
    kills: int = 0
    resumed: float = 0.0
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        done = self.intact + self.broken + self.refused
        return self.intact / done if done else 0.0


def expected_text(question: str) -> str:
    key = answer_key({"messages": [["user", question]]}, None)
    return "".join(token_text(key, i) for i in range(MAX_TOKENS))


async def one_stream(session: aiohttp.ClientSession, url: str, n: int, tally: Tally) -> None:
    question = f"question number {n} about gateways"
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    tally.started += 1
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                tally.refused += 1
                tally.problems[f"status {resp.status}"] = (
                    tally.problems.get(f"status {resp.status}", 0) + 1
                )
                await resp.read()
                return
            raw = await resp.read()
    except aiohttp.ClientError as exc:
        tally.broken += 1
        note(tally, type(exc).__name__)
        return
    verdict = judge(raw, expected_text(question))
    if verdict == "intact":
        tally.intact += 1
    else:
        tally.broken += 1
        note(tally, verdict)


def note(tally: Tally, problem: str) -> None:
    tally.problems[problem] = tally.problems.get(problem, 0) + 1


def judge(raw: bytes, expected: str) -> str:
    events = [b.removeprefix(b"data: ") for b in raw.split(b"\n\n") if b.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return "no [DONE]"
    text = []
    for data in events[:-1]:
        event = orjson.loads(data)
        if "error" in event:
            return f"error {event['error'].get('code')}"
        for choice in event.get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
    return "intact" if "".join(text) == expected else "wrong text"


async def load(url: str, seconds: float, tally: Tally) -> None:
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def loop() -> None:
            while time.monotonic() < deadline:
                await one_stream(session, url, next(counter), tally)

        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


async def chaos(sims: list[Sim], ports: list[int], seconds: float, tally: Tally) -> None:
    """Kill one worker in turn every KILL_EVERY s; bring it back RESTART_AFTER s later."""
    deadline = time.monotonic() + seconds
    victim = 0
    while time.monotonic() + KILL_EVERY < deadline:
        await asyncio.sleep(KILL_EVERY - RESTART_AFTER)
        sims[victim].proc.kill()
        tally.kills += 1
        await asyncio.sleep(RESTART_AFTER)
        sims[victim] = await asyncio.to_thread(restart, ports[victim])
        victim = (victim + 1) % len(sims)


def restart(port: int) -> Sim:
    for _ in range(50):
        sim = _try_simulator(port, "sim-model", SIM_ARGS)
        if sim is not None:
            return sim
        time.sleep(0.1)
    raise RuntimeError(f"cannot restart the simulator on port {port}")


async def run(resume: bool, seconds: float, workdir: Path) -> Tally:
    ports = [free_port() for _ in range(3)]
    sims = [restart(p) for p in ports]
    config = write_config(
        workdir / f"gateway-{'on' if resume else 'off'}.yaml",
        [s.url for s in sims],
        resume={"enabled": resume},
        health={"interval": 0.5, "timeout": 0.5, "failures_to_eject": 1, "ejection_time": 1.0},
        retry={"budget_ratio": 1.0, "budget_min": 1000},
    )
    tally = Tally()
    gateway: GatewayProc | None = None
    try:
        gateway = start_gateway(config)
        await asyncio.gather(load(gateway.url, seconds, tally), chaos(sims, ports, seconds, tally))
        tally.resumed = await resumes(gateway.url)
    finally:
        if gateway is not None:
            gateway.proc.kill()
        for sim in sims:
            sim.proc.kill()
    return tally


async def resumes(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_stream_resumes_total{") and 'outcome="resumed"' in line
    )


HEADER = (
    "| resume | streams | workers killed | intact (median over runs, range) | resumed "
    "| what the others saw |\n|---|---|---|---|---|---|"
)


def write(results: dict[bool, list[Tally]], seconds: float) -> str:
    rows = []
    for resume in (True, False):
        runs = results[resume]
        shares = [100 * t.share for t in runs]
        problems: dict[str, int] = {}
        for t in runs:
            for k, v in t.problems.items():
                problems[k] = problems.get(k, 0) + v
        rows.append(
            f"| {'on' if resume else 'off'} | {sum(t.intact + t.broken + t.refused for t in runs)} "
            f"| {sum(t.kills for t in runs)} | {statistics.median(shares):.2f}% "
            f"({min(shares):.2f} to {max(shares):.2f}) | {sum(t.resumed for t in runs):.0f} "
            f"| {', '.join(f'{k}: {v}' for k, v in sorted(problems.items())) or 'none'} |"
        )
    text = f"""# `make bench-resume`: streams that survive a dying worker

{__doc__.split(chr(10), 2)[2].strip()}

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; machine: {machine()}
- Per run: {seconds:.0f} s, {CONCURRENCY} concurrent streams of {MAX_TOKENS} tokens at
  {ITL * 1000:.0f} ms, a worker killed every {KILL_EVERY:.0f} s and back {RESTART_AFTER:.0f} s
  later; {len(results[True])} runs per mode, interleaved.
- Command: `make bench-resume` (`python -m tests.bench.resume`).

{HEADER}
{chr(10).join(rows)}

With resume off, every stream that was mid-answer on the killed worker ends with one in-band
error event (`upstream_stream_truncated`) and `[DONE]`: never a truncated stream that looks
complete. With resume on, another worker continues the partial answer and the client's text is
exactly the uninterrupted answer.
"""
    RESULTS.write_text(text, encoding="utf-8")
    return text


async def main() -> None:
    args, workdir = options("resume", 20.0, 2)
    results: dict[bool, list[Tally]] = {True: [], False: []}
    for i in range(args.repeats):
        for resume in (True, False):
            print(
                f"run {i + 1}/{args.repeats}, resume {'on' if resume else 'off'} ...",
                file=sys.stderr,
                flush=True,
            )
            tally = await run(resume, args.seconds, workdir)
            print(f"  {tally}", file=sys.stderr, flush=True)
            results[resume].append(tally)
    print(write(results, args.seconds))


if __name__ == "__main__":
    asyncio.run(main())
