"""Room history and the seam between a replay and live delivery (docs/protocol.md, History
and resume).

The memory broker keeps a :class:`History`; the Redis broker keeps a stream per room and
answers with :func:`recover`, the same rule; the session replays a recovery and joins it to
the live traffic through a :class:`Seam`.

A room keeps its last chat messages, bounded twice: at most ``size`` of them, none older than
``ttl_seconds`` (:class:`RoomHistory`). Each is kept as the broadcast's own JSON text, under
the id the broker gave it; a room's ids increase by one per message (the broker's counter,
one order per room), so "everything after id N" is complete exactly when the oldest message
kept is N + 1 or older.

A client that comes back asks for what followed the last id it saw (:meth:`RoomHistory.since`)
and gets it in order, or learns that history no longer reaches back that far
(:attr:`Recovery.recovered` false, with the oldest id still kept). A newcomer may ask for the
last few messages (:meth:`RoomHistory.last`).

The seam (:class:`Seam`): a joining connection is attached to the room's live traffic before
history is read, and what reaches it meanwhile is held; once the replay is known, held chats
the replay already carries (ids up to its last) are dropped and the rest follow it, in order.
So a message published while the replay runs appears exactly once, whichever broker (one
process, or several instances sharing Redis) delivered it and whenever.

Memory: at most ``size`` messages per room that had traffic within ``ttl_seconds``, each its
JSON text (up to the chat cap, ``GATEWAY_MAX_MESSAGE_BYTES``) and about 100 bytes of
bookkeeping; a room whose messages have all expired is forgotten (:meth:`History.prune`).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Entry", "History", "Recovery", "RoomHistory", "Seam", "SinceError", "recover"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry:
    """One kept message: its id in the room, its JSON text, when it was kept (monotonic)."""

    id: int
    payload: str
    at: float


class SinceError(enum.Enum):
    """Why a ``since`` cannot be answered with a replay."""

    #: ``since`` is above the room's last id: from another era of ids (the room's counter
    #: restarted with the server or its Redis), or made up.
    FUTURE = "future"


@dataclass(frozen=True, slots=True)
class Recovery:
    """The answer to "what followed id ``since``": the messages, in order, and whether they
    are all of them.

    Attributes:
        messages: the kept messages after ``since``, oldest first (at most the replay limit:
            the newest ones when more are missing).
        recovered: True when ``messages`` is everything after ``since`` (possibly nothing).
        oldest_id: the oldest id history still keeps, None when it keeps nothing.
        last_id: the room's last id (0 before its first message).
    """

    messages: tuple[Entry, ...]
    recovered: bool
    oldest_id: int | None
    last_id: int


def recover(
    entries: Iterable[Entry], since: int, limit: int, last_id: int
) -> Recovery | SinceError:
    """What followed id ``since`` in a room whose last id is ``last_id``, from ``entries``
    (what its history keeps, oldest first): at most ``limit`` messages, the newest, and then
    ``recovered`` is false when more followed. The one rule, for every broker.

    Raises:
        ValueError: on a negative ``since`` or a ``limit`` below 1.
    """
    if since < 0:
        raise ValueError(f"since must be >= 0, not {since!r}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit!r}")
    if since > last_id:
        return SinceError.FUTURE
    kept_all = tuple(entries)
    oldest = kept_all[0].id if kept_all else None
    missing = last_id - since
    if missing == 0:
        return Recovery((), True, oldest, last_id)
    kept = [entry for entry in kept_all if entry.id > since]
    complete = oldest is not None and oldest <= since + 1 and len(kept) == missing
    if len(kept) > limit:
        kept, complete = kept[-limit:], False
    return Recovery(tuple(kept), complete, oldest, last_id)


class RoomHistory:
    """One room's last messages, at most ``size`` and none older than ``ttl_seconds``.

    Raises:
        ValueError: when ``size`` < 1 or ``ttl_seconds`` <= 0.
    """

    __slots__ = ("_clock", "_entries", "_ttl", "last_id")

    def __init__(
        self, size: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size!r}")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, not {ttl_seconds!r}")
        self._entries: deque[Entry] = deque(maxlen=size)
        self._ttl = ttl_seconds
        self._clock = clock
        #: The room's last id, kept when its message has expired.
        self.last_id = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def append(self, message_id: int, payload: str) -> None:
        """Keep the message ``message_id``; ids must increase (the broker's order).

        Raises:
            ValueError: when ``message_id`` is not above the last one kept.
        """
        if message_id <= self.last_id:
            raise ValueError(f"id {message_id} does not follow {self.last_id}")
        self._expire()
        self._entries.append(Entry(message_id, payload, self._clock()))
        self.last_id = message_id

    def since(self, since: int, limit: int) -> Recovery | SinceError:
        """See :func:`recover`, over what this room keeps."""
        self._expire()
        return recover(self._entries, since, limit, self.last_id)

    def last(self, count: int) -> tuple[Entry, ...]:
        """The newest ``count`` kept messages (fewer when fewer are kept), oldest first.

        Raises:
            ValueError: on a ``count`` below 0.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count!r}")
        self._expire()
        if count == 0:
            return ()
        return tuple(self._entries)[-count:]

    @property
    def expired(self) -> bool:
        """Whether nothing is kept any more (every message aged out)."""
        self._expire()
        return not self._entries

    def _expire(self) -> None:
        entries = self._entries
        horizon = self._clock() - self._ttl
        while entries and entries[0].at <= horizon:
            entries.popleft()


