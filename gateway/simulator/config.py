"""The simulator's knobs: one frozen `SimConfig`, and the fault language shared by `--fault`
and the per-request `X-Sim-Fault` header.

Fault spec grammar (comma-separated items, whitespace around items ignored, each kind at most
once)::

    spec      := item ("," item)*
    item      := "hang" | "overload" | "dead" | "once"
               | "status=" INT              (400..599)
               | "slow_first_token=" FLOAT  (seconds, >= 0)
               | "stall_after=" INT         (tokens, >= 0)
               | "cut_after=" INT           (tokens, >= 0)
               | "malformed_after=" INT     (tokens, >= 0)
               | "error_after=" INT         (tokens, >= 0)
               | "abort_after=" INT         (tokens, >= 0)

`once` makes the whole spec strike only the first request carrying its `X-Request-Id` (the
gateway sends one id on every attempt and continuation of a request): the workers of one fleet
share what they have seen (`once.py`), so a retry or a resumed stream on another worker is served
normally, which is what shows failover and resume working through the gateway.

`abort_after` ends the stream as vLLM ends in-flight streams when it shuts down: a chunk with an
empty delta and `finish_reason: "abort"` (then the usage chunk if asked for, and `[DONE]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

_FLAGS = ("hang", "overload", "dead", "once")
_COUNTS = ("stall_after", "cut_after", "malformed_after", "error_after", "abort_after")


class FaultSpecError(ValueError):
    """A fault spec that does not follow the grammar in this module's docstring."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """What to break in a request; the default instance breaks nothing."""

    status: int | None = None
    hang: bool = False
    overload: bool = False
    dead: bool = False
    once: bool = False
    slow_first_token: float = 0.0
    stall_after: int | None = None
    cut_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    abort_after: int | None = None


def parse_fault(spec: str) -> FaultSpec:
    """Parse a fault spec; raise `FaultSpecError` naming the offending item."""
    values: dict[str, object] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise FaultSpecError(f"empty item in fault spec {spec!r}")
        name, value = _parse_item(item)
        if name in values:
            raise FaultSpecError(f"fault {name!r} given twice in {spec!r}")
        values[name] = value
    return FaultSpec(**values)  # type: ignore[arg-type]


def _parse_item(item: str) -> tuple[str, object]:
    name, sep, value = item.partition("=")
    name = name.strip()
    if name in _FLAGS:
        if sep:
            raise FaultSpecError(f"fault {name!r} takes no value")
        return name, True
    if not sep:
        raise FaultSpecError(f"unknown fault {item!r}")
    value = value.strip()
    if name == "status":
        return name, _parse_status(value)
    if name == "slow_first_token":
        return name, _parse_seconds(name, value)
    if name in _COUNTS:
        return name, _parse_count(name, value)
    raise FaultSpecError(f"unknown fault {name!r}")


def _parse_status(value: str) -> int:
    status = _parse_count("status", value)
    if not 400 <= status <= 599:
        raise FaultSpecError(f"status must be 400..599, got {status}")
    return status


