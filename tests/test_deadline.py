"""``gateway.deadline.Deadline``: asyncio.timeout's semantics, with moves that re-arm lazily."""

from __future__ import annotations

import asyncio

import pytest

from gateway.deadline import Deadline


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_deadline_that_passes_ends_the_block_with_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop.time() + 0.02)
    with pytest.raises(TimeoutError):
        async with deadline:
            await forever()
    assert deadline.expired()


async def test_a_block_that_ends_in_time_is_not_expired() -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.call_soon(done.set)
    async with Deadline(loop.time() + 10) as deadline:
        await done.wait()
    assert not deadline.expired()


async def test_moved_later_it_holds_until_the_new_time() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with Deadline(started + 0.02) as deadline:
            deadline.reschedule(started + 0.1)  # the timer, set for 0.02, re-arms when it fires
            deadline.reschedule(started + 0.2)
            await forever()
    assert loop.time() - started >= 0.2 - 0.002  # timers may round to the millisecond


async def test_moved_earlier_it_fires_then() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with Deadline(started + 30) as deadline:
            deadline.reschedule(started + 0.02)
            await forever()
    assert loop.time() - started < 10


async def test_none_is_no_bound_and_a_past_time_fires_at_once() -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.call_later(0.05, done.set)
    async with Deadline(loop.time() + 0.01) as unbounded:
        unbounded.reschedule(None)
        await done.wait()
    assert not unbounded.expired()
    with pytest.raises(TimeoutError):
        async with Deadline(loop.time() - 1):
            await forever()


async def test_someone_elses_cancellation_is_not_turned_into_a_timeout() -> None:
    async def bounded(expire: bool) -> None:
        async with Deadline(None) as deadline:
            if expire:
                deadline.reschedule(asyncio.get_running_loop().time() - 1)  # fires next turn
            await forever()

    for expire in (False, True):  # cancelled alone, and cancelled as the deadline passes
        task = asyncio.create_task(bounded(expire))
        await asyncio.sleep(0)  # the task is in its block
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_inner_deadline_that_passes_is_the_inner_ones() -> None:
    loop = asyncio.get_running_loop()
    async with Deadline(loop.time() + 30) as outer:
        with pytest.raises(TimeoutError):
            async with Deadline(loop.time() + 0.02) as inner:
                await forever()
        assert inner.expired() and not outer.expired()
        done = asyncio.Event()
        loop.call_soon(done.set)
        await done.wait()  # the task goes on, no stray cancellation left
    assert not outer.expired()


async def test_a_deadline_moves_only_inside_its_block() -> None:
    deadline = Deadline(None)
    with pytest.raises(RuntimeError):
        deadline.reschedule(1.0)
    async with deadline:
        pass
    with pytest.raises(RuntimeError):
        deadline.reschedule(1.0)
