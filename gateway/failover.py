"""Where a request goes next after a failure before the commit point: the retry and fallback
policy, in one place, and the one verdict on whose fault a failure was.

A request walks a chain of models: its own, then its configured ``fallbacks``, or, after a
context-length error, its ``context_fallbacks`` instead. For each failure the policy answers
one of three things, in this order of preference:

1. **Another worker of the same model**, not yet tried for it, within ``retry.max_attempts``
   attempts on the model; after a jittered backoff, unless the failed worker asked for time
   (``Retry-After``), then at once.
2. **The next model of the chain** that has a worker to try, at once.
3. **The same worker again** when there is nowhere else, within the model's
   ``retry.max_attempts``: after its ``Retry-After`` (up to ``retry.max_wait``) or a jittered
   backoff, if that fits in the request's deadline. (A one-worker pool, or one address that
   stands for many servers behind a Service, has no other worker to go to.)

Else the failure reaches the client. Every step after the first attempt is a retry: counted,
and taken from the retry budget by the caller.

Exclusions are per model: a worker that answered an HTTP error (or timed out) for one model may
still serve a fallback model it also holds. A worker that failed at the transport level
(connect refused or timed out) is out for every model of the request. Ejected, down and
cooling-down workers are never candidates (``Fleet.candidates``).

Pure apart from the fleet's view of which workers are available; no I/O, no sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from gateway.errors import (
    ConnectTimeout,
    StaleConnection,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.retry import backoff, parse_retry_after
from gateway.settings import RetrySettings
from gateway.workers import Fleet, Worker

# vLLM 0.32's words for a prompt longer than the model's context, in the message of its 400:
# "This model's maximum context length is N tokens. However, your prompt contains ..."
# (vllm/renderers/params.py) and "The ... prompt (length N) is longer than the maximum model
# length of M." (vllm/v1/engine/input_processor.py).
CONTEXT_LENGTH_PHRASES = (b"maximum context length is", b"longer than the maximum model length")


def worker_at_fault(err: UpstreamError) -> bool:
    """Whether ``err`` says the worker is sick: it counts towards ejection. Busy (429, 503)
    is not sick, nor is the client's own error (4xx), nor a kept connection that the worker's
    keep-alive timer closed as the request went out."""
    if isinstance(err, StaleConnection):
        return False
    if isinstance(err, UpstreamStatusError):
        return err.status >= 500 and err.status != 503
    return True


def is_context_length_error(err: UpstreamError) -> bool:
    """A worker's 400 saying the prompt does not fit the model's context."""
    if not isinstance(err, UpstreamStatusError) or err.status != 400:
        return False
    body = err.upstream_body.lower()
    return any(phrase in body for phrase in CONTEXT_LENGTH_PHRASES) and _is_json(body)


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def transport_failure(err: UpstreamError) -> bool:
    """Nothing answers at the worker's address: it is out for every model of this request."""
    return isinstance(err, (UpstreamConnectError, ConnectTimeout))


@dataclass(frozen=True, slots=True)
class Step:
    """The next attempt: ``model`` on one of ``candidates`` (or exactly ``worker``), after
    ``wait`` seconds."""

    model: str
    candidates: Sequence[Worker]
    wait: float = 0.0
    worker: Worker | None = None  # a same-worker retry
    reason: str = ""  # why this is not the first attempt: the failure's code


@dataclass(slots=True)
class Failover:
    """One request's walk over its chain of models; see the module docstring."""

    fleet: Fleet
    retry: RetrySettings
    chain: tuple[str, ...]
    context_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    index: int = 0  # the model of ``chain`` being tried
    tried: dict[str, list[Worker]] = field(default_factory=dict)  # per model
    dead: list[Worker] = field(default_factory=list)  # transport failures: out for every model
    attempts: dict[str, int] = field(default_factory=dict)  # per model

    @property
    def model(self) -> str:
        return self.chain[self.index]

    def first(self) -> Step | None:
        """The first attempt: the first model of the chain with a worker available (a dead,
        ejected or cooling-down primary pool goes straight to the fallback); None when none."""
        for index in range(len(self.chain)):
            candidates = self._candidates(self.chain[index])
            if candidates:
                self.index = index
                return Step(self.chain[index], candidates)
        return None

    def others(self, model: str) -> list[Worker]:
        """Workers of ``model`` not tried for it and not dead: where a stream may resume."""
        return self._candidates(model)

    def started(self, model: str, worker: Worker) -> None:
        self.tried.setdefault(model, []).append(worker)
        self.attempts[model] = self.attempts.get(model, 0) + 1

    def after(
        self, err: UpstreamError, worker: Worker, now_epoch: float, left: float
    ) -> Step | None:
        """Where to go after ``worker`` failed with ``err``; None when the failure is final.
        ``left`` is the seconds left in the request's deadline."""
        if is_context_length_error(err):
            return self._context_fallback(err)
        if not self._retryable(err):
            return None
        if transport_failure(err):
            self.dead.append(worker)
        asked = _asked_wait(err, now_epoch)
        model = self.model
        if self.attempts.get(model, 0) < self.retry.max_attempts:
            candidates = self._candidates(model)
            if candidates:
                wait = 0.0 if asked is not None else self._backoff(model)
                return Step(model, candidates, wait, reason=err.code)
        for index in range(self.index + 1, len(self.chain)):
            candidates = self._candidates(self.chain[index])
            if candidates:
                self.index = index
                return Step(self.chain[index], candidates, reason=err.code)
        return self._same_worker(err, worker, asked, left)

    def _same_worker(
        self, err: UpstreamError, worker: Worker, asked: float | None, left: float
    ) -> Step | None:
        if transport_failure(err) or not worker.healthy or worker.ejected_until is not None:
            return None
        model = self.model
        if self.attempts.get(model, 0) >= self.retry.max_attempts:
            return None
        if asked is not None:
            if asked > self.retry.max_wait:
                return None
            wait = asked
        else:
            wait = self._backoff(model)
        if wait >= left:
            return None
        return Step(model, (worker,), wait, worker=worker, reason=err.code)

    def _context_fallback(self, err: UpstreamError) -> Step | None:
        """After a context-length error, the longer-context models configured for the model
        that raised it, and only those."""
        chain = tuple(self.context_fallbacks.get(self.model, ()))
        if not chain:
            return None
        self.chain, self.index = chain, 0
        for index, model in enumerate(chain):
            candidates = self._candidates(model)
            if candidates:
                self.index = index
                return Step(model, candidates, reason="context_length_exceeded")
        return None

    def _retryable(self, err: UpstreamError) -> bool:
        if isinstance(err, UpstreamStatusError):
            return err.status in self.retry.statuses
        return err.retryable

    def _candidates(self, model: str) -> list[Worker]:
        return self.fleet.candidates(model, [*self.tried.get(model, ()), *self.dead])

    def _backoff(self, model: str) -> float:
        attempt = self.attempts.get(model, 1)
        return backoff(attempt, self.retry.backoff_base, self.retry.backoff_max, self.rng)


def _asked_wait(err: UpstreamError, now_epoch: float) -> float | None:
    """The seconds the worker asked for (``Retry-After`` on a 429 or 503), if any."""
    if not isinstance(err, UpstreamStatusError) or err.status not in (429, 503):
        return None
    return parse_retry_after(err.upstream_headers.get("Retry-After"), now_epoch)
