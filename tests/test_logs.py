"""The log handler: lines leave in batches, on a writer thread, so a stderr nobody reads never
stalls the loop; what waits is bounded and drops are told."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

import orjson
import pytest

from gateway.logs import JsonFormatter, LoopBatchedHandler

DEADLINE = 5.0


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.gate = threading.Event()
        self.gate.set()

    def write(self, text: str) -> int:
        self.gate.wait(DEADLINE)  # a test closes the gate to play a stderr nobody reads
        self.writes += 1
        return super().write(text)


Logger = tuple[logging.Logger, LoopBatchedHandler, CountingStream]


@pytest.fixture
def logger() -> Iterator[Logger]:
    stream = CountingStream()
    handler = LoopBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.batched")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, handler, stream
    stream.gate.set()
    log.handlers[:] = []


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


async def async_wait_until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_a_batch_is_one_write(logger: Logger) -> None:
    log, handler, stream = logger
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(5):
        log.info("line %d", i)
        await asyncio.sleep(0)  # lines of several turns...
    await async_wait_until(lambda: stream.writes == 1, "one write")  # ...go out together
    assert loop.time() - started >= handler.HANDOVER_INTERVAL * 0.9
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(5))
    log.info("later")
    await async_wait_until(lambda: stream.writes == 2, "a second write for the next batch")
    assert stream.getvalue().endswith("later\n")


def test_outside_a_loop_a_line_goes_at_once(logger: Logger) -> None:
    log, _, stream = logger
    log.info("now")
    wait_until(lambda: stream.getvalue() == "now\n", "the line written")


async def test_flush_writes_what_is_pending(logger: Logger) -> None:
    log, handler, stream = logger
    log.info("pending")
    handler.flush()  # as logging.shutdown does at exit
    assert stream.getvalue() == "pending\n"


async def test_a_stderr_nobody_reads_stalls_the_writer_not_the_loop(
    logger: Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. The stream blocks. 2. Turns of lines keep coming and the loop keeps turning.
    3. Past the bound, lines are dropped. 4. The stream moves again: what was queued is
    written, then the count of what was dropped, then new lines."""
    log, handler, stream = logger
    monkeypatch.setattr(handler, "MAX_QUEUED", 100)
    stream.gate.clear()
    started = time.monotonic()
    monkeypatch.setattr(handler, "HANDOVER_INTERVAL", 0.0)  # a batch per turn
    for turn in range(20):
        log.info("turn %02d %s", turn, "x" * 20)
        await asyncio.sleep(0.001)
    assert time.monotonic() - started < 1.0  # never waited for the stream
    stream.gate.set()
    log.info("after")
    handler.flush()
    text = stream.getvalue()
    assert "turn 00" in text and text.endswith("after\n")
    assert "log lines dropped: stderr was not read fast enough" in text
    dropped = int(text.split(" log lines dropped")[0].rsplit("\n", 1)[-1])
    kept = text.count("turn ")
    assert dropped + kept == 20 and dropped > 0


def test_json_lines_name_the_process() -> None:
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    line = orjson.loads(JsonFormatter().format(record))
    assert isinstance(line["pid"], int) and line["msg"] == "hello"


def test_the_direct_access_line_is_the_line_logging_would_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway import logs

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        token = logs.request_id_var.set("req-1")  # as the middleware sets it
        [handler] = root.handlers
        fields = {"route": "chat_completions", "status": 200, "ttft": None}
        access = logs.AccessLog("gateway.access")
        access.write("req-1", fields)  # straight to the handler
        logging.getLogger("gateway.access").addFilter(lambda _: True)  # now through logging
        access.write("req-1", fields)
        handler.flush()
        logs.request_id_var.reset(token)
    finally:
        logging.getLogger("gateway.access").filters.clear()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        monkeypatch.setattr(logs, "_direct", None)
    direct, logged = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert abs(direct.pop("ts") - logged.pop("ts")) < 5
    assert direct == logged
    assert direct["request_id"] == "req-1" and direct["route"] == "chat_completions"
