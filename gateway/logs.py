"""Logging: JSON or text lines, each carrying the id of the request it is about.

The request id travels in a context variable set by the request-id middleware, so every log
line written while handling a request carries it without passing it around. Nothing here logs
bodies or headers: prompts, completions and credentials never reach the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:  # the supervisor logs without loading the settings models (see there)
    from gateway.settings import LogSettings

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message key=value ...`` in UTC."""

    converter = staticmethod(time.gmtime)

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()  # which serving process, when there are several

    def format(self, record: logging.LogRecord) -> str:
        line = self.fields(
            record.created, record.levelname, record.name, record.getMessage(),
            getattr(record, "request_id", "-"),
        )  # fmt: skip
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()

    def fields(
        self, created: float, level: str, logger: str, msg: str, request_id: str
    ) -> dict[str, Any]:
        return {
            "ts": round(created, 3),
            "level": level,
            "logger": logger,
            "pid": self._pid,
            "msg": msg,
            "request_id": request_id,
        }


class RepeatFilter(logging.Filter):
    """Warnings and errors that repeat are let through at most ``BURST`` times per ``WINDOW``
    seconds for each logger and message template; the first line let through after some were
    held back says how many (``suppressed=N``). A worker that is down, or a Redis that is
    unreachable, fails every request and probe: one line per failure would bury everything
    else. INFO lines (the access log among them) always pass.
    """

    WINDOW = 10.0
    BURST = 5
    MAX_KEYS = 1024  # templates tracked at once; a message built without a template is unique

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, object], _Repeats] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        repeats = self._seen.get(key)
        if repeats is None or record.created - repeats.since >= self.WINDOW:
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            if repeats is not None and repeats.held:
                record.suppressed = repeats.held
            self._seen[key] = _Repeats(record.created)
            return True
        if repeats.passed < self.BURST:
            repeats.passed += 1
            return True
        repeats.held += 1
        return False


@dataclass(slots=True)
class _Repeats:
    """One message template's current window: when it began, lines let through, held back."""

    since: float
    passed: int = 1
    held: int = 0


class LoopBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that never blocks the event loop on a write, and writes lines in batches.

    The loop thread formats each line and, ``HANDOVER_INTERVAL`` after the first line of a
    batch, hands the batch to one writer thread, which does the writing: a slow reader of
    stderr (a full pipe, a busy log collector) then stalls that thread, never the requests, and
    there is one write per batch, not per line. What waits for the writer is
    bounded (``MAX_QUEUED`` characters): past it a turn's lines are dropped, counted, and the
    count is written as a line of its own once the writer catches up. Outside a running loop a
    line is handed over at once. ``flush`` (also run by ``logging.shutdown``) hands over what is
    pending and waits, up to ``FLUSH_TIMEOUT``, until it is written.
    """

    # Lines are handed to the writer at most this often: waking a thread (and handing it the
    # GIL) once per loop turn was a large share of a small JSON request's CPU.
    HANDOVER_INTERVAL = 0.05
    MAX_QUEUED = 8 * 1024 * 1024
    FLUSH_TIMEOUT = 2.0

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._pending: list[str] = []
        self._queue: SimpleQueue[str] = SimpleQueue()
        self._state = threading.Condition(threading.Lock())
        self._queued = 0  # characters handed over and not yet written (under _state)
        self._dropped = 0  # lines dropped since the last note of it (under _state)
        threading.Thread(target=self._write_forever, name="log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)

    def write_line(self, line: str) -> None:
        """A formatted line, into the batch (``emit`` without the record)."""
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a hand-over is already scheduled
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand_over()
            return
        loop.call_later(self.HANDOVER_INTERVAL, self._hand_over)

    def _hand_over(self) -> None:
        # Under the handler's lock, which ``handle`` holds around ``emit``: a line another
        # thread logs while the loop hands over is in this batch or the next, never lost.
        self.acquire()
        try:
            lines, self._pending = self._pending, []
        finally:
            self.release()
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        with self._state:
            if self._queued + len(text) > self.MAX_QUEUED:
                self._dropped += len(lines)
                return
            if self._dropped:
                text = (
                    f"{self._dropped} log lines dropped: stderr was not read fast enough\n" + text
                )
                self._dropped = 0
            self._queued += len(text)
        self._queue.put(text)

    def _write_forever(self) -> None:
        while True:
            text = self._queue.get()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone: nobody to tell
            with self._state:
                self._queued -= len(text)
                self._state.notify_all()

    def flush(self) -> None:
        self._hand_over()
        with self._state:
            self._state.wait_for(lambda: self._queued == 0, self.FLUSH_TIMEOUT)


class AccessLog:
    """The access log, a line per request. With the JSON format and nothing else listening it
    goes straight to the handler: the same line, without a ``LogRecord`` (twenty attributes,
    the filter, the scan for extras), a visible share of a small request's CPU. Otherwise
    (text format, a test's capture handler) it goes through ``logging`` as any line does."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, request_id: str, fields: dict[str, Any]) -> None:
        handler = _direct
        logger = self._logger
        if (
            handler is not None
            and len(logging.root.handlers) == 1
            and logging.root.handlers[0] is handler
            and logger.propagate
            and not logger.handlers
            and not logger.filters
        ):
            formatter = handler.formatter
            assert isinstance(formatter, JsonFormatter)
            line = formatter.fields(time.time(), "INFO", logger.name, "request", request_id)
            line.update(fields)
            handler.write_line(orjson.dumps(line, default=str).decode())
        else:
            logger.info("request", extra={"request_id": request_id, **fields})


# The handler configure() installed, when its lines are JSON (AccessLog writes to it directly).
_direct: LoopBatchedHandler | None = None


def configure_logging(settings: LogSettings) -> None:
    configure(settings.level, settings.format)


def configure(level: str, fmt: str) -> None:
    # Record fields no formatter here prints: skip collecting them for every line (the logging
    # HOWTO's "Optimization"; finding the caller walks the stack on each call).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LoopBatchedHandler()
    handler.addFilter(RepeatFilter())
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    global _direct
    _direct = handler if fmt == "json" else None
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
