"""One connection's bounded outbound queue.

Everything a connection is sent goes through its :class:`Outbox`; one writer task drains it to
the socket. Putting never blocks and never waits for the client: a broadcast enqueues the same
serialized text for every recipient and moves on. A client that lets its queue fill is not kept
waiting for: the outbox refuses further frames and calls ``on_overflow`` once, and the connection
is closed with 4008 (too slow). Memory per connection is therefore bounded by ``capacity``
frames of at most the frame cap each.

What is queued is an :class:`Outgoing`: the text with its frame type (for the sent-messages
metric) and, for a broadcast, when the frame that caused it was received (for the latency
histogram). A broadcast makes one :class:`Outgoing` and queues that same object for every
recipient: nothing is serialized or copied per recipient.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Outbox", "Outgoing"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame for the writer, shared by every recipient of a broadcast.

    Attributes:
        text: the serialized frame.
        kind: its ``type`` (a metric label: one of the server frame types, or ``other``).
        received_monotonic: for a broadcast, ``time.monotonic()`` when the frame that caused
            it was read (or when it reached this instance from the broker); ``None`` for a
            direct reply, which the latency histogram leaves out.
    """

    text: str
    kind: str = "other"
    received_monotonic: float | None = None


class Outbox:
    """A bounded FIFO of :class:`Outgoing` frames, with an overflow signal, not back-pressure.

    Args:
        capacity: frames held at most, >= 1.
        on_overflow: called once, when a frame finds the queue full.

    Raises:
        ValueError: on a capacity below 1 (``asyncio.Queue(0)`` would be unbounded).
    """

    def __init__(self, capacity: int, on_overflow: Callable[[], None]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity!r}")
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=capacity)
        self._on_overflow = on_overflow
        self._open = True

    @property
    def depth(self) -> int:
        """Frames waiting for the writer."""
        return self._queue.qsize()

    @property
    def is_open(self) -> bool:
        return self._open

    def put(self, item: Outgoing) -> bool:
        """Queue ``item`` for the client; False when refused (closed, or it just overflowed)."""
        if not self._open:
            return False
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.close()
            self._on_overflow()
            return False
        return True

    async def get(self) -> Outgoing:
        """The next frame to write; waits while the queue is empty."""
        return await self._queue.get()

    def close(self) -> None:
        """Refuse every later frame and drop what is queued (the connection is going)."""
        self._open = False
        while not self._queue.empty():
            self._queue.get_nowait()
