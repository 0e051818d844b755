"""One connection's bounded outbound queue, and the fast path around it.

Everything a connection is sent goes through its :class:`Outbox`. Putting never blocks and never
waits for the client. When the connection has a :class:`Sink` (its transport, reached below
ASGI: gateway.hypercorn_fixes) and nothing is waiting, a frame is written at once, in the
caller's turn of the event loop: a broadcast builds the frame once and writes it to every
recipient's transport, with no task, queue or ASGI message per delivery. Otherwise (the
transport's buffer is full, or frames wait already, or there is no sink) the frame is queued,
and one writer task drains the queue as the transport drains, in order. A client that lets its
queue fill is not kept waiting for: the outbox refuses further frames and calls
``on_overflow`` once, and the connection is closed with 4008 (too slow). Any other close
seals the outbox instead (:meth:`~Outbox.seal`): nothing more is taken, and what waits is
still written, before the close frame (the replies to the frames before the one that
crossed an abuse limit, say).

The queue is bounded twice: in frames (``capacity``) and in UTF-8 bytes (``max_bytes``), since
outgoing frames have no size cap of their own (a ``joined`` lists every member of a room). A
frame larger than ``max_bytes`` still passes when nothing else waits, so one big member list
cannot lock a client out; memory per connection is therefore at most
``max(max_bytes, largest frame)`` here, plus the transport's write buffer
(:data:`gateway.hypercorn_fixes.WRITE_BUFFER_HIGH_BYTES`) that the writer waits on.

What is queued is an :class:`Outgoing`: the text with its frame type (for the sent-messages
metric), its size, and, for a broadcast, when the frame that caused it was received (for the
latency histogram). A broadcast makes one :class:`Outgoing` and queues that same object for
every recipient: nothing is serialized, measured or copied per recipient.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Protocol

from gateway.primitives import LeanQueue

__all__ = ["Offer", "Outbox", "Outgoing", "Put", "Sink", "text_frame", "utf8_size"]


def utf8_size(text: str) -> int:
    """The length of ``text`` in UTF-8 bytes; O(1) for ASCII text (CPython knows it is)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class Outgoing:
    """One frame for the writer, shared by every recipient of a broadcast.

    Attributes:
        text: the serialized frame.
        kind: its ``type`` (a metric label: one of the server frame types, or ``other``).
        received_monotonic: for a broadcast, ``time.monotonic()`` when the frame that caused
            it was read (or when it reached this instance from the broker); ``None`` for a
            direct reply, which the latency histogram leaves out.
        size_bytes: ``text`` in UTF-8 bytes, measured once.
    """

    __slots__ = ("_frame", "_payload", "kind", "received_monotonic", "size_bytes", "text")

    def __init__(
        self, text: str, kind: str = "other", received_monotonic: float | None = None
    ) -> None:
        self.text = text
        self.kind = kind
        self.received_monotonic = received_monotonic
        self.size_bytes = utf8_size(text)
        self._payload: bytes | None = None
        self._frame: bytes | None = None

    @property
    def payload(self) -> bytes:
        """``text`` in UTF-8, encoded once, on first use, for every recipient."""
        payload = self._payload
        if payload is None:
            payload = self._payload = self.text.encode("utf-8", "surrogatepass")
        return payload

    @property
    def frame(self) -> bytes:
        """The whole WebSocket frame of ``text`` as a server sends it (RFC 6455 section 5.2:
        FIN, opcode text, unmasked), built once, on first use, for every recipient."""
        frame = self._frame
        if frame is None:
            frame = self._frame = text_frame(self.payload)
        return frame

    @property
    def is_reply(self) -> bool:
        """A direct reply (no broadcast caused it): batched delivery does not hold it back."""
        return self.received_monotonic is None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Outgoing):
            return NotImplemented
        return (self.text, self.kind, self.received_monotonic) == (
            other.text,
            other.kind,
            other.received_monotonic,
        )

    def __hash__(self) -> int:
        return hash((self.text, self.kind, self.received_monotonic))

    def __repr__(self) -> str:
        return f"Outgoing({self.text!r}, {self.kind!r}, {self.received_monotonic!r})"


