"""Publishing KV-cache events as vLLM does: a ZeroMQ PUB socket for the live batches and a ROUTER
socket that replays buffered batches from a requested sequence number (see `gateway.kvwire`).

vLLM publishes from a thread; here the PUB socket is a plain one sent to without blocking (a PUB
socket drops what a slow subscriber cannot take, at its high-water mark), and the replay socket
is served by a task on the loop. `skip_live` leaves batches out of the live stream (still
buffered for replay), so tests can make a gap on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from gateway.kvwire import END_SEQ, Event, encode_batch, encode_seq

BUFFER_STEPS = 10_000


class EventPublisher:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = BUFFER_STEPS,
        rank: int = 0,
    ) -> None:
        self._rank = rank  # the data-parallel rank each batch names
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context.shadow(self._ctx)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            self._router = self._actx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(replay_endpoint)
            self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._task: asyncio.Task[None] | None = None
        self.skip_live = 0  # the next this-many batches go to the replay buffer only

    def start(self) -> None:
        """Serves replay requests from now on (needs a running loop)."""
        if self._router is not None and self._task is None:
            self._task = asyncio.create_task(self._serve_replay(self._router))

    def publish(self, events: Sequence[Event]) -> int:
        """Sends one batch; returns its sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_batch(time.time(), events, self._rank)
        self._buffer.append((seq, payload))
        if self.skip_live > 0:
            self.skip_live -= 1
            return seq
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self._topic, encode_seq(seq), payload], zmq.NOBLOCK)
        return seq

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await router.send_multipart(
                        [client, b"", self._topic, encode_seq(seq), payload]
                    )
            await router.send_multipart([client, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._router is not None:
            self._router.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.destroy(linger=0)
