"""`python -m tests.bench.resume_memory`: what resume costs in memory while long streams run.

Method: one simulated vLLM worker (a subprocess; a token every ITL seconds, as fast as its CPU
lets it on these cores) behind a one-process gateway, resume on and then off. STREAMS chat
streams of TOKENS tokens run at once, each read to its end; the gateway's resident memory
(VmRSS) is sampled every 0.2 s. Printed: RSS before the load, its peak, and the difference,
for each setting. The difference between the two settings is what the resumable streams'
transcripts held at their largest (``gateway.resume.Transcript``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from tests.processes import start_gateway, start_simulator, write_config

STREAMS = 100
TOKENS = 2000
ITL = 0.01


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def peak_during_load(url: str, pid: int, streams: int, tokens: int) -> tuple[float, float]:
    """RSS before the streams and at their peak, in MiB."""
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "Tell a story."}],
            "stream": True, "max_tokens": tokens}  # fmt: skip
    before = peak = rss_mib(pid)
    ended = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal ended
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            async for _ in response.content.iter_any():
                pass
        ended += 1

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.2)

    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(one(s) for _ in range(streams)))
        finally:
            sampler.cancel()
    assert ended == streams
    return before, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    args = parser.parse_args()
    sim = start_simulator("--itl", str(ITL), "--ttft", "0.01", "--max-num-seqs", "1024",
                          "--max-model-len", "100000")  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for resume in (True, False):
                config = write_config(
                    Path(tmp) / f"resume-{resume}.yaml", [sim.url],
                    resume={"enabled": resume}, timeouts={"total": 900.0, "first_token": 300.0},
                    limits={"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 4096},
                )  # fmt: skip
                gateway = start_gateway(config, log_file=Path(tmp) / f"resume-{resume}.log")
                try:
                    started = time.monotonic()
                    before, peak = uvloop.run(
                        peak_during_load(gateway.url, gateway.proc.popen.pid, args.streams,
                                         args.tokens)
                    )  # fmt: skip
                finally:
                    gateway.proc.kill()
                print(
                    f"resume {'on ' if resume else 'off'}: {args.streams} streams x {args.tokens} "
                    f"tokens in {time.monotonic() - started:.0f} s; RSS {before:.0f} MiB before, "
                    f"{peak:.0f} MiB at peak, +{peak - before:.0f} MiB"
                )
    finally:
        sim.proc.kill()


if __name__ == "__main__":
    main()
