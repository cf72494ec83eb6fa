"""Retry policy pieces: full-jitter backoff, Retry-After parsing, the retry budget; and the
affinity keys the balancer hashes."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from gateway.affinity import prefix_key, session_key
from gateway.retry import RetryBudget, backoff, parse_retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (30, 0.5)]:
        waits = [backoff(attempt, 0.1, 0.5, rng) for _ in range(2000)]
        assert 0.0 <= min(waits) < ceiling * 0.05  # full jitter reaches down to zero ...
        assert ceiling * 0.95 < max(waits) <= ceiling  # ... and up to the ceiling


@pytest.mark.parametrize(("attempt", "base", "cap"), [(0, 0.1, 1.0), (1, 0.0, 1.0), (1, 0.1, 0)])
def test_backoff_is_zero_when_switched_off(attempt: int, base: float, cap: float) -> None:
    assert backoff(attempt, base, cap, random.Random(1)) == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 2 ", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (None, None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, 1_000_000.0) == expected


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00", now) is None  # no zone: unreadable


def test_budget_allows_the_floor_then_the_ratio_of_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, floor=3, window=10, clock=clock)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # 3 + 0.2 * 10 = 5


def test_budget_window_slides() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, floor=2, window=10, clock=clock)
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()
    clock.now += 9
    assert not budget.try_spend()  # both retries are still inside the window
    clock.now += 1
    assert budget.try_spend()


def test_budget_forgets_a_long_quiet_gap() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, floor=1, window=5, clock=clock)
    assert budget.try_spend()
    clock.now += 1000
    assert budget.try_spend()


def test_session_key_is_the_user_field() -> None:
    assert session_key({"user": "alice"}) == "alice"
    assert session_key({"user": ""}) is None
    assert session_key({"user": 7}) is None
    assert session_key({}) is None


def test_prefix_key_reads_chat_messages_in_order_up_to_the_limit() -> None:
    system = {"role": "system", "content": "You are helpful. " * 20}
    a = {"messages": [system, {"role": "user", "content": "question one"}]}
    b = {"messages": [system, {"role": "user", "content": "another question"}]}
    assert prefix_key(a, 64) == prefix_key(b, 64)
    assert prefix_key(a, 10_000) != prefix_key(b, 10_000)
    key = prefix_key(a, 64)
    assert key is not None and len(key) == 64


def test_prefix_key_separates_messages_and_reads_content_parts() -> None:
    split_1 = {"messages": [{"role": "user", "content": "ab"}, {"role": "user", "content": "c"}]}
    split_2 = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "bc"}]}
    assert prefix_key(split_1, 100) != prefix_key(split_2, 100)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert "hello" in (prefix_key(parts, 100) or "")


def test_prefix_key_for_completions_and_embeddings() -> None:
    assert prefix_key({"prompt": "x" * 50}, 10) == "x" * 10
    assert prefix_key({"prompt": ["first", "second"]}, 100) == "first"
    assert prefix_key({"prompt": [1, 2, 3]}, 100) == "1,2,3"
    assert prefix_key({"input": "embed me"}, 100) == "embed me"
    assert prefix_key({"messages": "not a list"}, 100) is None
    assert prefix_key({}, 100) is None
