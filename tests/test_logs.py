"""The log handler: the lines of one event-loop turn leave in one write, none waits longer."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from gateway.logs import JsonFormatter, LoopBatchedHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logger() -> tuple[logging.Logger, LoopBatchedHandler, CountingStream]:
    stream = CountingStream()
    handler = LoopBatchedHandler()
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.batched")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, handler, stream


async def test_one_turn_is_one_write_and_is_written_by_the_next_turn(
    logger: tuple[logging.Logger, LoopBatchedHandler, CountingStream],
) -> None:
    log, _, stream = logger
    for i in range(5):
        log.info("line %d", i)
    assert stream.getvalue() == ""  # nothing written inside the turn...
    await asyncio.sleep(0)  # ...and all of it once the loop turns
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(5))
    assert stream.writes == 1
    log.info("later")
    await asyncio.sleep(0)
    assert stream.getvalue().endswith("later\n") and stream.writes == 2


def test_outside_a_loop_every_line_is_written_at_once(
    logger: tuple[logging.Logger, LoopBatchedHandler, CountingStream],
) -> None:
    log, _, stream = logger
    log.info("now")
    assert stream.getvalue() == "now\n"


async def test_flush_writes_what_is_pending(
    logger: tuple[logging.Logger, LoopBatchedHandler, CountingStream],
) -> None:
    log, handler, stream = logger
    log.info("pending")
    handler.flush()  # as logging.shutdown does at exit
    assert stream.getvalue() == "pending\n"


def test_json_lines_name_the_process() -> None:
    import orjson

    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    line = orjson.loads(JsonFormatter().format(record))
    assert isinstance(line["pid"], int) and line["msg"] == "hello"
