"""`python -m tests.bench.resume_memory`: what resume costs in memory while long streams run.

Method: one simulated vLLM worker (a subprocess; a token every ITL seconds, as fast as its CPU
lets it on these cores) behind a one-process gateway, resume on and then off. STREAMS chat
streams of TOKENS tokens run at once, each read to its end; the gateway's resident memory
(VmRSS) is sampled every 50 ms (``systems.RssSampler``). Printed: RSS before the load, its
peak, and the difference, for each setting. The difference between the two settings is what
the resumable streams' transcripts held at their largest (``gateway.resume.Transcript``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from tests.bench.systems import RssSampler, System
from tests.processes import start_gateway, start_simulator, write_config

STREAMS = 100
TOKENS = 2000
ITL = 0.01


async def peak_during_load(system: System, streams: int, tokens: int) -> tuple[float, float]:
    """The gateway's RSS before the streams and at their peak, in MiB."""
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "Tell a story."}],
            "stream": True, "max_tokens": tokens}  # fmt: skip

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(f"{system.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            async for _ in response.content.iter_any():
                pass

    before = system.rss_mb()
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        with RssSampler(system) as rss:
            await asyncio.gather(*(one(s) for _ in range(streams)))
    return before, rss.peak


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
                    system = System("vllm-gateway", gateway.url, gateway.proc)
                    before, peak = uvloop.run(peak_during_load(system, args.streams, args.tokens))
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
