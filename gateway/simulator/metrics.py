"""vLLM-named Prometheus metrics of one simulated worker, on an injected `CollectorRegistry`.

Names and labels (`model_name`, `engine="0"`) follow vLLM so the gateway's scraper reads the
simulator exactly as it reads a real worker. Histogram clocks (monotonic):
- `vllm:request_queue_time_seconds`: request accepted by the engine -> batch slot granted.
- `vllm:time_to_first_token_seconds`: request accepted by the engine -> first token written.
- `vllm:inter_token_latency_seconds`: one token written -> the next one written.
- `vllm:e2e_request_latency_seconds`: request accepted by the engine -> last token written.
The load gauges are read from the engine at scrape time, so they can never go stale.
A request with `n` choices counts as `n` requests, its prompt `n` times, as vLLM's do (vLLM runs
each choice as its own engine request).
`vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total` count prompt tokens (queried,
found cached) and move only while the prefix cache is enabled; hits / queries is the hit rate.
"""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine import Engine

ENGINE_LABEL = "0"
_LABELS = ("model_name", "engine")
_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip


class SimMetrics:
    """The metric families; every `observe_*` method takes the model name as its first label."""

    def __init__(self, registry: CollectorRegistry, engine: Engine, models: tuple[str, ...]):
        self._gauges(registry, engine, models)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", _LABELS, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", _LABELS, registry=registry
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Successfully finished requests.",
            (*_LABELS, "finished_reason"),
            registry=registry,
        )
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in prompt tokens queried.",
            _LABELS,
            registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in prompt tokens found cached.",
            _LABELS,
            registry=registry,
        )
        self.admission_rejections = Counter(
            "vllm:admission_rejections",
            "Requests rejected by admission control.",
            (*_LABELS, "reason"),
            registry=registry,
        )
        self.queue_time = self._histogram(registry, "vllm:request_queue_time_seconds", "Queue")
        self.ttft = self._histogram(registry, "vllm:time_to_first_token_seconds", "TTFT")
        self.itl = self._histogram(registry, "vllm:inter_token_latency_seconds", "ITL")
        self.e2e = self._histogram(registry, "vllm:e2e_request_latency_seconds", "E2E latency")

    @staticmethod
    def _gauges(registry: CollectorRegistry, engine: Engine, models: tuple[str, ...]) -> None:
        running = Gauge(
            "vllm:num_requests_running", "Requests in the batch.", _LABELS, registry=registry
        )
        waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting.", _LABELS, registry=registry
        )
        kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0..1.", _LABELS, registry=registry)
        for model in models:
            running.labels(model, ENGINE_LABEL).set_function(partial(engine.running_for, model))
            waiting.labels(model, ENGINE_LABEL).set_function(partial(engine.waiting_for, model))
            kv.labels(model, ENGINE_LABEL).set_function(engine.kv_cache_usage)

    @staticmethod
    def _histogram(registry: CollectorRegistry, name: str, what: str) -> Histogram:
        return Histogram(
            name, f"{what} in seconds.", _LABELS, buckets=_LATENCY_BUCKETS, registry=registry
        )

    def observe_prompt(self, model: str, tokens: int) -> None:
        self.prompt_tokens.labels(model, ENGINE_LABEL).inc(tokens)

    def observe_prefix_cache(
        self, model: str, queried_tokens: int, hit_tokens: int, rank: int = 0
    ) -> None:
        """Per data-parallel engine, as vLLM labels them (``engine``: the rank)."""
        self.prefix_cache_queries.labels(model, str(rank)).inc(queried_tokens)
        self.prefix_cache_hits.labels(model, str(rank)).inc(hit_tokens)

    def observe_queue(self, model: str, seconds: float) -> None:
        self.queue_time.labels(model, ENGINE_LABEL).observe(seconds)

    def observe_tokens(
        self, model: str, choices: int, seconds_since_previous: float, first: bool
    ) -> None:
        """One engine step: a token for each of `choices` (vLLM's `n`) running requests."""
        self.generation_tokens.labels(model, ENGINE_LABEL).inc(choices)
        histogram = (self.ttft if first else self.itl).labels(model, ENGINE_LABEL)
        for _ in range(choices):
            histogram.observe(seconds_since_previous)

    def observe_finish(self, model: str, reason: str, e2e_seconds: float, choices: int) -> None:
        self.request_success.labels(model, ENGINE_LABEL, reason).inc(choices)
        e2e = self.e2e.labels(model, ENGINE_LABEL)
        for _ in range(choices):
            e2e.observe(e2e_seconds)

    def observe_rejection(self, model: str, reason: str) -> None:
        self.admission_rejections.labels(model, ENGINE_LABEL, reason).inc()
