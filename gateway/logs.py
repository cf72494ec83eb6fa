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
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

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
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "pid": self._pid,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class LoopBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that writes the lines of one event-loop turn with one write: under load
    many requests finish in one turn, and a write (and flush) per access-log line was a fifth
    of the logging cost. Nothing waits past the current turn (``call_soon``); outside a running
    loop every line is written at once. ``flush`` (also run by ``logging.shutdown``) writes what
    is pending."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a flush is already scheduled
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._pending = self._pending, []
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            super().flush()
        finally:
            self.release()


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
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
