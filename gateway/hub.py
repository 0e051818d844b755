"""The local fan-out: which connections of this process are in which room.

The broker carries each broadcast between processes as one :class:`~gateway.broker.Envelope`
holding text serialized once by the publisher; the hub hands that same text to every local
member's outbox. Nothing here waits on a client: a full outbox closes its own connection
(:mod:`gateway.outbox`), it never slows the others.

The hub also counts local members per room, so that this process subscribes to a room's
broadcasts while, and only while, one of its connections is in it.

Each envelope becomes one :class:`~gateway.outbox.Outgoing`, shared by every recipient: its
type (for the sent-messages metric) is read once, and it carries when the frame that caused it
was read (:data:`RECEIVED_MONOTONIC`), so each writer can observe the broadcast's latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol

from gateway.broker import Broker, Envelope
from gateway.metrics import frame_kind
from gateway.outbox import Outgoing

__all__ = ["RECEIVED_MONOTONIC", "Hub", "Recipient"]

#: ``time.monotonic()`` when the frame this task is handling was read from its socket. The
#: connection's reader sets it before handing the frame to the session; the in-process broker
#: delivers within the publisher's call, in the same context, so the hub sees it. A broadcast
#: that arrives from another instance (a broker's listener task) has none: it is stamped on
#: arrival.
RECEIVED_MONOTONIC: ContextVar[float | None] = ContextVar(
    "gateway_received_monotonic", default=None
)


class Recipient(Protocol):
    """What the hub needs of a connection."""

    @property
    def conn_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    def deliver(self, item: Outgoing) -> None: ...


class Hub:
    """Local room membership and delivery of envelopes to local members.

    Args:
        broker: the broker this process subscribes through.
        monotonic: the clock that stamps envelopes from other instances.
    """

    def __init__(self, broker: Broker, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._broker = broker
        self._monotonic = monotonic
        self._rooms: dict[str, dict[str, Recipient]] = {}
        self._subscriptions: dict[str, int] = {}

    async def start(self) -> None:
        await self._broker.start(self.deliver)

    @property
    def rooms(self) -> int:
        """Rooms with at least one local member (for metrics and leak tests)."""
        return len(self._rooms)

    def members(self, room: str) -> int:
        return len(self._rooms.get(room, ()))

    async def acquire(self, room: str) -> None:
        """Hold a subscription to ``room`` (subscribes the broker for the first holder)."""
        count = self._subscriptions.get(room, 0)
        self._subscriptions[room] = count + 1
        if count == 0:
            try:
                await self._broker.subscribe(room)
            except BaseException:
                self._drop_subscription(room)
                raise

    async def release(self, room: str) -> None:
        """Give back a subscription taken by :meth:`acquire`."""
        if self._drop_subscription(room):
            await self._broker.unsubscribe(room)

    def _drop_subscription(self, room: str) -> bool:
        count = self._subscriptions.get(room, 0) - 1
        if count > 0:
            self._subscriptions[room] = count
            return False
        self._subscriptions.pop(room, None)
        return count == 0

    def attach(self, room: str, member: Recipient) -> None:
        """From now on ``member`` receives the room's envelopes."""
        self._rooms.setdefault(room, {})[member.conn_id] = member

    def detach(self, room: str, member: Recipient) -> None:
        members = self._rooms.get(room)
        if members is None:
            return
        members.pop(member.conn_id, None)
        if not members:
            del self._rooms[room]

    def deliver(self, envelope: Envelope) -> None:
        """Hand one envelope to every local member of its room (called by the broker)."""
        members = self._rooms.get(envelope.room)
        if not members:
            return
        received = RECEIVED_MONOTONIC.get()
        if received is None:
            received = self._monotonic()
        kind = frame_kind(envelope.payload)
        item = Outgoing(envelope.payload, kind, received)
        echo = None
        if envelope.echo_payload is not None:
            echo = Outgoing(envelope.echo_payload, kind, received)
        for member in list(members.values()):
            if member.user_id == envelope.skip_user:
                continue
            if echo is not None and member.conn_id == envelope.echo_conn:
                member.deliver(echo)
            else:
                member.deliver(item)
