"""The message channel between the supervisor and one serving process: a Unix socket pair,
one JSON array per line, standard library only (the supervisor imports it).

A message is ``[op, *args]``. Three shapes travel on it:

- a call, ``["call", id, op, *args]``, answered by ``["re", id, *result]``;
- a note, ``[op, *args]``, never answered (a release, a correction, "ready");
- the heartbeat: the parent writes ``["ping"]`` and the child's event loop answers
  ``["pong"]``. Any line from the child counts as a sign of life.

``Channel`` is either end: it reads lines on its own task and hands each message to a
handler, which answers calls by returning a list. Lines written in one turn of the event loop
go out in one ``write`` at its end (one system call instead of one a message), with no
``drain``: messages are tens of bytes and the other end reads continuously, so the socket
buffer is the only queue, and a writer on the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from typing import Any

Message = list[Any]
# Answers a call (returns its result) or takes a note (returns None).
Handler = Callable[[Message], Message | None]

LINE_LIMIT = 1024 * 1024  # a call carries a few limit names: far below this
LATE_LIMIT = 10_000  # late answers awaited at most; beyond, they are dropped


class ChannelClosed(Exception):
    """The other end is gone (it exited or closed its end), or a call outlived its bound."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._calls: dict[int, asyncio.Future[Message]] = {}
        # Calls that outlived their bound, whose answer may still come: what to do with it.
        self._late: dict[int, Callable[[Message], None]] = {}
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None
        self._out: list[bytes] = []  # lines of this loop turn, written at its end
        self.closed = asyncio.Event()
        self.last_heard = asyncio.get_running_loop().time()

    @classmethod
    async def over(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    def start(self, handler: Handler) -> None:
        """Read and dispatch messages until the other end closes."""
        self._task = asyncio.create_task(self._read_forever(handler))

    def note(self, op: str, *args: Any) -> None:
        self._write([op, *args])

    async def call(
        self,
        timeout: float,  # noqa: ASYNC109 - a bound for one call
        op: str,
        *args: Any,
        late: Callable[[Message], None] | None = None,
    ) -> Message:
        """The other end's answer; ``ChannelClosed`` if it is gone or slower than ``timeout``.
        ``late`` is given the answer whenever the caller does not get it (the call timed out
        or was cancelled) and it comes all the same: the other end may have acted on the call,
        and what it did can then be undone."""
        if self.closed.is_set():
            raise ChannelClosed("the channel is closed")
        self._next_id += 1
        call_id = self._next_id
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = answer
        # Registered before anything can go wrong: an answer read in the very loop turn the
        # bound runs out (or the caller is cancelled) finds it.
        if late is not None and len(self._late) < LATE_LIMIT:
            self._late[call_id] = late
        self._write(["call", call_id, op, *args])
        received = False
        try:
            async with asyncio.timeout(timeout):
                result = await answer
            received = True
            return result
        except TimeoutError:
            raise ChannelClosed(f"no answer to {op} within {timeout}s") from None
        finally:
            self._calls.pop(call_id, None)
            if received:
                self._late.pop(call_id, None)
            elif answer.done() and not answer.cancelled() and answer.exception() is None:
                # Answered, but the caller was cancelled before it could take the answer.
                handler = self._late.pop(call_id, None)
                if handler is not None:
                    handler(answer.result())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._flush()  # a last note (e.g. "failed") goes out before the close
        self._closed()
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _read_forever(self, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        try:
            while line := await self._reader.readline():
                self.last_heard = loop.time()
                self._dispatch(json.loads(line), handler)
        except (OSError, ValueError):
            pass  # a reset or a broken line: the other end is as good as gone
        finally:
            self._closed()

    def _dispatch(self, message: Message, handler: Handler) -> None:
        op = message[0]
        if op == "re":
            answer = self._calls.get(message[1])
            if answer is not None and not answer.done():
                answer.set_result(message[2:])
            elif (late := self._late.pop(message[1], None)) is not None:
                late(message[2:])  # the caller gave up on it (its future is cancelled or gone)
        elif op == "call":
            result = handler(message[2:])
            self._write(["re", message[1], *(result or [])])
        elif op == "ping":
            self._write(["pong"])
        elif op != "pong":
            handler(message)

    def _write(self, message: Message) -> None:
        self._out.append(_encode(message))
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        lines, self._out = self._out, []
        # A gone end is found by the reader; writing on to it would only log asyncio warnings.
        if not self.closed.is_set() and not self._writer.is_closing():
            self._writer.write(b"".join(lines))

    def _closed(self) -> None:
        self.closed.set()
        self._late.clear()
        for answer in self._calls.values():
            if not answer.done():
                answer.set_exception(ChannelClosed("the other end closed the channel"))


def _encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"
