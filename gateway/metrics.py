"""Every metric the gateway exports: names, labels and buckets, on an injected registry.

Names start with ``gateway_`` (never vLLM's ``vllm:``). Labels stay low-cardinality: model names
come from configuration or discovery, worker labels are worker base URLs, codes are the stable
error codes of ``errors.py``.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

# From a millisecond to ten minutes: LLM latencies span first tokens in ms and whole answers in
# minutes.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Gaps between tokens and event-loop stalls: sub-millisecond to a few seconds.
SHORT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


# How long a hot-path update may wait before it is added to its series. Once per loop iteration
# (as it was) cost a locked push of the inter-token histogram for nearly every read of a paced
# stream; a tenth of a second is invisible to a scrape and far shorter than any scrape interval.
FLUSH_INTERVAL = 0.1

# prometheus_client's words when a series is removed in multi-process mode, where removal only
# drops this process's handle: the value stays in the shared files until the gateway restarts
# (documented), so the warning, at every worker that leaves or goes down, says nothing new.
_MULTIPROCESS_REMOVAL = "Removal of labels has not been implemented"


class _QuietRemoval(MetricWrapperBase):
    """``remove`` without prometheus_client's multi-process warning (see above)."""

    def remove(self, *labelvalues: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _MULTIPROCESS_REMOVAL, UserWarning)
            super().remove(*labelvalues)


class WorkerCounter(_QuietRemoval, Counter):
    """A per-worker counter: its series go when the worker leaves the fleet."""


class WorkerGauge(_QuietRemoval, Gauge):
    """A per-worker gauge: its series go when the worker leaves the fleet or stops reporting."""


class WorkerHistogram(_QuietRemoval, Histogram):
    """A per-worker histogram: its series go when the worker leaves the fleet."""


class Batch:
    """The hot path's metric updates, added to prometheus_client's series at most every
    ``interval`` seconds instead of one by one. Each ``inc`` or ``observe`` of a series takes
    prometheus_client's lock (with several serving processes, writes its shared file); a request
    makes about ten, and a stream one more per read of the worker. A pending update is a few
    additions, and everything pending shares one write per series.

    This process's collections (``flush``, on the loop's thread: ``/metrics``, a test reading
    the registry) see every update. Another serving process's updates reach the shared files
    about ``interval`` after they were made (later when its loop lags), and a process that is
    killed loses those. At a graceful stop the app's cleanup calls ``close``: what is pending
    is added, and every later update at once."""

    __slots__ = ("_closed", "_dirty", "_interval", "_thread", "_timer")

    def __init__(self, interval: float = FLUSH_INTERVAL) -> None:
        self._dirty: list[Pending] = []
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._thread: int | None = None  # the event loop's, from the first update

    def mark(self, item: Pending) -> None:
        self._dirty.append(item)
        if self._timer is not None:
            return
        if self._closed:
            self.flush()  # stopping: nothing may wait for a timer that will not fire
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop to come back to: at once
            return
        self._thread = threading.get_ident()
        self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()  # a flush from outside: the next update starts a new interval
        dirty, self._dirty = self._dirty, []
        for item in dirty:
            item.push()

    def close(self) -> None:
        """Add what is pending; from now on every update is added at once."""
        self._closed = True
        self.flush()

    def collect(self) -> list[Metric]:
        """As a collector registered before the series: a collection on the loop's thread (a
        test reading the registry) sees every update. ``/metrics`` renders in a thread, so its
        handler flushes first."""
        if self._thread is None or self._thread == threading.get_ident():
            self.flush()
        return []

    def describe(self) -> list[Metric]:
        return []


class Pending:
    """One series' updates not yet added to it."""

    __slots__ = ("_batch", "_marked")

    def __init__(self, batch: Batch) -> None:
        self._batch = batch
        self._marked = False

    def _mark(self) -> None:
        self._marked = True
        self._batch.mark(self)

    def push(self) -> None:
        self._marked = False


class _PendingSum(Pending):
    """A sum of amounts, added to a counter or gauge series in one ``inc``."""

    __slots__ = ("_child", "_sum")

    def __init__(self, batch: Batch, child: Counter | Gauge) -> None:
        super().__init__(batch)
        self._child = child
        self._sum = 0.0

    def _add(self, amount: float) -> None:
        self._sum += amount
        if not self._marked:
            self._mark()

    def push(self) -> None:
        self._marked = False
        total, self._sum = self._sum, 0.0
        if total:
            self._child.inc(total)


class PendingCounter(_PendingSum):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._add(amount)


