"""The benchmarks' load generator: asyncio with uvloop, closed loop (a fixed number of requests
in flight) or open loop (a fixed arrival rate), streaming or not.

Per request it records the time to the first content token (the first chunk carrying a
non-empty ``content``), every gap between chunks after it, the total time, and whether it
failed: a status other than 200, a connection error, a client timeout, or a stream that ended
without ``[DONE]``. A progress line goes to stderr while a run lasts.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

# A delta whose content is not empty: the first token, whichever proxy re-serialised it.
_CONTENT = re.compile(rb'"content":\s?"[^"]')
REQUEST_TIMEOUT = 60.0
OPEN_LOOP_MAX_OUTSTANDING = 8192  # an open loop past this counts its arrivals as errors
AUTH = {"Authorization": "Bearer sk-bench-0123456789"}  # LiteLLM insists; others ignore it


@dataclass
class Sample:
    """One run of one system: per-request figures in arrays (millions of gaps stay compact)."""

    ttft: array[float] = field(default_factory=lambda: array("d"))
    total: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))
    max_gap: array[float] = field(default_factory=lambda: array("d"))  # per stream
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu: float = 0.0  # the system's CPU seconds during the run (its whole process tree)
    kernel: float = 0.0  # the kernel's part of ``cpu``
    rss_mb: float = 0.0  # the system's peak resident memory during the run (whole tree)

    @property
    def rate(self) -> float:
        return len(self.total) / self.seconds if self.seconds else 0.0

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def quantile(values: array[float] | list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def chat_body(model: str, stream: bool, size: int = 0) -> bytes:
    """A chat request: one short message, or with ``size`` a conversation of about that many
    bytes as agents and chat front-ends send them (a system prompt, ten tools with JSON
    schemas, turns of user and assistant text with a tool call and its result)."""
    if not size:
        return orjson.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        )
    words = " ".join(f"word{i % 97}" for i in range(size // 8))
    tools = [
        {"type": "function", "function": {
            "name": f"tool_{i}", "description": f"Does thing {i} to the given path.",
            "parameters": {"type": "object", "required": ["path"], "properties": {
                "path": {"type": "string", "description": "Where."},
                "depth": {"type": "integer", "minimum": 0},
            }},
        }}
        for i in range(10)
    ]  # fmt: skip
    messages: list[dict[str, object]] = [{"role": "system", "content": words[: size // 4]}]
    arguments = '{"path": "/tmp", "depth": 2}'
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "tool_0", "arguments": arguments},
    }
    messages += [
        {"role": "user", "content": "Look at /tmp."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": "a b c"},
    ]
    body: dict[str, object] = {
        "model": model, "messages": messages, "tools": tools, "stream": stream,
        "temperature": 0.7, "max_tokens": 512,
    }  # fmt: skip
    turn = 0
    while len(orjson.dumps(body)) < size:
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": words[turn * 97 % 500 :][: size // 16]})
        turn += 1
    messages.append({"role": "user", "content": "And now?"})
    return orjson.dumps(body)


async def one(
    session: aiohttp.ClientSession, url: str, data: bytes, stream: bool, s: Sample
) -> None:
    started = time.perf_counter()
    first: float | None = None
    gaps: list[float] = []
    headers = {"Content-Type": "application/json", **AUTH}
    try:
        async with session.post(url, data=data, headers=headers) as r:
            if r.status != 200:
                await r.read()
                s.fail(f"status {r.status}")
                return
            if stream:
                last = b""
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    if first is None:
                        if _CONTENT.search(chunk):
                            first = last_at = now
                    else:
                        gaps.append(now - last_at)
                        last_at = now
                    last = (last + chunk)[-64:]
                if b"[DONE]" not in last:
                    s.fail("truncated")
                    return
            else:
                await r.read()
                first = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        s.fail(type(exc).__name__)
        return
    end = time.perf_counter()
    s.ttft.append((first or end) - started)
    s.total.append(end - started)
    if gaps:
        s.gaps.extend(gaps)
        s.max_gap.append(max(gaps))


def _session(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


async def closed_loop(
    url: str,
    data: bytes,
    stream: bool,
    concurrency: int,
    seconds: float,
    label: str,
    ramp: float = 0.0,
    warm: float = 0.0,
    meter: Callable[[], tuple[float, float]] | None = None,
) -> Sample:
    """``concurrency`` clients each send a request as soon as their last one ended, for
    ``seconds`` (started over ``ramp`` seconds, so a thousand connects do not land at once).

    With ``warm``, the sample holds only the steady state: requests that started in a window
    of ``seconds`` that opens ``ramp + warm`` after the start (connects, the first wave in
    step, pools filling are over by then), and ``rate`` is their number over the window.
    ``meter`` (CPU and kernel seconds of the system measured) is read when the window opens
    and when it closes; the differences go to ``cpu`` and ``kernel``."""
    s = Sample()
    opens = ramp + warm if warm else 0.0
    start = time.perf_counter()
    window = (start + opens, start + opens + seconds) if warm else (start, start + ramp + seconds)
    readings: list[tuple[float, float]] = []
    async with _session(concurrency) as session:

        async def client(i: int) -> None:
            if ramp:
                await asyncio.sleep(ramp * i / concurrency)
            cold = Sample()
            while (now := time.perf_counter()) < window[1]:
                await one(session, url, data, stream, s if now >= window[0] else cold)

        async def read_meter() -> None:
            if meter is None:
                return
            for edge in window:
                await asyncio.sleep(max(0.0, edge - time.perf_counter()))
                readings.append(meter())

        reading = asyncio.ensure_future(read_meter())
        await _with_progress(
            asyncio.gather(*(client(i) for i in range(concurrency))), s, start, window[1], label
        )
        await reading
        s.seconds = seconds if warm else time.perf_counter() - start - ramp / 2
    if len(readings) == 2:
        (cpu0, kernel0), (cpu1, kernel1) = readings
        s.cpu, s.kernel = cpu1 - cpu0, kernel1 - kernel0
    return s


async def open_loop(
    url: str, data: bytes, stream: bool, rate: float, seconds: float, label: str
) -> Sample:
    """A request every ``1/rate`` seconds for ``seconds``, whether or not earlier ones ended."""
    s = Sample()
    started = time.perf_counter()
    deadline = started + seconds
    async with _session(0) as session:
        tasks: set[asyncio.Task[None]] = set()

        async def arrivals() -> None:
            n = 0
            while (now := time.perf_counter()) < deadline:
                due = started + n / rate
                if due > now:
                    await asyncio.sleep(due - now)
                n += 1
                if len(tasks) >= OPEN_LOOP_MAX_OUTSTANDING:
                    s.fail("client backlog")
                    continue
                task = asyncio.create_task(one(session, url, data, stream, s))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

        await _with_progress(arrivals(), s, started, deadline, label)
        s.seconds = time.perf_counter() - started
    return s


async def taking_turns(
    urls: list[str], data: bytes, stream: bool, seconds: float, label: str
) -> list[Sample]:
    """One request at a time to each URL in turn (each over its own kept connection), for
    ``seconds``: a Sample per URL. Runs one after another see different moments of a noisy
    machine; taking turns, every system sees the same ones, so the difference of two systems'
    latencies is what one adds to the other, not what the machine did meanwhile."""
    samples = [Sample() for _ in urls]
    sessions = [_session(1) for _ in urls]
    started = time.perf_counter()
    deadline = started + seconds

    async def turns() -> None:
        while time.perf_counter() < deadline:
            for session, url, s in zip(sessions, urls, samples, strict=True):
                await one(session, url, data, stream, s)

    try:
        await _with_progress(turns(), samples[-1], started, deadline, label)
    finally:
        for session in sessions:
            await session.close()
    for s in samples:
        s.seconds = time.perf_counter() - started
    return samples


async def _with_progress(
    work: Awaitable[object], s: Sample, started: float, deadline: float, label: str
) -> None:
    task = asyncio.ensure_future(work)
    tty = sys.stderr.isatty()
    every = 0.5 if tty else 10.0
    while not task.done():
        await asyncio.wait([task], timeout=every)
        _progress(s, started, deadline, label, tty, final=task.done())
    await task


def _progress(
    s: Sample, started: float, deadline: float, label: str, tty: bool, final: bool
) -> None:
    span = max(deadline - started, 1e-9)
    done = min(1.0, (time.perf_counter() - started) / span)
    bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
    line = f"{label:<44} [{bar}] {len(s.total):>7} ok {s.errors:>5} errors"
    if tty:
        print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or done < 1.0:
        print(line, file=sys.stderr, flush=True)


Runner = Callable[[], Awaitable[Sample]]
