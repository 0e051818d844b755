"""Tests for gateway.outbox: bounded in frames and bytes, never blocking, one overflow signal,
4008 for a session."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import CloseCode
from gateway.outbox import Offer, Outbox, Outgoing, Put, utf8_size
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
    assert [outbox.put(Outgoing(text)) for text in ("a", "b", "c")] == [Put.QUEUED] * 3
    assert outbox.depth == 3
    assert [(await outbox.get()).text for _ in range(3)] == ["a", "b", "c"]
    assert outbox.put(Outgoing("d")) is Put.QUEUED  # room again once drained
    assert ((await outbox.get()).text, overflows.calls, outbox.is_open) == ("d", 0, True)


async def test_overflow_signals_once_drops_the_queue_and_refuses_later_frames() -> None:
    overflows = Overflows()
    outbox = Outbox(2, MANY_BYTES, overflows)
    assert outbox.put(Outgoing("a")) and outbox.put(Outgoing("b"))
    assert outbox.put(Outgoing("c")) is Put.REFUSED
    assert (overflows.calls, outbox.is_open, outbox.depth) == (1, False, 0)
    for _ in range(100):  # a broadcast storm after the overflow: no more signals, no memory
        assert outbox.put(Outgoing("x")) is Put.REFUSED
    assert (overflows.calls, outbox.depth) == (1, 0)


async def test_an_overflow_handler_that_puts_again_is_not_reentered() -> None:
    outbox: Outbox
    calls: list[Put] = []

    def on_overflow() -> None:
        calls.append(outbox.put(Outgoing("error frame")))  # e.g. a reply queued while closing

    outbox = Outbox(1, MANY_BYTES, on_overflow)
    assert outbox.put(Outgoing("a")) is Put.QUEUED
    assert outbox.put(Outgoing("b")) is Put.REFUSED
    assert (calls, outbox.depth) == ([Put.REFUSED], 0)


async def test_close_drops_queued_frames_and_refuses_later_ones() -> None:
    overflows = Overflows()
    outbox = Outbox(4, MANY_BYTES, overflows)
    outbox.put(Outgoing("a"))
    outbox.put(Outgoing("b"))
    outbox.close()
    outbox.close()  # twice: harmless
    assert (outbox.depth, outbox.is_open) == (0, False)
    assert outbox.put(Outgoing("c")) is Put.REFUSED
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
    assert outbox.put(Outgoing("x" * 4)) is Put.QUEUED  # 10 again: at the bound, not over it
    assert outbox.put(Outgoing("y")) is Put.REFUSED  # 11: over
    assert (overflows.calls, outbox.is_open, outbox.depth, outbox.size_bytes) == (1, False, 0, 0)


async def test_a_frame_larger_than_the_byte_bound_passes_alone() -> None:
    overflows = Overflows()
    outbox = Outbox(100, 10, overflows)
    assert outbox.put(Outgoing("m" * 50)) is Put.QUEUED  # a big member list, nothing else waiting
    assert outbox.put(Outgoing("a")) is Put.REFUSED  # but nothing joins it
    assert overflows.calls == 1
    outbox = Outbox(100, 10, Overflows())
    assert outbox.put(Outgoing("a")) is Put.QUEUED
    assert outbox.put(Outgoing("m" * 50)) is Put.REFUSED  # not behind something else


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


class FakeSink:
    """A transport that takes ``room`` frames before it backs up, until it is closed."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.frames: list[bytes] = []
        self.closed = False
        self.drain = asyncio.Event()

    def offer(self, item: Outgoing) -> Offer:
        if self.closed:
            return Offer.CLOSED
        if len(self.frames) >= self.room:
            return Offer.FULL
        self.frames.append(item.frame)
        return Offer.WRITTEN

    def write(self, frame: bytes) -> bool:
        if self.closed:
            return False
        self.frames.append(frame)
        return True

    async def drained(self) -> None:
        await self.drain.wait()


def texts(sink: FakeSink) -> list[str]:
    return [frame[2:].decode() for frame in sink.frames]


async def test_a_frame_goes_straight_to_the_sink_while_nothing_waits() -> None:
    outbox, sink = Outbox(8, MANY_BYTES, Overflows()), FakeSink(room=2)
    outbox.attach(sink)
    assert [outbox.put(Outgoing(t)) for t in ("a", "b")] == [Put.WRITTEN, Put.WRITTEN]
    assert (texts(sink), outbox.depth) == (["a", "b"], 0)
    # The transport backs up: frames queue, and once one waits, every later one queues too,
    # even when the transport could take it again: nothing overtakes what waits.
    assert outbox.put(Outgoing("c")) is Put.QUEUED
    sink.room = 100
    assert outbox.put(Outgoing("d")) is Put.QUEUED
    item = await outbox.get()  # the writer takes "c" and waits for the drain...
    assert outbox.put(Outgoing("e")) is Put.QUEUED  # ...so "e" may not go before it
    sink.write(item.frame)
    outbox.sent()
    assert [(await outbox.get()).text for _ in range(2)] == ["d", "e"]
    outbox.sent()
    assert outbox.put(Outgoing("f")) is Put.WRITTEN  # nothing waits any more: straight again
    assert texts(sink) == ["a", "b", "c", "f"]


async def test_a_closing_sink_refuses_instead_of_queueing() -> None:
    outbox, sink = Outbox(8, MANY_BYTES, Overflows()), FakeSink(room=10)
    outbox.attach(sink)
    sink.closed = True
    assert outbox.put(Outgoing("late")) is Put.REFUSED
    assert outbox.depth == 0


async def test_queued_frames_are_bounded_as_before_with_a_sink() -> None:
    overflows = Overflows()
    outbox = Outbox(2, MANY_BYTES, overflows)
    outbox.attach(FakeSink(room=0))  # a client that never reads
    assert [outbox.put(Outgoing(t)) for t in ("a", "b")] == [Put.QUEUED] * 2
    assert outbox.put(Outgoing("c")) is Put.REFUSED
    assert (overflows.calls, outbox.is_open) == (1, False)


def test_the_frame_is_built_once_and_unmasked() -> None:
    short, medium, long = Outgoing("é"), Outgoing("m" * 200), Outgoing("l" * 70_000)
    assert short.frame == b"\x81\x02" + "é".encode()
    assert medium.frame[:4] == b"\x81\x7e\x00\xc8" and len(medium.frame) == 204
    assert long.frame[:2] == b"\x81\x7f" and len(long.frame) == 10 + 70_000
    assert short.frame is short.frame  # cached: every recipient shares the same bytes