class PendingGauge(_PendingSum):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        self._add(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._add(-amount)


class PendingHistogram(Pending):
    """Observations counted per bucket here, then added to the series' own per-bucket values
    (prometheus_client's ``_buckets`` and ``_sum``, which hold each bucket's own count;
    tests/test_metrics.py fails if a release renames them)."""

    __slots__ = ("_bounds", "_child", "_counts", "_n", "_sum")

    def __init__(self, batch: Batch, child: Histogram) -> None:
        super().__init__(batch)
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._n = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1  # le: value <= bound
        self._sum += value
        self._n += 1
        if not self._marked:
            self._mark()

    def push(self) -> None:
        self._marked = False
        if not self._n:
            return
        buckets = self._child._buckets
        for i, count in enumerate(self._counts):
            if count:
                buckets[i].inc(count)
                self._counts[i] = 0
        self._child._sum.inc(self._sum)
        self._sum = 0.0
        self._n = 0


P = TypeVar("P", bound=Pending)


class Children(Generic[P]):
    """``metric.labels(...)`` memoised as pending series (``Pending``), for the series every
    request touches: prometheus_client validates the values and takes a lock on each
    ``labels`` call. Only for series whose label values are few (models, routes, codes, key
    names, workers), so the memo stays as small as the metric itself."""

    __slots__ = ("_batch", "_children", "_make", "_metric")

    def __init__(
        self, metric: MetricWrapperBase, batch: Batch, make: Callable[[Batch, Any], P]
    ) -> None:
        self._metric = metric
        self._batch = batch
        self._make = make
        self._children: dict[tuple[str, ...], P] = {}

    def __call__(self, *values: str) -> P:
        child = self._children.get(values)
        if child is None:
            child = self._make(self._batch, self._metric.labels(*values))
            self._children[values] = child
        return child

    def remove(self, *values: str) -> None:
        """The series goes, from the metric and the memo (a worker that left the fleet)."""
        self._batch.flush()
        self._children.pop(values, None)
        self._metric.remove(*values)


class GatewayMetrics:
    """``multiprocess_dir``: set in each of several serving processes (``supervisor``), where
    values live in prometheus_client's shared files and ``/metrics`` reads all of them.
    ``multiprocess_mode`` says how a gauge's values from several processes combine; it is
    ignored in a single process."""

    def __init__(self, registry: CollectorRegistry, multiprocess_dir: str | None = None) -> None:
        self.registry = registry
        self.batch = batch = Batch()
        registry.register(batch)  # first: it flushes before the series are collected
        self._exposition = registry
        if multiprocess_dir is not None:
            from prometheus_client import multiprocess

            self._exposition = CollectorRegistry()
            self._exposition.register(batch)
            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                self._exposition, path=multiprocess_dir
            )
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by model, route, HTTP status and error code ('' on success).",
            ["model", "route", "status", "code"],
            registry=registry,
        )
        self.client_requests = Counter(
            "gateway_client_requests",
            "Requests on the OpenAI routes by client (the API key's name, 'anonymous' when the "
            "gateway is open) and HTTP status.",
            ["key", "status"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests admitted and not yet finished.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.worker_in_flight = WorkerGauge(
            "gateway_worker_requests_in_flight",
            "Requests in flight to each worker, as counted by the gateway.",
            ["worker"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        # Clock: starts when the gateway has the request body; stops when the first upstream SSE
        # data event carrying content (or a finish, usage, error or [DONE]) is seen. Streams only.
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request received to the first content event of a stream.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Clock: starts when one upstream chunk of a committed stream has been read; stops when the
        # next one has. vLLM sends one chunk per engine step, so this is the inter-token latency
        # the client sees (plus network). Streams only; held-back chunks before the first token
        # are not counted.
        self.inter_token_latency = Histogram(
            "gateway_inter_token_latency_seconds",
            "Gap between consecutive chunks of a stream after its first token.",
            ["model"],
            buckets=SHORT_BUCKETS,
            registry=registry,
        )
        # Clock: starts when the gateway has the request body; stops when the last byte has been
        # written to the client (or the request failed).
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response finished.",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Clock: starts when the client pool opens a new TCP connection to a worker; stops when
        # the connection is established. Reused pooled connections are not observed (they cost
        # no connect); a failed connect is counted in upstream errors instead.
        self.upstream_connect = WorkerHistogram(
            "gateway_upstream_connect_seconds",
            "Time to open a new connection to a worker.",
            ["worker"],
            buckets=SHORT_BUCKETS,
            registry=registry,
        )
        # Clock: starts when the request asks for admission; stops when it is admitted or shed.
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time spent waiting for admission.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            "gateway_rejections",
            "Requests shed before reaching a worker, by reason (error code).",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "gateway_retries",
            "Attempts repeated on another worker before commit, by the failure that caused them.",
            ["reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Failed upstream attempts, by worker and kind (error code).",
            ["worker", "kind"],
            registry=registry,
        )
        self.worker_ejections = WorkerCounter(
            "gateway_worker_ejections",
            "Workers taken out after consecutive failed requests (passive health).",
            ["worker"],
            registry=registry,
        )
        self.worker_healthy = WorkerGauge(
            "gateway_worker_healthy",
            "1 if the worker is taking requests, else 0.",
            ["worker"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.retry_budget_exhausted = Counter(
            "gateway_retry_budget_exhausted",
            "Retries not made because the retry budget was spent (an outage is not multiplied).",
            registry=registry,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Requests sent to a fallback model, by requested model and the fallback used.",
            ["model", "fallback"],
            registry=registry,
        )
        self.worker_load = WorkerGauge(
            "gateway_worker_load",
            "Load signals scraped from each worker's /metrics: 'waiting' and 'running' requests "
            "and 'kv_cache' usage (0..1); absent while a worker cannot be scraped.",
            ["worker", "signal"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        # Cache-aware routing (routing.kv_events): what the gateway believes each worker holds.
        self.kv_predicted_hit_tokens = WorkerCounter(
            "gateway_kv_predicted_hit_tokens",
            "Prompt tokens the cache-aware policy expected the chosen worker to find in its KV "
            "cache; compare with the worker's own vllm:prefix_cache_hits_total.",
            ["worker"],
            registry=registry,
        )
        self.kv_events_live = WorkerGauge(
            "gateway_kv_events_live",
            "1 while the worker's KV-cache events are received in order, else 0.",
            ["worker"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.kv_index_blocks = WorkerGauge(
            "gateway_kv_index_blocks",
            "Blocks of the worker's KV cache that the gateway's index holds.",
            ["worker"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.kv_events_resets = WorkerCounter(
            "gateway_kv_events_resets",
            "Times the gateway dropped its view of the worker's KV cache: a (re)connect, a "
            "disconnect, a gap the replay could not fill.",
            ["worker"],
            registry=registry,
        )
        self.discovery_errors = Counter(
            "gateway_discovery_errors",
            "DNS resolutions of a discovery service that failed (the last known workers are kept).",
            ["service"],
            registry=registry,
        )
        self.workers = Gauge(
            "gateway_workers",
            "Workers known to the gateway (configured and discovered).",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.resumes = Counter(
            "gateway_stream_resumes",
            "Streams whose worker failed mid-answer, by what became of them: 'resumed' (finished "
            "on another worker), 'failed' (the continuation failed too), 'not_resumable' (tools, "
            "reasoning, ...), 'no_worker', 'budget' (retry budget spent).",
            ["model", "outcome"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused with 429, by client (API key name) and the limit hit: 'requests', "
            "'tokens' or 'concurrency'.",
            ["key", "kind"],
            registry=registry,
        )
        self.ratelimit_redis_up = Gauge(
            "gateway_ratelimit_redis_up",
            "1 while rate limits are shared through Redis; 0 while Redis is unreachable (or not "
            "configured) and this replica limits on its own.",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.ratelimit_redis_errors = Counter(
            "gateway_ratelimit_redis_errors",
            "Redis calls of the rate limiter that failed or timed out, including the PINGs (one a "
            "second) that look for it during an outage.",
            registry=registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens reported by the workers' usage (streams that carry usage), by model and kind "
            "('prompt' or 'completion').",
            ["model", "kind"],
            registry=registry,
        )
        # Clock: starts when the loop-lag timer asks to sleep for its interval; stops when it runs
        # again. The observation is the excess over the interval: how long the event loop was
        # busy (a blocking call, a CPU-heavy callback) when the timer was due.
        self.event_loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late a periodic timer ran on the event loop.",
            buckets=SHORT_BUCKETS,
            registry=registry,
        )
        # The hot path's series: memoised and batched (see ``Children`` and ``Batch``).
        self.requests_of = Children(self.requests, batch, PendingCounter)
        self.client_requests_of = Children(self.client_requests, batch, PendingCounter)
        self.request_duration_of = Children(self.request_duration, batch, PendingHistogram)
        self.time_to_first_token_of = Children(self.time_to_first_token, batch, PendingHistogram)
        self.inter_token_latency_of = Children(self.inter_token_latency, batch, PendingHistogram)
        self.tokens_of = Children(self.tokens, batch, PendingCounter)
        self.worker_in_flight_of = Children(self.worker_in_flight, batch, PendingGauge)
        self.kv_predicted_hit_tokens_of = Children(
            self.kv_predicted_hit_tokens, batch, PendingCounter
        )
        self.in_flight_batched = PendingGauge(batch, self.in_flight)
        self.queue_wait_batched = PendingHistogram(batch, self.queue_wait)

    def flush(self) -> None:
        """Every pending update into its series (on the event loop's thread)."""
        self.batch.flush()

    def close(self) -> None:
        """The app is stopping: what is pending, and every later update, goes into its series
        at once (``Batch.close``)."""
        self.batch.close()

    def exposition(self) -> bytes:
        """The text ``/metrics`` serves: this process's metrics, or every serving process's.
        Call ``flush`` on the loop first when this runs in another thread."""
        return generate_latest(self._exposition)
