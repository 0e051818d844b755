"""A queue and a flag for per-connection state that cost (almost) nothing until used.

Every open connection holds its queues and events for as long as it lives, and most of them
sit empty: an idle connection's send queue, its receive queue, its close request. asyncio's own
cost a ``collections.deque`` each (a 64-slot block, about 0.7 KiB with the allocator's
overhead): an ``asyncio.Queue`` allocates four (items, getters, putters, and its ``Event``), so
each connection paid several KiB for queues it never used. These allocate their deque and
futures on first use and drop them once empty again.

Both are for one event loop, like asyncio's: no thread safety.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Flag", "LeanQueue"]

T = TypeVar("T")


def _wake_first(waiters: list[asyncio.Future[None]] | None) -> None:
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            return


class LeanQueue(Generic[T]):
    """The part of :class:`asyncio.Queue` a connection uses (``put_nowait``, ``get_nowait``,
    ``put``, ``get``, ``qsize``, ``empty``, ``full``, ``maxsize``), FIFO, bounded when
    ``maxsize`` > 0, with asyncio's exceptions (QueueFull, QueueEmpty) and its cancellation
    rules: a waiter cancelled after it was woken passes its turn on."""

    __slots__ = ("_getters", "_items", "_putters", "maxsize")

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: deque[T] | None = None
        self._getters: list[asyncio.Future[None]] | None = None
        self._putters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= self.qsize()

    def put_nowait(self, item: T) -> None:
        """Add ``item``.

        Raises:
            asyncio.QueueFull: the queue holds ``maxsize`` items.
        """
        if self.full():
            raise asyncio.QueueFull
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        _wake_first(self._getters)

    def get_nowait(self) -> T:
        """Remove and return the first item.

        Raises:
            asyncio.QueueEmpty: the queue is empty.
        """
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None  # an empty queue holds no block
        _wake_first(self._putters)
        return item

    async def get(self) -> T:
        """Remove and return the first item, waiting for one."""
        while self.empty():
            if self._getters is None:
                self._getters = []
            await self._wait(self._getters)
        return self.get_nowait()

    async def put(self, item: T) -> None:
        """Add ``item``, waiting while the queue is full."""
        while self.full():
            if self._putters is None:
                self._putters = []
            await self._wait(self._putters)
        self.put_nowait(item)

    async def _wait(self, waiters: list[asyncio.Future[None]]) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in waiters:
                waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                # Woken, then cancelled: the next waiter gets the turn it would have had.
                _wake_first(waiters)
            raise
        finally:
            if not waiters:
                if waiters is self._getters:
                    self._getters = None
                elif waiters is self._putters:
                    self._putters = None


class Flag:
    """A one-way :class:`asyncio.Event` (``set``, ``is_set``, ``wait``; never cleared) whose
    future exists only once somebody waits, and which :func:`asyncio.wait` can watch
    (:meth:`future`) without a task of its own."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    def future(self) -> asyncio.Future[None]:
        """A future done once the flag is set (already done if it is)."""
        future = self._future
        if future is None:
            future = self._future = asyncio.get_running_loop().create_future()
            if self._set:
                future.set_result(None)
        return future

    async def wait(self) -> None:
        if not self._set:
            await asyncio.shield(self.future())
