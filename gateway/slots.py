"""Open connections: at most so many in this process, and per user over every instance.

:class:`ConnectionSlots` gives each accepted connection a :class:`Slot`. The total is per process
(``GATEWAY_MAX_CONNECTIONS``: what this process can hold). The cap per user
(``GATEWAY_MAX_CONNECTIONS_PER_USER``) is counted here with ``memory://``, and in the quota
store's Redis otherwise, so that it holds over every instance sharing it:

- Each user has a sorted set, ``gateway:slots:<user id>``: one member per open connection
  (this instance's random id and a number), scored by when it expires (Redis's clock, in ms).
- Taking a slot is one Lua script (:data:`TAKE`): drop the expired members, count the others,
  add this one if under the cap. Atomic, so two instances never both take the last slot.
- Giving it back is a ``ZREM``. A heartbeat every TTL/4 (the TTL is
  ``GATEWAY_PRESENCE_TTL_SECONDS``) refreshes this instance's members (:data:`REFRESH`),
  re-adding any that Redis lost. So an instance that dies (``kill -9``) frees its users' slots
  within the TTL, and a slot that could not be given back (Redis down) or whose taking was
  interrupted halfway expires the same way. Every key expires with its last member.

The store failing while a slot is taken refuses the upgrade with 503 ``unavailable``; giving one
back never raises (it is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterator, Sequence

from gateway.errors import HandshakeRejected
from gateway.quotas import (
    RETRY_AFTER_SECONDS,
    QuotaStore,
    StoreUnavailable,
    Throttle,
    store_unavailable,
)

__all__ = ["KEY_PREFIX", "REFRESH", "TAKE", "ConnectionSlots", "Slot"]

log = logging.getLogger(__name__)

#: The per-user sorted sets are ``KEY_PREFIX + user id``.
KEY_PREFIX = b"gateway:slots:"

#: KEYS[1]: a user's slots. ARGV: the new member, the cap, the TTL in ms. 1 if taken (or held
#: already: a retry after a lost reply takes it again), else 0.
TAKE = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: KEYS[1]: a user's slots. ARGV: the TTL in ms, then this instance's members of that user.
REFRESH = """
local clock = redis.call('TIME')
local expiry = clock[1] * 1000 + math.floor(clock[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""

#: Users refreshed per round trip.
_BATCH = 500


class Slot:
    """One connection's place: give it back with :meth:`ConnectionSlots.release`, once."""

    __slots__ = ("member", "released", "user_id")

    def __init__(self, user_id: str, member: bytes) -> None:
        self.user_id = user_id
        #: Its member in the user's sorted set (with a Redis store).
        self.member = member
        self.released = False


class ConnectionSlots:
    """Open connections, capped in this process in total, and per user (see the module).

    Args:
        max_total: connections this process holds at most (>= 1).
        max_per_user: connections one user id holds at most (>= 1), over every instance when
            ``store`` is a Redis.
        store: where the per-user counts live; in this process when None or ``memory://``.
        ttl_seconds: with a Redis store, how long a slot lives without this instance's
            heartbeat (every quarter of it).

    Raises:
        ValueError: on a cap below 1 or a TTL not above 0.
    """

    def __init__(
        self,
        max_total: int,
        max_per_user: int,
        *,
        store: QuotaStore | None = None,
        ttl_seconds: float = 20.0,
    ) -> None:
        if max_total < 1 or max_per_user < 1:
            raise ValueError("max_total and max_per_user must be >= 1")
        if not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0, not {ttl_seconds!r}")
        self._max_total = max_total
        self._max_per_user = max_per_user
        self._per_user: dict[str, int] = {}
        self._total = 0
        self._shared = (
            _SharedSlots(store, max_per_user, ttl_seconds)
            if store is not None and store.redis is not None
            else None
        )
        self._instance = secrets.token_hex(8).encode()
        self._numbers = itertools.count()

    @property
    def total(self) -> int:
        """Slots held in this process."""
        return self._total

    def for_user(self, user_id: str) -> int:
        """Slots ``user_id`` holds in this process."""
        return self._per_user.get(user_id, 0)

    async def start(self) -> None:
        """Start the heartbeat (with a Redis store)."""
        if self._shared is not None:
            self._shared.start()

    async def close(self) -> None:
        """Stop the heartbeat; the slots still held expire within the TTL."""
        if self._shared is not None:
            await self._shared.close()

    async def acquire(self, user_id: str) -> Slot:
        """Take a slot for ``user_id``; pair it with exactly one :meth:`release`.

        The total is checked first; the slot counts here from the start, so concurrent calls
        never overshoot it. Cancelled or failing, this takes nothing here (a member the script
        may have added in Redis expires within the TTL).

        Raises:
            HandshakeRejected: 503 ``server_full`` when the total is reached; 429
                ``too_many_connections`` when the user holds ``max_per_user`` already; 503
                ``unavailable`` when the store fails. All carry ``Retry-After`` (RFC 6585
                section 4, RFC 9110 section 15.6.4).
        """
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self._total >= self._max_total:
            raise HandshakeRejected(503, "server_full", "the server is full, try later", retry)
        too_many = HandshakeRejected(
            429,
            "too_many_connections",
            f"at most {self._max_per_user} open connections per user",
            retry,
        )
        if self._shared is None and self.for_user(user_id) >= self._max_per_user:
            raise too_many
        slot = Slot(user_id, b"%s:%d" % (self._instance, next(self._numbers)))
        self._count(user_id, 1)
        try:
            if self._shared is not None and not await self._shared.take(slot):
                raise too_many
        except BaseException:
            self._count(user_id, -1)
            raise
        return slot

    async def release(self, slot: Slot) -> None:
        """Give ``slot`` back (again: nothing happens). Never raises: a slot that Redis cannot
        take back now is logged, and expires within the TTL."""
        if slot.released:
            return
        slot.released = True
        self._count(slot.user_id, -1)
        if self._shared is not None:
            await self._shared.give_back(slot)

    def _count(self, user_id: str, delta: int) -> None:
        held = self._per_user.get(user_id, 0) + delta
        if held > 0:
            self._per_user[user_id] = held
        else:
            self._per_user.pop(user_id, None)
        self._total += delta


def _key(user_id: str) -> bytes:
    return KEY_PREFIX + user_id.encode()


#: A user id and the members this instance holds for it.
_Members = tuple[str, list[bytes]]


def _batches(items: Sequence[_Members]) -> Iterator[Sequence[_Members]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


class _SharedSlots:
    """The per-user counts in Redis: take, give back, and the heartbeat (see the module)."""

    def __init__(self, store: QuotaStore, max_per_user: int, ttl_seconds: float) -> None:
        assert store.redis is not None
        self._store = store
        self._max_per_user = max_per_user
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._beat_seconds = ttl_seconds / 4
        self._take = store.redis.register_script(TAKE)
        self._refresh = store.redis.register_script(REFRESH)
        #: The members this instance holds in Redis (taken, not yet given back): the heartbeat's.
        self._held: dict[bytes, str] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        #: Set while no refresh is in flight: one could put back a member given back meanwhile.
        self._no_refresh = asyncio.Event()
        self._no_refresh.set()
        self._warnings = {kind: Throttle() for kind in ("release", "refresh")}

    def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat_forever(), name="slot heartbeat")

    async def close(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def take(self, slot: Slot) -> bool:
        """Whether the user had a slot left here and in every other instance; it is now held.

        Raises:
            HandshakeRejected: 503 ``unavailable`` when the store fails.
        """
        args: list[bytes | int] = [slot.member, self._max_per_user, self._ttl_ms]
        try:
            taken = await self._store.call(lambda: self._take([_key(slot.user_id)], args))
        except StoreUnavailable:
            raise store_unavailable() from None
        if taken:
            self._held[slot.member] = slot.user_id
        return bool(taken)

    async def give_back(self, slot: Slot) -> None:
        """Remove ``slot``'s member; logged, never raised, when the store fails."""
        if self._held.pop(slot.member, None) is None:
            return
        assert self._store.redis is not None
        redis = self._store.redis
        try:
            await self._no_refresh.wait()  # so that no refresh re-adds it after the ZREM
            await self._store.call(lambda: redis.zrem(_key(slot.user_id), slot.member))
        except StoreUnavailable as error:
            self._warn("release", "a connection slot is left to expire", error)
        except Exception:
            log.exception("giving back a connection slot failed")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._beat_seconds)
            try:
                await self.refresh()
            except StoreUnavailable as error:
                self._warn("refresh", "connection slots not refreshed", error)
            except Exception:
                log.exception("connection slot heartbeat failed")

    async def refresh(self) -> None:
        """Push back the expiry of every member this instance holds (re-adding lost ones).

        Raises:
            StoreUnavailable: the store failed (the next beat tries again).
        """
        users: defaultdict[str, list[bytes]] = defaultdict(list)
        for member, user_id in self._held.items():
            users[user_id].append(member)
        self._no_refresh.clear()
        try:
            for batch in _batches(sorted(users.items())):
                await self._store.call(functools.partial(self._refresh_batch, batch))
        finally:
            self._no_refresh.set()

    async def _refresh_batch(self, batch: Sequence[_Members]) -> None:
        assert self._store.redis is not None
        async with self._store.redis.pipeline(transaction=False) as pipe:
            for user_id, members in batch:
                await self._refresh([_key(user_id)], [self._ttl_ms, *members], client=pipe)
            await pipe.execute()

    def _warn(self, kind: str, message: str, error: StoreUnavailable) -> None:
        """Log ``message`` at most once a minute per ``kind`` (the store is down: it could
        come per connection)."""
        if self._warnings[kind].allow():
            log.warning(message, extra={"error": str(error)})
