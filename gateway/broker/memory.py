"""The in-process broker: the default, for one process (``memory://``).

State is bounded by what is live: a room's presence entry disappears when its last
connection leaves, and a subscription when the hub unsubscribes. The chat id counters are
the exception: they stay, one int per room ever chatted in, so ids never restart at 1 while
the process lives (clients may use them to drop duplicates). Rooms are those the policy
allows, so the set is bounded by configuration and token grants, not by clients.

A room's history (:class:`gateway.history.History`) keeps its last chats, numbered and kept
in the same step as they are delivered, so history and live delivery have one order; with
``history_size`` 0 nothing is kept.

A room's users are a dict in the order they entered: a page of a large room is its first
``limit`` users (O(limit), and the same page until they leave), its count the dict's length.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.broker.base import (
    Broker,
    Deliver,
    Envelope,
    Member,
    MemberLeft,
    MemberPage,
    Once,
    RoomUpdate,
)
from gateway.history import History, Recovery, SinceError, recover

__all__ = ["ONCE_KEYS", "MemoryBroker"]

#: Idempotency keys remembered at most (``publish_numbered_once``): about 200 bytes each.
ONCE_KEYS = 100_000

logger = logging.getLogger(__name__)


class _Presence:
    """One user in one room: who they are, and their connections there."""

    __slots__ = ("conns", "member")

    def __init__(self, member: Member) -> None:
        self.member = member
        self.conns: set[str] = set()


class MemoryBroker(Broker):
    """Delivers synchronously, in publish order, to this process's ``deliver``."""

    def __init__(
        self,
        history_size: int = 100,
        history_ttl_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._history = History(history_size, history_ttl_seconds, clock) if history_size else None
        self._clock = clock
        #: (room, once key) -> id, stamp, expiry (clock), in the order they were added: keys
        #: of the same lifetime expire in that order too.
        self._once: OrderedDict[tuple[str, str], tuple[int, int, float]] = OrderedDict()
        self._deliver: Deliver | None = None
        self._subscribed: set[str] = set()
        self._ids: dict[str, int] = {}
        self._presence: dict[str, dict[str, _Presence]] = {}  # room -> user id -> presence
        #: Per large room, the count its last update told (see room_update); gone with the room.
        self._told: dict[str, int] = {}

    @property
    def presence_rooms(self) -> int:
        """Rooms with at least one connection present (a gauge; 0 when everyone left)."""
        return len(self._presence)

    @property
    def subscribed_rooms(self) -> int:
        return len(self._subscribed)

    async def start(self, deliver: Deliver, member_left: MemberLeft | None = None) -> None:
        # One process: no other instance can die and leave members behind.
        if self._deliver is not None:
            raise RuntimeError("the broker is already started")
        self._deliver = deliver

    async def close(self) -> None:
        self._deliver = None
        self._subscribed.clear()

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    async def publish(self, envelope: Envelope) -> None:
        """Deliver ``envelope`` now if its room is subscribed.

        A failing ``deliver`` is logged, not raised: the publisher is some other connection,
        which must not pay for it.

        Raises:
            RuntimeError: when the broker is not started (or closed).
        """
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("the broker is not started")
        if envelope.room not in self._subscribed:
            return
        try:
            deliver(envelope)
        except Exception:
            logger.exception("delivering to room %s failed", envelope.room)

    async def publish_numbered(self, envelope: Envelope) -> int:
        """See :meth:`Broker.publish_numbered`: ids 1, 2, 3 ... per room, for the process's
        life; taking one and delivering involve no await, so they are one step."""
        number = self._ids.get(envelope.room, 0) + 1
        self._ids[envelope.room] = number
        numbered = envelope.numbered(number)
        if self._history is not None:
            self._history.append(envelope.room, number, numbered.payload)
        await self.publish(numbered)
        return number

    async def publish_numbered_once(self, envelope: Envelope, once: Once) -> tuple[int, int | None]:
        """See :meth:`Broker.publish_numbered_once`. At most :data:`ONCE_KEYS` keys are
        remembered (the oldest forgotten first), each for ``once.seconds``."""
        keys = self._once
        now = self._clock()
        while keys:  # forget the expired, oldest first
            first = next(iter(keys.values()))
            if first[2] > now:
                break
            keys.popitem(last=False)
        key = (envelope.room, once.key)
        prior = keys.get(key)
        if prior is not None:
            return prior[0], prior[1]
        number = await self.publish_numbered(envelope)
        keys[key] = (number, once.stamp, now + once.seconds)
        if len(keys) > ONCE_KEYS:
            keys.popitem(last=False)
        return number, None

    async def history(self, room: str, since: int | None, limit: int) -> Recovery | SinceError:
        """See :meth:`Broker.history`."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit!r}")
        kept = self._history
        last_id = self._ids.get(room, 0)
        if kept is None:
            return recover((), since if since is not None else last_id, limit, last_id)
        if since is not None:
            return kept.since(room, since, limit, last_id)
        return Recovery(kept.last(room, limit), True, kept.oldest_id(room), last_id)

    async def presence_add(self, room: str, member: Member, conn_id: str) -> bool:
        """See :meth:`Broker.presence_add`."""
        users = self._presence.setdefault(room, {})
        presence = users.get(member.id)
        first = presence is None
        if presence is None:
            presence = users[member.id] = _Presence(member)
        presence.member = member
        presence.conns.add(conn_id)
        return first

    async def presence_remove(self, room: str, user_id: str, conn_id: str) -> bool:
        users = self._presence.get(room)
        if users is None:
            return False
        presence = users.get(user_id)
        if presence is None or conn_id not in presence.conns:
            return False
        presence.conns.discard(conn_id)
        if presence.conns:
            return False
        del users[user_id]
        if not users:
            del self._presence[room]
            self._told.pop(room, None)
        return True

    async def members(self, room: str) -> list[Member]:
        users = self._presence.get(room, {})
        return [users[user_id].member for user_id in sorted(users)]

    async def members_page(self, room: str, limit: int) -> MemberPage:
        """See :meth:`Broker.members_page`: in a large room, the first ``limit`` users to
        have entered it.

        Raises:
            ValueError: when ``limit`` is below 1.
        """
        if limit < 1:
            raise ValueError("a page holds at least one member")
        users = self._presence.get(room, {})
        if len(users) <= limit:
            return MemberPage(tuple(await self.members(room)), len(users))
        first = [presence.member for presence in itertools.islice(users.values(), limit)]
        return MemberPage(tuple(sorted(first, key=lambda member: member.id)), len(users))

    async def member_count(self, room: str) -> int:
        return len(self._presence.get(room, ()))

    async def room_update(self, room: str, limit: int) -> RoomUpdate | None:
        """See :meth:`Broker.room_update`."""
        count = len(self._presence.get(room, ()))
        told = self._told.get(room)
        if count > limit:
            return None if told == count else RoomUpdate(count)
        if told is None:
            return None
        return RoomUpdate(count, tuple(await self.members(room)))

    async def publish_room_update(self, room: str, update: RoomUpdate, envelope: Envelope) -> bool:
        """See :meth:`Broker.publish_room_update`; no await before the decision.

        Raises:
            RuntimeError: when the broker is not started (or closed).
        """
        if self._deliver is None:
            raise RuntimeError("the broker is not started")
        count = len(self._presence.get(room, ()))
        told = self._told.get(room)
        if count != update.member_count:
            return False
        if update.members is None:  # large: told this count
            if told == count:
                return False
            self._told[room] = count
        else:  # small again: told the list, and nothing more until large again
            if told is None:
                return False
            del self._told[room]
        await self.publish(envelope)
        return True

    async def healthy(self) -> bool:
        return self._deliver is not None
