"""Tests for gateway.outbox: bounded in frames and bytes, never blocking, one overflow signal,
4008 for a session."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import CloseCode
from gateway.outbox import Outbox, Outgoing, utf8_size
from tests.test_session import World, drain, send

MANY_BYTES = 1 << 20


class Overflows:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def test_frames_come_out_in_order_up_to_the_capacity() -> None:
    overflows = Overflows()
    outbox = Outbox(3, MANY_BYTES, overflows)
    assert [outbox.put(Outgoing(text)) for text in ("a", "b", "c")] == [True, True, True]
    assert outbox.depth == 3
    assert [(await outbox.get()).text for _ in range(3)] == ["a", "b", "c"]
    assert outbox.put(Outgoing("d")) is True  # room again once drained
    assert ((await outbox.get()).text, overflows.calls, outbox.is_open) == ("d", 0, True)


async def test_overflow_signals_once_drops_the_queue_and_refuses_later_frames() -> None:
    overflows = Overflows()
    outbox = Outbox(2, MANY_BYTES, overflows)
    assert outbox.put(Outgoing("a")) and outbox.put(Outgoing("b"))
    assert outbox.put(Outgoing("c")) is False
    assert (overflows.calls, outbox.is_open, outbox.depth) == (1, False, 0)
    for _ in range(100):  # a broadcast storm after the overflow: no more signals, no memory
        assert outbox.put(Outgoing("x")) is False
    assert (overflows.calls, outbox.depth) == (1, 0)


async def test_an_overflow_handler_that_puts_again_is_not_reentered() -> None:
    outbox: Outbox
    calls: list[bool] = []

    def on_overflow() -> None:
        calls.append(outbox.put(Outgoing("error frame")))  # e.g. a reply queued while closing

    outbox = Outbox(1, MANY_BYTES, on_overflow)
    assert outbox.put(Outgoing("a")) is True
    assert outbox.put(Outgoing("b")) is False
    assert (calls, outbox.depth) == ([False], 0)


async def test_close_drops_queued_frames_and_refuses_later_ones() -> None:
    overflows = Overflows()
    outbox = Outbox(4, MANY_BYTES, overflows)
    outbox.put(Outgoing("a"))
    outbox.put(Outgoing("b"))
    outbox.close()
    outbox.close()  # twice: harmless
    assert (outbox.depth, outbox.is_open) == (0, False)
    assert outbox.put(Outgoing("c")) is False
    assert overflows.calls == 0  # closing is not overflowing
    with pytest.raises(TimeoutError):  # nothing left for the writer
        async with asyncio.timeout(0):
            await outbox.get()


@pytest.mark.parametrize("capacity", [0, -1])
def test_a_capacity_below_one_is_refused(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):  # asyncio.Queue(0) is unbounded
        Outbox(capacity, MANY_BYTES, Overflows())


def test_sizes_are_utf8_bytes_measured_once() -> None:
    assert [utf8_size(t) for t in ("", "abc", "\u00e9", "\U0001f600", "\ud800")] == [0, 3, 2, 4, 3]
    item = Outgoing('{"message":"\U0001f600\u00e9"}')
    assert item.size_bytes == len(item.text.encode()) == 20
    assert item == Outgoing(item.text)  # the size is not part of the identity


async def test_bytes_are_bounded_as_well_as_frames() -> None:
    overflows = Overflows()
    outbox = Outbox(100, 10, overflows)
    assert outbox.put(Outgoing("abcd")) and outbox.put(Outgoing("\u00e9\u00e9\u00e9"))  # 4 + 6
    assert (outbox.depth, outbox.size_bytes, overflows.calls) == (2, 10, 0)
    assert (await outbox.get()).text == "abcd"
    assert outbox.size_bytes == 6
    assert outbox.put(Outgoing("x" * 4)) is True  # 10 again: at the bound, not over it
    assert outbox.put(Outgoing("y")) is False  # 11: over
    assert (overflows.calls, outbox.is_open, outbox.depth, outbox.size_bytes) == (1, False, 0, 0)


async def test_a_frame_larger_than_the_byte_bound_passes_alone() -> None:
    overflows = Overflows()
    outbox = Outbox(100, 10, overflows)
    assert outbox.put(Outgoing("m" * 50)) is True  # a big member list, nothing else waiting
    assert outbox.put(Outgoing("a")) is False  # but nothing joins it
    assert overflows.calls == 1
    outbox = Outbox(100, 10, Overflows())
    assert outbox.put(Outgoing("a")) is True
    assert outbox.put(Outgoing("m" * 50)) is False  # not behind something else


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_a_byte_bound_below_one_is_refused(max_bytes: int) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        Outbox(1, max_bytes, Overflows())


async def test_a_session_that_cannot_keep_up_is_closed_4008_and_the_room_goes_on() -> None:
    world = await World({"GATEWAY_SEND_QUEUE_SIZE": "2"}).start()
    alice, bob = await world.session("alice"), await world.session("bob")
    await send(alice, type="join", room="lobby")
    await send(bob, type="join", room="lobby")  # alice: presence (1 queued)
    await send(bob, type="chat", room="lobby", message="1")  # alice: 2 queued, full
    assert (alice.close_code, alice.close_requested.is_set()) == (None, False)
    assert [f["type"] for f in await send(bob, type="chat", room="lobby", message="2")] == ["chat"]
    assert alice.close_code is CloseCode.TOO_SLOW and alice.close_requested.is_set()
    assert (alice.outbox.depth, alice.outbox.is_open) == (0, False)
    alice.request_close(CloseCode.GOING_AWAY)
    assert alice.close_code is CloseCode.TOO_SLOW  # the first request wins
    await alice.close()
    assert [f["event"] for f in await drain(bob)] == ["leave"]  # bob was never slowed
