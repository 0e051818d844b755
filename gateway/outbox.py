"""One connection's bounded outbound queue.

Everything a connection is sent goes through its :class:`Outbox`; one writer task drains it to
the socket. Putting never blocks and never waits for the client: a broadcast enqueues the same
serialized text for every recipient and moves on. A client that lets its queue fill is not kept
waiting for: the outbox refuses further frames and calls ``on_overflow`` once, and the connection
is closed with 4008 (too slow).

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
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Outbox", "Outgoing", "utf8_size"]


def utf8_size(text: str) -> int:
    """The length of ``text`` in UTF-8 bytes; O(1) for ASCII text (CPython knows it is)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
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

    text: str
    kind: str = "other"
    received_monotonic: float | None = None
    size_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_bytes", utf8_size(self.text))


class Outbox:
    """A bounded FIFO of :class:`Outgoing` frames, with an overflow signal, not back-pressure.

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
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=capacity)
        self._max_bytes = max_bytes
        self._bytes = 0
        self._on_overflow = on_overflow
        self._open = True

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

    def put(self, item: Outgoing) -> bool:
        """Queue ``item`` for the client; False when refused (closed, or it just overflowed)."""
        if not self._open:
            return False
        if self._bytes and self._bytes + item.size_bytes > self._max_bytes:
            return self._overflow()
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            return self._overflow()
        self._bytes += item.size_bytes
        return True

    def _overflow(self) -> bool:
        self.close()
        self._on_overflow()
        return False

    async def get(self) -> Outgoing:
        """The next frame to write; waits while the queue is empty."""
        item = await self._queue.get()
        self._bytes -= item.size_bytes
        return item

    def close(self) -> None:
        """Refuse every later frame and drop what is queued (the connection is going)."""
        self._open = False
        while not self._queue.empty():
            self._queue.get_nowait()
        self._bytes = 0