class History:
    """Every room's :class:`RoomHistory`, made on a room's first message.

    Args:
        size: messages kept per room (``GATEWAY_HISTORY_SIZE``).
        ttl_seconds: how long each is kept (``GATEWAY_HISTORY_TTL_SECONDS``).
    """

    def __init__(
        self, size: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        RoomHistory(size, ttl_seconds, clock)  # the same checks, at once
        self._size = size
        self._ttl = ttl_seconds
        self._clock = clock
        self._rooms: dict[str, RoomHistory] = {}

    @property
    def rooms(self) -> int:
        return len(self._rooms)

    def room(self, room: str) -> RoomHistory | None:
        return self._rooms.get(room)

    def append(self, room: str, message_id: int, payload: str) -> None:
        """See :meth:`RoomHistory.append`."""
        history = self._rooms.get(room)
        if history is None:
            self.prune()  # a new room: forget the idle ones first (amortized over rooms)
            history = self._rooms[room] = RoomHistory(self._size, self._ttl, self._clock)
        history.append(message_id, payload)

    def since(self, room: str, since: int, limit: int, last_id: int) -> Recovery | SinceError:
        """See :func:`recover`; ``last_id`` is the room's counter, for a room this history
        has forgotten (or never had a message in)."""
        history = self._rooms.get(room)
        if history is not None:
            return history.since(since, limit)
        return recover((), since, limit, last_id)

    def oldest_id(self, room: str) -> int | None:
        """The oldest id ``room``'s history keeps, None when it keeps nothing."""
        kept = self.last(room, 1 << 30)
        return kept[0].id if kept else None

    def last(self, room: str, count: int) -> tuple[Entry, ...]:
        history = self._rooms.get(room)
        return history.last(count) if history is not None else ()

    def prune(self) -> int:
        """Forget the rooms whose messages have all expired; how many were forgotten. (Their
        last id lives on in the broker's counter.)"""
        gone = [room for room, history in self._rooms.items() if history.expired]
        for room in gone:
            del self._rooms[room]
        return len(gone)


class Seam(Generic[T]):
    """What reaches a joining connection between its attach to the room and its replay.

    :meth:`hold` keeps each live item with its chat id (None for frames that carry none:
    presence, typing); :meth:`release` returns, in order, those the replay does not already
    carry: an item whose id is at most the replay's last id is a duplicate, dropped.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[tuple[int | None, T]] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, message_id: int | None, item: T) -> None:
        self._held.append((message_id, item))

    def release(self, replayed_to: int) -> list[T]:
        """The held items to deliver after a replay that ended at id ``replayed_to`` (0
        when it carried nothing), in the order they arrived; the seam is empty afterwards."""
        held, self._held = self._held, []
        return [item for message_id, item in held if message_id is None or message_id > replayed_to]