def _parse_count(name: str, value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise FaultSpecError(f"{name} needs an integer, got {value!r}") from None
    if count < 0:
        raise FaultSpecError(f"{name} must be >= 0, got {count}")
    return count


def _parse_seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise FaultSpecError(f"{name} needs a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise FaultSpecError(f"{name} must be a finite number >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything a simulated worker needs; the defaults make tests fast (milliseconds).

    Latency model: time to first token = wait for a batch slot + `prefill_seconds` (`ttft_base`
    + `prefill_per_token` * prompt tokens not found in the prefix cache); every later token comes
    `inter_token_seconds` (`itl_base` + `itl_per_seq` * running requests) after the previous one.
    `slowdown` multiplies all of it: 3.0 is a GPU three times slower, for heterogeneous fleets.
    The prefix cache holds `prefix_cache_blocks` blocks of `block_tokens` tokens (0: disabled).
    With `kv_events_endpoint` (a ZeroMQ endpoint to bind, e.g. ``tcp://*:5557``) its changes are
    published as vLLM's KV-cache events, replayed from `kv_events_replay_endpoint` when set.
    `data_parallel_size` engines, each with its own prefix cache and its own publisher (rank r on
    the endpoints' port + r, as vLLM's), serve behind the one address: a request goes to the rank
    its ``X-data-parallel-rank`` header names, else to the next in turn.
    With `tokenizer` (a model's tokenizer.json, its chat template beside it) the prefix cache
    holds the prompt's ids as that model's tokenizer makes them, as a gateway tokenizing with
    the same files computes them (`gateway.tokenizer`); the cached share of those ids sets the
    prefill saved. Requests it cannot tokenize use the simulator's own ids.

    `default_max_tokens` is the length of every answer: where its end-of-sequence token comes.
    A request without `max_tokens` ends there (`finish_reason: "stop"`), unless the context
    (`max_model_len`) runs out first; a request with `max_tokens` always gets that many tokens
    (as with vLLM's `ignore_eos`), clamped to the context. `stream_interval` tokens share one
    chunk of a stream (vLLM's `--stream-interval`): the first token comes alone, and the last
    chunk of a choice may be shorter.
    """

    models: tuple[str, ...] = ("sim-model",)
    max_num_seqs: int = 8
    ttft_base: float = 0.002
    prefill_per_token: float = 0.00005
    itl_base: float = 0.002
    itl_per_seq: float = 0.0002
    kv_cache_tokens: int = 100_000
    max_model_len: int = 8192
    default_max_tokens: int = 16
    embedding_dim: int = 16
    fault: FaultSpec | None = None
    sse_keep_alive: float | None = None
    max_num_queued_reqs: int | None = None
    prefix_cache_blocks: int = 0
    block_tokens: int = 16
    slowdown: float = 1.0
    stream_interval: int = 1
    version: str = "0.32.0+sim"  # the vLLM it imitates (the pin in pyproject.toml), marked
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    tokenizer: str | None = None
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be non-empty and distinct, got {self.models!r}")
        for name in ("max_num_seqs", "kv_cache_tokens", "max_model_len", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 1 <= self.default_max_tokens <= self.max_model_len:
            raise ValueError("default_max_tokens must be in 1..max_model_len")
        if self.max_model_len > self.kv_cache_tokens:
            raise ValueError("max_model_len must fit in kv_cache_tokens, or requests never run")
        self._check_seconds()
        self._check_speed_and_cache()
        if self.sse_keep_alive is not None and self.sse_keep_alive <= 0:
            raise ValueError("sse_keep_alive must be > 0 (or None to disable)")
        if self.max_num_queued_reqs is not None and self.max_num_queued_reqs < 0:
            raise ValueError("max_num_queued_reqs must be >= 0 (or None for no limit)")

    def _check_seconds(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith(("ttft_", "itl_", "prefill_")) and not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{f.name} must be a finite number of seconds >= 0")

    def _check_speed_and_cache(self) -> None:
        if not (math.isfinite(self.slowdown) and self.slowdown > 0):
            raise ValueError(f"slowdown must be a finite number > 0, got {self.slowdown!r}")
        if self.prefix_cache_blocks < 0:
            raise ValueError("prefix_cache_blocks must be >= 0 (0 disables the prefix cache)")
        if self.data_parallel_size < 1:
            raise ValueError("data_parallel_size must be >= 1")
        if self.block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")

    def prefill_seconds(self, uncached_tokens: int) -> float:
        """Batch slot granted -> first token, for a prompt with this many tokens to compute."""
        return (self.ttft_base + self.prefill_per_token * uncached_tokens) * self.slowdown

    def inter_token_seconds(self, running: int) -> float:
        """One token -> the next, while `running` requests share the batch."""
        return (self.itl_base + self.itl_per_seq * running) * self.slowdown
