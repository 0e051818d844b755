"""The Redis broker: instances sharing one Redis behave as one gateway (``redis://``,
``rediss://``).

**Fan-out.** Each room has one pub/sub channel (:func:`gateway.broker.wire.channel`). This
instance subscribes to the rooms the hub asks for (those with local members), on one dedicated
pub/sub connection read by one listener task, which hands each envelope to ``deliver`` in the
order Redis published them. Every envelope is serialized and signed once per publish
(:mod:`gateway.broker.wire`: HMAC-SHA256 with the broker secret, a nonce, a timestamp); what
fails the checks is dropped, counted by reason, and logged at most once per
:data:`LOG_EVERY_SECONDS` per reason.

**One order per room.** :meth:`RedisBroker.publish_numbered` runs one Lua script that takes
the room's next id and publishes (:data:`gateway.broker.scripts.PUBLISH_NUMBERED`), so Redis
publishes a room's numbered envelopes in id order and every instance delivers them so; a
receiver also drops (``number``) an id not above the last it delivered for the room while
subscribed. Ids grow by one per message while Redis keeps the counter; a new counter (new
room, Redis restarted empty) starts from Redis's clock in microseconds, so ids never go back.

**Presence.** Each connection present is an entry owned by this instance (a random id drawn at
start) and expires :attr:`Settings.presence_ttl_seconds` after its last refresh
(:mod:`gateway.broker.scripts`). A heartbeat every TTL/4 refreshes this instance's entries,
re-creating any that are missing (Redis restarted empty) without announcing joins, then prunes
the expired entries of the rooms this instance subscribes to: each user whose last entry a
prune removed leaves through ``member_left``; the prune is one script, so only one instance
gets each user. :meth:`RedisBroker.members` prunes first too, and so do
:meth:`RedisBroker.members_page` and :meth:`RedisBroker.room_update`, which cost Redis O(limit)
whatever the room's size (a count and a random page; the count last told is a key of the room).

**Outages.** Every command is bounded (:data:`COMMAND_TIMEOUT_SECONDS`), and while the listener
knows Redis is unreachable, calls raise :class:`~gateway.errors.BrokerUnavailable` at once.
The listener reconnects with capped exponential backoff and full jitter
(:data:`BACKOFF_BASE_SECONDS` doubling up to :data:`BACKOFF_CAP_SECONDS`), resubscribes every
room wanted, runs a heartbeat at once (presence entries restored), and reports the reconnect;
all within a few seconds of Redis answering again. Local state is bounded by what is live: the
rooms wanted and this instance's connections.

A subscribe that cannot be made now raises and is forgotten (the hub then holds nothing for
the room, and the join is refused as retryable). An unsubscribe never raises: the wish is
forgotten at once, and a reconnect does not subscribe it again.

**Clocks.** A message stamped more than :data:`~gateway.broker.wire.WINDOW_BACK_MS` before, or
:data:`~gateway.broker.wire.WINDOW_AHEAD_MS` after, the receiver's clock is dropped as
``stale``: instances' clocks must agree within a few seconds (NTP). Presence expiries and the
id floor use Redis's clock only.

Redis is expected to keep the keys it is given: ``maxmemory-policy noeviction`` (every key
here has an expiry, so a ``volatile-*`` policy could evict presence halfway).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.broker import scripts
from gateway.broker.base import (
    Broker,
    BrokerObserver,
    Deliver,
    Envelope,
    Member,
    MemberLeft,
    MemberPage,
    Once,
    RoomUpdate,
)
from gateway.broker.wire import Opener, Rejected, Sealer, channel, room_of_channel
from gateway.errors import BrokerUnavailable
from gateway.history import Entry, Recovery, SinceError, recover
from gateway.settings import Settings, redact_url

__all__ = [
    "BACKOFF_BASE_SECONDS",
    "BACKOFF_CAP_SECONDS",
    "COMMAND_TIMEOUT_SECONDS",
    "HEALTH_TIMEOUT_SECONDS",
    "LOG_EVERY_SECONDS",
    "RedisBroker",
]

audit_log = logging.getLogger("gateway.audit")
log = logging.getLogger(__name__)

#: Every command, and the socket's own timeouts: a call never waits longer for Redis.
COMMAND_TIMEOUT_SECONDS = 2.0
#: :meth:`RedisBroker.healthy` wants a PING answered within this.
HEALTH_TIMEOUT_SECONDS = 1.0
#: Reconnect delays: uniform in [0, min(cap, base * 2**attempt)] (full jitter).
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 2.0
#: A connection that lived this long starts the backoff over when it is lost.
_STABLE_SECONDS = 10.0
#: The listener waits this long for a message before it looks at the link's health.
_POLL_SECONDS = 0.5
#: Quiet this long, the listener PINGs; no answer within COMMAND_TIMEOUT_SECONDS, it reconnects.
_KEEPALIVE_SECONDS = 3.0
#: Connections for commands (the pub/sub connection is apart); callers past them wait.
_POOL_SIZE = 64
#: Rooms per SUBSCRIBE, and scripts per pipeline, when many are sent at once.
_BATCH = 500
#: Expired entries one prune forgets at most (the next heartbeat goes on).
_PRUNE_LIMIT = 500
#: The keys of a room's presence outlive its entries by this factor of the TTL.
_KEY_TTL_FACTOR = 3
#: An id counter nobody increments for this long is dropped (the next id is then time-based).
_COUNTER_TTL_MS = 30 * 24 * 3600 * 1000
#: What close() spends at most on removing this instance's presence.
_CLOSE_SECONDS = 3.0
#: A log line of one kind at most this often (the lines skipped are counted in the next).
LOG_EVERY_SECONDS = 10.0
#: The listener lets other tasks run after this many messages in a row.
_YIELD_EVERY = 100

#: What a failing Redis raises; all become BrokerUnavailable.
_FAILURES = (RedisError, OSError, TimeoutError)

T = TypeVar("T")


def _encode(text: str) -> bytes:
    # Token claims may hold lone surrogates: carry them through Redis as they are.
    return text.encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # not written by us
        return data.decode("utf-8", "replace")


def _members(flat: Sequence[bytes]) -> list[Member]:
    """Members from a script's ``user, name, user, name ...``."""
    return [Member(_decode(flat[i]), _decode(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def _by_id(flat: Sequence[bytes]) -> tuple[Member, ...]:
    """Members from a script's ``user, name ...``, sorted by id."""
    return tuple(sorted(_members(flat), key=lambda member: member.id))


def _batches(items: Sequence[T], size: int = _BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _NoObserver:
    def broker_published(self, seconds: float) -> None: ...

    def broker_received(self) -> None: ...

    def broker_dropped(self, reason: str) -> None: ...

    def broker_reconnected(self) -> None: ...


class _Throttle:
    """Allows one log line per kind every ``every`` seconds and counts the others."""

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        self._every = every
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        """None to skip this line; else how many lines of ``kind`` were skipped before it."""
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return None
        self._next[kind] = now + self._every
        return self._skipped.pop(kind, 0)


class _Gate:
    """Presence calls run together, the heartbeat's refresh alone: so the refresh, which
    re-creates entries it finds missing, never re-creates one a concurrent removal just took
    away. Waiting refreshes go first; their holder is one task at a time."""

    def __init__(self) -> None:
        self._shared = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._exclusive = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while not self._open.is_set():
            await self._open.wait()
        self._shared += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._shared -= 1
            if self._shared == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._exclusive:
            self._open.clear()
            try:
                while self._shared:
                    await self._idle.wait()
                yield
            finally:
                self._open.set()


class _LinkLost(Exception):
    """The pub/sub connection is to be dropped (the reason is the message)."""


class _Link:
    """One pub/sub connection and what was asked of it."""

    def __init__(self, pubsub: PubSub) -> None:
        self.pubsub = pubsub
        #: Subscribed to everything wanted: calls may be served.
        self.live = False
        #: Set (to why) when this connection must not be used any more.
        self.lost: str | None = None
        #: Channels subscribed on connecting, not confirmed yet, and by when the next
        #: confirmation must come (the deadline moves with each one: many rooms take longer).
        self.restoring: set[bytes] = set()
        self.restore_by = 0.0
        #: Rooms whose subscription Redis confirmed on this connection (and still wanted).
        self.active: set[str] = set()
        #: Subscribes waiting for Redis's confirmation: True when it came, False when lost.
        self.confirm: dict[bytes, asyncio.Future[bool]] = {}


class RedisBroker(Broker):
    """See the module's text.

    Args:
        settings: ``broker_url`` (``redis://`` or ``rediss://``, verified against
            ``redis_ca_file`` when set), ``broker_secret`` (required: it signs envelopes),
            ``presence_ttl_seconds``.
        observer: told of publishes, receipts, drops and reconnects.

    Raises:
        ValueError: when there is no broker secret or the URL cannot be used (the URL itself,
            which may carry a password, is never repeated).
    """

    def __init__(self, settings: Settings, observer: BrokerObserver | None = None) -> None:
        if settings.broker_secret is None:
            raise ValueError("the redis broker needs GATEWAY_BROKER_SECRET")
        self._url = redact_url(settings.broker_url)
        self._observer: BrokerObserver = observer or _NoObserver()
        self._instance = secrets.token_bytes(16)
        self._instance_name = self._instance.hex().encode()
        key = settings.broker_secret.get().encode()
        self._sealer = Sealer(key, self._instance)
        self._opener = Opener(key)
        self._ttl_ms = round(settings.presence_ttl_seconds * 1000)
        self._key_ttl_ms = self._ttl_ms * _KEY_TTL_FACTOR
        self._beat_seconds = settings.presence_ttl_seconds / 4
        options: dict[str, Any] = {
            "socket_timeout": COMMAND_TIMEOUT_SECONDS,
            "socket_connect_timeout": COMMAND_TIMEOUT_SECONDS,
            # No retries inside redis-py: a call fails at once, the listener reconnects.
            "retry": Retry(NoBackoff(), 0, supported_errors=()),
        }
        if settings.broker_url.startswith("rediss:") and settings.redis_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.redis_ca_file)
        try:
            pool = BlockingConnectionPool.from_url(
                settings.broker_url,
                max_connections=_POOL_SIZE,
                timeout=COMMAND_TIMEOUT_SECONDS,
                **options,
            )
            self._pubsub_pool = ConnectionPool.from_url(settings.broker_url, **options)
        except (ValueError, TypeError):
            raise ValueError(f"GATEWAY_BROKER_URL={self._url} cannot be used") from None
        secrets_in_url = (pool.connection_kwargs.get(k) for k in ("password", "username"))
        self._secrets = [s for s in secrets_in_url if isinstance(s, str) and s]
        self._client = Redis(connection_pool=pool)
        self._publish_numbered = self._client.register_script(scripts.PUBLISH_NUMBERED)
        self._history_read = self._client.register_script(scripts.HISTORY_READ)
        self._history_size = settings.history_size
        self._history_ttl_ms = settings.history_ttl_seconds * 1000
        self._add = self._client.register_script(scripts.PRESENCE_ADD)
        self._remove = self._client.register_script(scripts.PRESENCE_REMOVE)
        self._prune = self._client.register_script(scripts.PRESENCE_PRUNE)
        self._page = self._client.register_script(scripts.MEMBERS_PAGE)
        self._room_update = self._client.register_script(scripts.ROOM_UPDATE)
        self._room_publish = self._client.register_script(scripts.ROOM_PUBLISH)

        self._deliver: Deliver | None = None
        self._member_left: MemberLeft | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._link: _Link | None = None
        self._tried = asyncio.Event()  # the first connection attempt is over
        self._ever_live = False
        self._beat_now = asyncio.Event()
        #: Rooms the hub wants, connected or not; the last id delivered per room.
        self._wanted: set[str] = set()
        self._last_ids: dict[str, int] = {}
        #: SUBSCRIBE and UNSUBSCRIBE are decided and sent under it: sent in the order decided.
        self._sub_lock = asyncio.Lock()
        #: This instance's presence: room -> (user id, connection id) -> member.
        self._local: dict[str, dict[tuple[str, str], Member]] = {}
        self._gate = _Gate()
        self._throttle = _Throttle()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, deliver: Deliver, member_left: MemberLeft | None = None) -> None:
        """Start the listener and the heartbeat, and wait (boundedly) for a first connection.

        Redis unreachable at start is not an error: calls raise BrokerUnavailable until the
        listener connects.

        Raises:
            RuntimeError: when started before.
        """
        if self._deliver is not None or self._closing:
            raise RuntimeError("the broker is already started")
        self._deliver = deliver
        self._member_left = member_left
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis-broker-listener"),
            asyncio.create_task(self._heartbeat(), name="redis-broker-heartbeat"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS * 2):
                await self._tried.wait()

    async def close(self) -> None:
        """Stop; remove this instance's presence entries (announcing the users that leave with
        them) when Redis answers, within a bounded time; close the connections. Safe twice."""
        if self._closing:
            return
        self._closing = True
        listener, heartbeat = self._tasks or (None, None)
        await _cancel(heartbeat)
        if self._local and self._live:
            try:
                async with asyncio.timeout(_CLOSE_SECONDS):
                    await self._remove_own_presence()
            except (BrokerUnavailable, TimeoutError):
                log.warning("presence of this instance left to expire", extra=self._where())
        self._local.clear()
        await _cancel(listener)
        link, self._link = self._link, None
        if link is not None:
            await self._drop(link, "closing")
        self._deliver = None
        self._wanted.clear()
        self._last_ids.clear()
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                await self._client.aclose()
                await self._client.connection_pool.disconnect()
                await self._pubsub_pool.disconnect()

    async def _remove_own_presence(self) -> None:
        async with self._gate.exclusive():
            for room, entries in list(self._local.items()):
                keys = scripts.presence_keys(room)
                for batch in _batches(list(entries)):
                    gone = await self._run(
                        "remove presence", self._remove(keys=keys, args=self._remove_args(batch))
                    )
                    await self._announce_left(room, _members(gone))

    @property
    def _live(self) -> bool:
        link = self._link
        return link is not None and link.live

    async def healthy(self) -> bool:
        """True when connected and Redis answers a PING within :data:`HEALTH_TIMEOUT_SECONDS`."""
        if self._deliver is None or self._closing or not self._live:
            return False
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
                return bool(await self._client.ping())
        except _FAILURES:
            return False

    # --- commands -------------------------------------------------------------------------

    def _check_started(self) -> None:
        if self._deliver is None:
            raise RuntimeError("the broker is not started")

    async def _run(self, what: str, command: Awaitable[T]) -> T:
        """Await ``command`` (a call to Redis not yet started), failing fast while Redis is
        known unreachable.

        Raises:
            RuntimeError: when the broker is not started (or closed).
            BrokerUnavailable: when Redis cannot do it now (within
                :data:`COMMAND_TIMEOUT_SECONDS`).
        """
        if not self._live or self._deliver is None:
            if inspect.iscoroutine(command):
                command.close()  # never started: nothing was sent
            self._check_started()
            raise BrokerUnavailable("Redis is not reachable just now")
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                return await command
        except _FAILURES as error:
            self._warn(what, f"Redis failed to {what}", error)
            raise BrokerUnavailable(f"Redis failed to {what}") from None

    async def publish(self, envelope: Envelope) -> None:
        """See :meth:`Broker.publish`.

        Raises:
            BrokerUnavailable: when Redis cannot be reached; the envelope was not published
                (unless the answer alone was lost).
            ValueError: when the envelope cannot be encoded (a lone surrogate).
        """
        data = self._sealer.seal(envelope)
        name = channel(envelope.room)
        started = time.perf_counter()
        await self._run("publish", self._client.publish(name, data))
        self._observer.broker_published(time.perf_counter() - started)

    async def publish_numbered(self, envelope: Envelope) -> int:
        """See :meth:`Broker.publish_numbered`: one script takes the id and publishes.

        Raises:
            BrokerUnavailable: as :meth:`publish`.
            ValueError: as :meth:`publish`, or when the envelope takes no id.
        """
        number, _ = await self._publish_script(envelope, None)
        return number

    async def publish_numbered_once(self, envelope: Envelope, once: Once) -> tuple[int, int | None]:
        """See :meth:`Broker.publish_numbered_once`: the key lives in Redis, so the check holds
        across instances, in the same script as the numbering.

        Raises:
            BrokerUnavailable: as :meth:`publish`.
            ValueError: as :meth:`publish_numbered`.
        """
        return await self._publish_script(envelope, once)

    async def _publish_script(
        self, envelope: Envelope, once: Once | None
    ) -> tuple[int, int | None]:
        if not envelope.to_number:
            raise ValueError("this envelope takes no id")
        data = self._sealer.seal(envelope)
        room = envelope.room
        keys: list[str | bytes] = [scripts.counter_key(room), scripts.history_key(room)]
        args: list[bytes | int] = [
            channel(room),
            data,
            _COUNTER_TTL_MS,
            self._history_size,
            self._history_ttl_ms,
        ]
        if once is not None:
            keys.append(scripts.once_key(room, once.key))
            args += [max(1, int(once.seconds * 1000)), once.stamp]
        started = time.perf_counter()
        answer = await self._run("publish", self._publish_numbered(keys=keys, args=args))
        self._observer.broker_published(time.perf_counter() - started)
        if isinstance(answer, bytes):  # the key existed: a duplicate, nothing published
            number, _, stamp = answer.partition(b":")
            return int(number), int(stamp)
        return int(answer), None

    async def history(self, room: str, since: int | None, limit: int) -> Recovery | SinceError:
        """See :meth:`Broker.history`: one script reads the room's counter and history stream
        together; each entry's envelope is checked as on the wire, but for freshness (it was
        when it was published). An entry that fails the check is left out, and counted as a
        drop, so the recovery is then incomplete, never forged.

        Raises:
            BrokerUnavailable: when Redis cannot be reached.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit!r}")
        channel(room)  # a room name, or ValueError
        keys = [scripts.counter_key(room), scripts.history_key(room)]
        now_ms, last, stream = await self._run("read history", self._history_read(keys=keys))
        last_id = int(last)
        horizon = int(now_ms) - self._history_ttl_ms
        entries: list[Entry] = []
        for _stream_id, flat in stream:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            try:
                number, at = int(fields[b"id"]), int(fields[b"at"])
                if at < horizon:
                    continue
                envelope = self._opener.open_stored(room, fields[b"data"], number)
            except (KeyError, ValueError):
                self._observer.broker_dropped("malformed")
                continue
            except Rejected as rejected:
                self._observer.broker_dropped(rejected.reason)
                continue
            entries.append(Entry(number, envelope.payload, at / 1000))
        if since is not None:
            return recover(entries, since, limit, last_id)
        return Recovery(tuple(entries[-limit:]), True, entries[0].id if entries else None, last_id)

    def _entry(self, user_id: str, conn_id: str) -> bytes:
        return scripts.conn_entry(_encode(user_id), self._instance_name, _encode(conn_id))

    def _add_args(
        self, mode: bytes, entries: Iterable[tuple[tuple[str, str], Member]]
    ) -> list[Any]:
        args: list[Any] = [self._ttl_ms, self._key_ttl_ms, mode]
        for (user_id, conn_id), member in entries:
            args += [_encode(user_id), _encode(member.name), self._entry(user_id, conn_id)]
        return args

    def _remove_args(self, entries: Iterable[tuple[str, str]]) -> list[bytes]:
        args: list[bytes] = []
        for user_id, conn_id in entries:
            args += [_encode(user_id), self._entry(user_id, conn_id)]
        return args

    async def presence_add(self, room: str, member: Member, conn_id: str) -> bool:
        """See :meth:`Broker.presence_add`: True when the user had no connection in the room
        on any instance.

        Raises:
            BrokerUnavailable: when Redis cannot be reached; nothing was recorded (unless the
                answer alone was lost: the entry then expires with no heartbeat to refresh it).
        """
        channel(room)  # a room name, or ValueError
        entry = ((member.id, conn_id), member)
        async with self._gate.shared():
            firsts = await self._run(
                "record presence",
                self._add(keys=scripts.presence_keys(room), args=self._add_args(b"add", [entry])),
            )
            self._local.setdefault(room, {})[member.id, conn_id] = member
        return bool(firsts[0])

    async def presence_remove(self, room: str, user_id: str, conn_id: str) -> bool:
        """See :meth:`Broker.presence_remove`. The heartbeat stops refreshing the entry
        first, so when Redis cannot be reached it expires and is pruned (announced) later.

        Raises:
            BrokerUnavailable: when Redis cannot be reached.
        """
        channel(room)
        async with self._gate.shared():
            entries = self._local.get(room)
            if entries is not None:
                entries.pop((user_id, conn_id), None)
                if not entries:
                    del self._local[room]
            gone = await self._run(
                "remove presence",
                self._remove(
                    keys=scripts.presence_keys(room),
                    args=self._remove_args([(user_id, conn_id)]),
                ),
            )
        return bool(gone)

    async def members(self, room: str) -> list[Member]:
        """See :meth:`Broker.members`: over every instance, expired entries pruned first
        (their users leave through ``member_left``).

        Raises:
            BrokerUnavailable: when Redis cannot be reached.
        """
        channel(room)
        gone, names = await self._run(
            "list members",
            self._prune(keys=scripts.presence_keys(room), args=[_PRUNE_LIMIT, b"list"]),
        )
        await self._announce_left(room, _members(gone))
        return sorted(_members(names), key=lambda member: member.id)

    async def members_page(self, room: str, limit: int) -> MemberPage:
        """See :meth:`Broker.members_page`: in a large room, ``limit`` users at random
        (``HRANDFIELD``); expired entries pruned first, as :meth:`members` does.

        Raises:
            BrokerUnavailable: when Redis cannot be reached.
            ValueError: when ``limit`` is below 1.
        """
        channel(room)
        if limit < 1:
            raise ValueError("a page holds at least one member")
        gone, count, names = await self._run(
            "list members",
            self._page(keys=scripts.presence_keys(room), args=[_PRUNE_LIMIT, limit]),
        )
        await self._announce_left(room, _members(gone))
        return MemberPage(_by_id(names), int(count))

    async def member_count(self, room: str) -> int:
        """See :meth:`Broker.member_count` (``HLEN``; expired entries count until pruned).

        Raises:
            BrokerUnavailable: when Redis cannot be reached.
        """
        channel(room)
        users = scripts.presence_keys(room)[1]
        return int(await self._run("count members", self._client.hlen(users)))

    async def room_update(self, room: str, limit: int) -> RoomUpdate | None:
        """See :meth:`Broker.room_update`; expired entries pruned first.

        Raises:
            BrokerUnavailable: when Redis cannot be reached.
        """
        channel(room)
        gone, count, kind, *names = await self._run(
            "update a room",
            self._room_update(keys=scripts.presence_keys(room), args=[_PRUNE_LIMIT, limit]),
        )
        await self._announce_left(room, _members(gone))
        if kind == 1:
            return RoomUpdate(int(count))
        if kind == 2:
            return RoomUpdate(int(count), _by_id(names[0]))
        return None

    async def publish_room_update(self, room: str, update: RoomUpdate, envelope: Envelope) -> bool:
        """See :meth:`Broker.publish_room_update`: one script checks, records and publishes,
        so Redis publishes a room's updates in the order of the changes they tell.

        Raises:
            BrokerUnavailable: as :meth:`publish`.
            ValueError: as :meth:`publish`.
        """
        data = self._sealer.seal(envelope)
        name = channel(room)
        kind = 1 if update.members is None else 2
        started = time.perf_counter()
        published = await self._run(
            "publish",
            self._room_publish(
                keys=scripts.presence_keys(room),
                args=[kind, update.member_count, name, data, self._key_ttl_ms],
            ),
        )
        if published:
            self._observer.broker_published(time.perf_counter() - started)
        return bool(published)

    async def _announce_left(self, room: str, gone: list[Member]) -> None:
        """Users a prune or close removed for good leave through ``member_left``."""
        member_left = self._member_left
        if member_left is None:
            return
        for member in gone:
            try:
                await member_left(room, member)
            except Exception as error:
                self._warn("member_left", "a leave could not be announced", error)

    # --- subscriptions --------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        """See :meth:`Broker.subscribe`: returns once Redis confirmed the subscription.

        Raises:
            BrokerUnavailable: when Redis cannot be reached or does not confirm within
                :data:`COMMAND_TIMEOUT_SECONDS`; the room is then not wanted (a reconnect will
                not subscribe it).
            ValueError: when ``room`` is not a room name.
        """
        self._check_started()
        name = channel(room)
        if room in self._wanted:
            return
        link = self._link
        if link is None or not link.live:
            raise BrokerUnavailable("Redis is not reachable just now")
        confirmed = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                async with self._sub_lock:
                    if link.lost is not None:
                        raise BrokerUnavailable("Redis is not reachable just now")
                    self._wanted.add(room)
                    link.confirm[name] = confirmed
                    await link.pubsub.subscribe(name)
                if not await confirmed:
                    raise BrokerUnavailable("Redis is not reachable just now")
        except BaseException as error:
            self._wanted.discard(room)
            link.active.discard(room)
            if link.confirm.get(name) is confirmed:
                del link.confirm[name]
            if isinstance(error, _FAILURES):
                self._warn("subscribe", "Redis did not confirm a subscription", error)
                self._lose(link, "a subscription was not confirmed")
                raise BrokerUnavailable("Redis did not confirm the subscription") from None
            raise

    async def unsubscribe(self, room: str) -> None:
        """See :meth:`Broker.unsubscribe`: nothing more of the room is delivered from now on.
        Never raises for Redis: an UNSUBSCRIBE that fails drops the connection, and the
        reconnect subscribes only the rooms still wanted."""
        name = channel(room)
        if room not in self._wanted:
            return
        self._wanted.discard(room)
        self._last_ids.pop(room, None)
        link = self._link
        if link is None:
            return
        link.active.discard(room)
        if not link.live:
            return  # a subscription being restored is taken back when Redis confirms it
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                async with self._sub_lock:
                    if link.lost is None and room not in self._wanted:
                        await link.pubsub.unsubscribe(name)
        except _FAILURES as error:
            self._warn("unsubscribe", "Redis did not take an unsubscribe", error)
            self._lose(link, "an unsubscribe failed")

    # --- the listener ---------------------------------------------------------------------

    async def _listen(self) -> None:
        """Connect, serve, and when the connection is lost, reconnect: for ever."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            link = self._link = _Link(PubSub(self._pubsub_pool))
            try:
                await self._serve(link)
            except (_LinkLost, *_FAILURES) as error:
                self._warn("link", f"Redis at {self._url} is not reachable", error)
            finally:
                await self._drop(link, "connection lost")
                self._tried.set()
            if loop.time() - started >= _STABLE_SECONDS:
                attempt = 0
            attempt += 1
            ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            await asyncio.sleep(random.uniform(0, ceiling))  # noqa: S311 - jitter, not a secret

    async def _serve(self, link: _Link) -> None:
        """Connect ``link``, subscribe every room wanted, then read until it fails.

        Raises:
            _LinkLost: when it must be dropped; or what redis-py raises when it fails.
        """
        pubsub = link.pubsub
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            await pubsub.connect()  # type: ignore[no-untyped-call]  # redis-py: untyped
            async with self._sub_lock:
                names = [channel(room) for room in sorted(self._wanted)]
                link.restoring.update(names)
                for batch in _batches(names):
                    await pubsub.subscribe(*batch)
        link.restore_by = asyncio.get_running_loop().time() + COMMAND_TIMEOUT_SECONDS
        if not link.restoring:
            self._go_live(link)
        await self._read(link)

    def _go_live(self, link: _Link) -> None:
        link.live = True
        self._tried.set()
        self._beat_now.set()  # restore presence at once
        if self._ever_live:
            # Ids are compared within one connection's order; a Redis restarted with its clock
            # behind would otherwise silence every room until its ids caught up.
            self._last_ids.clear()
            self._observer.broker_reconnected()
            if self._throttle.allow("reconnected") is not None:
                log.info("reconnected to Redis", extra={"url": self._url})
        else:
            self._ever_live = True
            log.info("connected to Redis", extra={"url": self._url})

    async def _read(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        pubsub = link.pubsub
        heard = loop.time()
        pinged: float | None = None
        in_a_row = 0
        while True:
            if link.lost is not None:
                raise _LinkLost(link.lost)
            message = await pubsub.get_message(timeout=_POLL_SECONDS)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                stray = self._on_message(link, message, now)
                if stray is not None:
                    await self._unsubscribe_stray(link, stray)
                in_a_row += 1
                if in_a_row >= _YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)
            else:
                in_a_row = 0
            if not link.live and now > link.restore_by:
                raise _LinkLost("subscriptions were not confirmed in time")
            if pinged is not None and now - pinged > COMMAND_TIMEOUT_SECONDS:
                raise _LinkLost("no answer to PING")
            if pinged is None and now - heard > _KEEPALIVE_SECONDS:
                pinged = now
                async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                    await pubsub.ping()

    def _on_message(self, link: _Link, message: dict[str, Any], now: float) -> bytes | None:
        """Handle one message of the pub/sub connection, read at ``now`` (loop time).

        Returns:
            A channel that was subscribed though no longer wanted (to unsubscribe), or None.
        """
        kind, name = message["type"], message["channel"]
        if not isinstance(name, bytes):
            return None  # a pong
        room = room_of_channel(name)
        if kind == "message":
            if room is not None and room in link.active:
                self._receive(room, message["data"])
            return None
        if kind != "subscribe" or room is None:
            return None
        if name in link.restoring:
            link.restoring.discard(name)
            link.restore_by = now + COMMAND_TIMEOUT_SECONDS
        stray = None
        if room in self._wanted:
            link.active.add(room)
        else:
            stray = name
        confirmed = link.confirm.pop(name, None)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(room in self._wanted)
        if not link.live and not link.restoring:
            self._go_live(link)
        return stray

    async def _unsubscribe_stray(self, link: _Link, name: bytes) -> None:
        """A subscription confirmed after its subscribe gave up: take it back."""
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            async with self._sub_lock:
                room = room_of_channel(name)
                if link.lost is None and room not in self._wanted:
                    await link.pubsub.unsubscribe(name)

    def _receive(self, room: str, data: object) -> None:
        """Check one message of ``room``'s channel and deliver it, or drop and count it."""
        deliver = self._deliver
        if deliver is None:
            return
        try:
            if not isinstance(data, bytes):
                raise Rejected("malformed")
            envelope, number = self._opener.open(room, data)
            if number is not None:
                if number <= self._last_ids.get(room, 0):
                    raise Rejected("number")
                self._last_ids[room] = number
        except Rejected as rejected:
            self._observer.broker_dropped(rejected.reason)
            skipped = self._throttle.allow(f"drop:{rejected.reason}")
            if skipped is not None:  # a line of the audit trail (gateway.audit), throttled
                audit_log.warning(
                    "broker_message_dropped",
                    extra={"room": room, "reason": rejected.reason, "skipped": skipped},
                )
            return
        try:
            deliver(envelope)
        except Exception:
            log.exception("delivering to room %s failed", room)
            return
        self._observer.broker_received()

    def _lose(self, link: _Link, why: str) -> None:
        """Stop using ``link`` now; the listener drops it and reconnects."""
        if link.lost is None:
            link.lost = why
        link.live = False

    async def _drop(self, link: _Link, why: str) -> None:
        self._lose(link, why)
        if self._link is link:
            self._link = None
        link.active.clear()
        for confirmed in link.confirm.values():
            if not confirmed.done():
                confirmed.set_result(False)
        link.confirm.clear()
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                await link.pubsub.aclose()  # type: ignore[no-untyped-call]
                await self._pubsub_pool.disconnect()
        # The command connections went down with the link (a Redis restart closes them all):
        # forget them, or the first commands after the reconnect (the heartbeat that restores
        # presence among them) would fail on them one by one.
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                await self._client.connection_pool.disconnect()

    # --- the heartbeat --------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Every TTL/4, and at once after a reconnect: refresh, then prune."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._beat_seconds):
                    await self._beat_now.wait()
            self._beat_now.clear()
            if not self._live:
                continue
            try:
                await self._beat()
            except BrokerUnavailable:
                pass  # logged; the next beat tries again
            except Exception:
                log.exception("presence heartbeat failed")

    async def _beat(self) -> None:
        async with self._gate.exclusive():
            rooms = [(room, list(entries.items())) for room, entries in self._local.items()]
            for batch in _batches(rooms):
                await self._run("refresh presence", self._refresh(batch))
        subscribed = sorted(self._wanted)
        for rooms_batch in _batches(subscribed):
            prunes = [
                (self._prune, scripts.presence_keys(room), [_PRUNE_LIMIT, b"prune"])
                for room in rooms_batch
            ]
            results = await self._run("prune presence", self._pipeline(prunes))
            for room, (gone,) in zip(rooms_batch, results, strict=True):
                await self._announce_left(room, _members(gone))

    async def _refresh(
        self, rooms: Sequence[tuple[str, list[tuple[tuple[str, str], Member]]]]
    ) -> list[Any]:
        return await self._pipeline(
            (self._add, scripts.presence_keys(room), self._add_args(b"keep", batch))
            for room, entries in rooms
            for batch in _batches(entries)
        )

    async def _pipeline(
        self, calls: Iterable[tuple[AsyncScript, list[str], list[Any]]]
    ) -> list[Any]:
        """Run scripts in one round trip; their results in order.

        Raises:
            RedisError: the first error.
        """
        pipe: Pipeline
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return await pipe.execute()

    # --- logs -----------------------------------------------------------------------------

    def _where(self) -> dict[str, str]:
        return {"url": self._url, "instance": self._instance.hex()}

    def _warn(self, kind: str, message: str, error: BaseException) -> None:
        """Log ``message`` with what went wrong, at most once per :data:`LOG_EVERY_SECONDS`
        per ``kind``; a password or user name of the URL never shows."""
        skipped = self._throttle.allow(kind)
        if skipped is None:
            return
        detail = f"{type(error).__name__}: {error}"
        for secret in self._secrets:
            detail = detail.replace(secret, "***")
        log.warning(message, extra={**self._where(), "error": detail, "skipped": skipped})


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
