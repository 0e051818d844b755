"""Tests for gateway.primitives: asyncio's queue and event semantics, without their idle cost."""

from __future__ import annotations

import asyncio

import pytest

from gateway.primitives import Flag, LeanQueue


async def test_a_queue_is_fifo_bounded_and_raises_asyncios_exceptions() -> None:
    queue: LeanQueue[int] = LeanQueue(maxsize=2)
    assert queue.empty() and not queue.full() and queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert queue.full() and queue.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(3)
    assert [queue.get_nowait(), await queue.get()] == [1, 2]
    unbounded: LeanQueue[int] = LeanQueue()
    for n in range(1000):
        unbounded.put_nowait(n)
    assert not unbounded.full()


async def test_an_empty_queue_holds_no_deque_and_no_waiters() -> None:
    queue: LeanQueue[int] = LeanQueue(maxsize=1)
    assert (queue._items, queue._getters, queue._putters) == (None, None, None)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(7)
    assert await getter == 7
    assert (queue._items, queue._getters, queue._putters) == (None, None, None)


async def test_get_waits_for_an_item_and_put_for_room() -> None:
    queue: LeanQueue[str] = LeanQueue(maxsize=1)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await queue.put("a")
    assert await getter == "a"
    await queue.put("b")
    putter = asyncio.create_task(queue.put("c"))  # full: waits
    await asyncio.sleep(0)
    assert not putter.done()
    assert queue.get_nowait() == "b"
    await putter
    assert queue.get_nowait() == "c"


async def test_a_getter_cancelled_after_it_was_woken_passes_its_turn_on() -> None:
    queue: LeanQueue[int] = LeanQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(1)  # wakes the first...
    first.cancel()  # ...which is cancelled before it runs
    assert await second == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    queue: LeanQueue[int] = LeanQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert queue._getters is None


async def test_a_flag_is_a_one_way_event_asyncio_wait_can_watch() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiter = asyncio.create_task(flag.wait())
    watched = flag.future()
    done, _ = await asyncio.wait({watched}, timeout=0)
    assert not done
    flag.set()
    flag.set()  # twice is fine
    await waiter
    assert flag.is_set() and watched.done()
    late = Flag()
    late.set()
    assert late.future().done()  # set before anyone watched
    await late.wait()


async def test_a_cancelled_wait_does_not_cancel_the_flag() -> None:
    flag = Flag()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    flag.set()
    assert flag.future().done() and not flag.future().cancelled()
