"""A committed stream's steady state, relayed at the protocol level: each piece of the worker's
body is handled inside the worker connection's own callback (``h1.Response.divert``): whole
SSE events are framed, observed, added to the transcript and written straight to the client's
transport as an HTTP/1.1 chunk. The relay's task sleeps meanwhile and wakes only when the
stream ends or fails, or when the client stops taking bytes and the worker must be paused. The
bytes that carry ``[DONE]`` are left to the task (``last``), which sends them with the chunked
terminator in one write.

Why: relaying through the task cost a future, a task step, a read call, aiohttp's
``StreamResponse.write`` and its drain check per event. On paced streams (a token every few
ms, one event per read, as vLLM sends them) that per-event work, not the kernel's, set the
gateway's CPU per event at about twice vllm-router's.

The invariants stay where the task-based relay kept them:
- whole events only (``EventFramer``), and nothing after a failure: a fault found in a callback
  is recorded, the worker's socket paused, and the task raises it;
- every wait bounded: the idle deadline moves on every read from the worker, and the task
  waits for the client's drain under it with ``Exchange.writing`` set, so a stall is the
  client's (``ClientTooSlow``);
- backpressure: past ``HIGH_WATER`` bytes in the client transport's buffer the worker's socket
  is paused until the client drains;
- a client that leaves cancels the task as before, whose ``finally`` closes the worker's
  connection; a write to a closing transport is not attempted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.deadline import Deadline
from gateway.errors import UpstreamBadResponse
from gateway.framing import EventFramer
from gateway.h1 import Response
from gateway.metrics import PendingHistogram
from gateway.resume import Transcript, scrub_token_ids
from gateway.sse import StreamObserver

# Bytes buffered in the client's transport past which the worker is paused (aiohttp's own
# ``StreamResponse.write`` drains past the same 64 KiB).
HIGH_WATER = 64 * 1024

# Checks the observer after a read; raises to fail the stream, returns True when a worker's
# own error event goes to the client in-band (``Relay._check_events``).
Check = Callable[[StreamObserver], bool]


class Pump:
    """One committed stream from ``start`` to its end; ``run`` is the task's side."""

    __slots__ = (
        "_check",
        "_chunked",
        "_framer",
        "_idle",
        "_itl",
        "_last",
        "_loop",
        "_max_event",
        "_observer",
        "_phase",
        "_response",
        "_scrub",
        "_transcript",
        "_transport",
        "blocked",
        "failure",
        "last",
        "sick",
    )

    def __init__(
        self,
        response: Response,
        transport: asyncio.Transport,
        *,
        chunked: bool,
        observer: StreamObserver,
        framer: EventFramer,
        transcript: Transcript | None,
        scrub: bool,
        check: Check,
        itl: PendingHistogram,
        phase: Deadline,
        idle: float,
        max_event: int,
    ) -> None:
        self._response = response
        self._transport = transport
        self._chunked = chunked
        self._observer = observer
        self._framer = framer
        self._transcript = transcript
        self._scrub = scrub
        self._check = check
        self._itl = itl
        self._phase = phase
        self._idle = idle
        self._max_event = max_event
        self._loop = phase.loop
        self._last = self._loop.time()
        self.blocked = False  # the client's buffer is past HIGH_WATER: the worker is paused
        self.failure: BaseException | None = None
        self.sick = False
        # The bytes that carried ``[DONE]``, not written here: the task sends them with the
        # chunked body's terminator, in one write (``StreamResponse.write_eof``).
        self.last = b""

    def start(self) -> None:
        """Divert the worker's body here; what was already buffered is handled first."""
        held = self._response.divert(self.feed)
        if held:
            self.feed(held)

    def feed(self, data: bytes) -> None:
        """One piece of the worker's body, inside its connection's callback: never raises."""
        if self.failure is not None or self._observer.done:
            return  # nothing after a failure; after [DONE] only the body's end is awaited
        try:
            self._feed(data)
        except Exception as exc:
            self._fail(exc)

    def _feed(self, data: bytes) -> None:
        now = self._loop.time()
        self._itl.observe(now - self._last)
        self._last = now
        self._phase.extend(now + self._idle)
        observer = self._observer
        framer = self._framer
        plain = observer.feed(data) and framer.idle
        if plain:
            # One plain token event: nothing new to check, nothing for the framer to hold or
            # strip (it would scan for the same markers the observer just ruled out).
            out = data
        else:
            if self._check(observer):
                self.sick = True
            out = framer.feed(data)
        if out:
            if self._transcript is not None:
                if plain and observer.ids_at[1] and observer.simple:
                    self._transcript.token(out, observer.ids_at)
                else:
                    self._transcript.feed(out)
            if self._scrub:
                # Where the observer found the event's one token id list, it is nulled there.
                ids_at = observer.ids_at
                start, end = ids_at[0], ids_at[1]
                out = out[:start] + b"null" + out[end:] if plain and end else scrub_token_ids(out)
            if observer.done:
                self.last = out
                self._response.wake()
                return
            transport = self._transport
            if transport.is_closing():
                raise ConnectionResetError("Cannot write to closing transport")
            if self._chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(out), out))
            else:
                transport.write(out)
            if transport.get_write_buffer_size() > HIGH_WATER and not self.blocked:
                self.blocked = True
                self._response.pause()
                self._response.wake()
        elif self._framer.pending > self._max_event:
            raise UpstreamBadResponse("The model worker sent an oversized stream event.")
        if observer.done:
            self._response.wake()

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._response.pause()
        self._response.wake()

    async def settle(self) -> bool:
        """Sleep until the stream is over (True: ``[DONE]`` or the body's end) or the client
        pushes back (False: the caller drains the client, then calls ``unblock``). Raises
        what failed the stream, a transport error of the worker's connection included (as
        ``h1.Closed`` and kin, for the caller to map)."""
        response = self._response
        observer = self._observer
        while True:
            if self.failure is not None:
                raise self.failure
            if observer.done:
                return True
            if self.blocked:
                return False
            if response.ended():
                return True
            await response.wait()

    def unblock(self) -> None:
        """The client drained: re-arm the idle bound and read the worker again."""
        self.blocked = False
        self._phase.extend(self._loop.time() + self._idle)
        self._response.resume()