def text_frame(payload: bytes) -> bytes:
    """An unmasked final text frame holding ``payload`` (RFC 6455 section 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 1 << 16:
        return _HEAD_16.pack(0x81, 126, length) + payload
    return _HEAD_64.pack(0x81, 127, length) + payload


_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


class Offer(IntEnum):
    """What a :class:`Sink` did with a frame offered to it."""

    CLOSED = 0
    FULL = 1
    WRITTEN = 2


class Sink(Protocol):
    """Where an outbox writes frames without a task in between (the transport, below ASGI)."""

    def offer(self, item: Outgoing) -> Offer:
        """Write ``item`` now (its :attr:`Outgoing.frame`, or in a batch) if the connection is
        open and nothing backs up: WRITTEN; else FULL (queue it) or CLOSED (drop it)."""

    def write(self, frame: bytes) -> bool:
        """Write one whole frame now; False when the connection is closing (nothing written)."""

    async def drained(self) -> None:
        """Until a frame may be written without piling up (the transport drained).

        Raises:
            ConnectionError: the connection was lost.
        """


class Put(IntEnum):
    """What became of a frame given to :meth:`Outbox.put` (false only when refused)."""

    REFUSED = 0
    QUEUED = 1
    WRITTEN = 2


class Outbox:
    """A bounded FIFO of :class:`Outgoing` frames, with an overflow signal, not back-pressure,
    and a direct write to its :class:`Sink` while nothing waits.

    Args:
        capacity: frames held at most, >= 1.
        max_bytes: UTF-8 bytes held at most, >= 1 (a larger frame passes only alone).
        on_overflow: called once, when a frame finds the queue full.

    Raises:
        ValueError: on a capacity or byte bound below 1 (``asyncio.Queue(0)`` is unbounded).
    """

    def __init__(self, capacity: int, max_bytes: int, on_overflow: Callable[[], None]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes!r}")
        self._queue: LeanQueue[Outgoing] = LeanQueue(maxsize=capacity)
        self._max_bytes = max_bytes
        self._bytes = 0
        self._on_overflow = on_overflow
        self._open = True
        self._sink: Sink | None = None
        #: The writer took a frame and has not written it yet: later frames must queue.
        self._busy = False

    def attach(self, sink: Sink) -> None:
        """From now on, write to ``sink`` directly whenever nothing waits."""
        self._sink = sink

    @property
    def sink(self) -> Sink | None:
        return self._sink

    @property
    def capacity(self) -> int:
        """Frames the queue holds at most."""
        return self._queue.maxsize

    @property
    def depth(self) -> int:
        """Frames waiting for the writer."""
        return self._queue.qsize()

    @property
    def size_bytes(self) -> int:
        """UTF-8 bytes waiting for the writer."""
        return self._bytes

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def settled(self) -> bool:
        """Nothing waits for the writer, and it holds no frame it has not written yet."""
        return not self._busy and self._queue.empty()

    def put(self, item: Outgoing) -> Put:
        """Write ``item`` now if nothing waits and the sink takes it, else queue it.

        Returns:
            WRITTEN or QUEUED; REFUSED when the outbox is closed, the connection is closing,
            or this frame overflowed the queue (then ``on_overflow`` was called).
        """
        if not self._open:
            return Put.REFUSED
        sink = self._sink
        if sink is not None and not self._busy and self._queue.empty():
            offered = sink.offer(item)
            if offered is Offer.WRITTEN:
                return Put.WRITTEN
            if offered is Offer.CLOSED:
                return Put.REFUSED
        if self._bytes and self._bytes + item.size_bytes > self._max_bytes:
            return self._overflow()
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            return self._overflow()
        self._bytes += item.size_bytes
        return Put.QUEUED

    def _overflow(self) -> Put:
        self.close()
        self._on_overflow()
        return Put.REFUSED

    async def get(self) -> Outgoing:
        """The next frame to write; waits while the queue is empty. Until :meth:`sent`, later
        frames queue behind it (they must not overtake it)."""
        item = await self._queue.get()
        self._busy = True
        self._bytes -= item.size_bytes
        return item

    def sent(self) -> None:
        """The writer has written (or given up) the frame it took with :meth:`get`."""
        self._busy = False

    def seal(self) -> None:
        """Refuse every later frame, and keep what is queued for the writer: the connection is
        closing, and what it was sent before the close goes out first (at most what the bounds
        let wait: this adds nothing)."""
        self._open = False

    def close(self) -> None:
        """Refuse every later frame and drop what is queued (the connection is going)."""
        self._open = False
        while not self._queue.empty():
            self._queue.get_nowait()
        self._bytes = 0
