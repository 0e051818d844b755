"""Quotas shared by connections, and by instances: the store, attempts per address, messages per
user.

- :class:`QuotaStore` is where they live, chosen by ``GATEWAY_RATELIMIT_STORAGE_URL``:
  ``memory://`` (this process) or a Redis that every instance shares. It decides how long a
  call may take and what a failure is (see the class).
- :class:`ConnectAttemptLimiter` limits connection attempts per client address
  (:func:`address_key`), through ``limits`` (moving window). A store that fails refuses: 503.
- :class:`UserMessageQuota` limits the messages of one user over all its connections, through
  ``limits`` (sliding window counter). A store that fails lets the message through.

The open connections per user, kept in the same store, are :mod:`gateway.slots`.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from gateway.errors import HandshakeRejected
from gateway.settings import parse_rate

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool, Redis

__all__ = [
    "LOG_EVERY_SECONDS",
    "MAX_CALLS",
    "RETRY_AFTER_SECONDS",
    "RETRY_SECONDS",
    "STORAGE_TIMEOUT_SECONDS",
    "SWEEP_SECONDS",
    "ConnectAttemptLimiter",
    "QuotaStore",
    "StoreUnavailable",
    "Throttle",
    "UserMessageQuota",
    "address_key",
    "store_unavailable",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a client is told to wait when the server is full or its quota store is unreachable.
RETRY_AFTER_SECONDS = 5
#: The Redis pool's ``socket_connect_timeout`` and ``socket_timeout``: how long Redis may stay
#: silent on one connection before the call counts as failed.
STORAGE_TIMEOUT_SECONDS = 2.0
#: Calls to Redis in flight at once (and connections in the pool); more wait for their turn.
MAX_CALLS = 64
#: After a failure, calls fail at once for this long; then the next one tries Redis again.
RETRY_SECONDS = 1.0
#: ``memory://`` sweeps expired entries at most this often.
SWEEP_SECONDS = 1.0
#: A failing store is logged at most this often (per kind of call).
LOG_EVERY_SECONDS = 60.0


class StoreUnavailable(Exception):
    """The quota store did not answer (Redis down, unreachable, or failing just now)."""


def store_unavailable() -> HandshakeRejected:
    """The refusal of an upgrade that the store could not decide: 503 with ``Retry-After``."""
    return HandshakeRejected(
        503,
        "unavailable",
        "the connection quota store is unavailable, try again later",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class _SweptMemoryStorage(MemoryStorage):
    """``limits``' in-process storage, swept of expired entries in place, at most every
    :data:`SWEEP_SECONDS`, instead of by a task after nearly every hit.

    ``limits`` starts a sweep task whenever the last one has finished (once per loop turn
    under load) and the sweep visits every key: work per message that grows with the users.
    Worse, it holds each moving-window key's lock across a thread hop, and every hit on that
    key queues behind it, one loop turn each: under a burst of handshakes on a busy loop the
    attempts of one address waited seconds for each other. Reads ignore expired entries
    anyway, so a sweep only frees memory; this one never awaits, so no hit ever waits for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._next_sweep = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:  # limits' private hook
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            self._sweep()

    def _sweep(self) -> None:
        """Drop the expired entries, as ``limits``' own sweep does, in one go."""
        now = time.time()
        for key, entries in list(self.events.items()):
            # Newest first: the entries still alive are a prefix.
            alive = bisect.bisect_left(entries, -now, key=lambda entry: -entry.expiry)
            if alive:
                self.events[key] = entries[:alive]
            else:
                del self.events[key]
                self.locks.pop(key, None)
        for key, expiry in list(self.expirations.items()):
            if expiry <= now:
                self.storage.pop(key, None)
                del self.expirations[key]
                self.locks.pop(key, None)


class QuotaStore:
    """Where the shared quotas live: ``memory://`` (this process) or a shared Redis.

    **Memory.** ``limits``' in-process storage (:class:`_SweptMemoryStorage`). Its calls do no
    I/O and never wait, so :meth:`call` awaits them as they are: no deadline, no task. A
    deadline there would measure only how busy the event loop is: under a burst of handshakes
    on a busy loop, a 2-second one refused a tenth to half of them with 503 ``unavailable``.

    **Redis** (``redis://``, ``rediss://`` verified against ``ca_file``). One redis-py pool
    shared by ``limits`` and :mod:`gateway.slots`, whose every wait is a socket wait bounded by
    ``socket_connect_timeout`` and ``socket_timeout`` (:data:`STORAGE_TIMEOUT_SECONDS`):
    connecting (TLS included), then each reply. A command is retried once on a new connection
    when its connection was lost (a pooled one dies with a Redis that restarted), never after
    a timeout, so a call that Redis does not answer fails within a few of those timeouts.
    There is no outer deadline (``asyncio.timeout``) around a call, on purpose: it would count
    the time the loop spent on other work. A socket timeout trips only when Redis itself stayed
    silent that long, since a reply that has arrived is read on the loop's next turn, however
    busy the loop is.

    At most :data:`MAX_CALLS` calls run at once, each on its own connection (the pool never
    grows past them); the others wait for a turn without a deadline, since every call ahead
    of them is bounded. A failure marks the store down for :data:`RETRY_SECONDS`: meanwhile
    every call fails at once, the queued ones included, so an outage costs one timeout and
    not one per queued call. The first call after that tries Redis again.

    Args:
        url: ``memory://``, or ``redis://`` / ``rediss://`` (needs :pypi:`redis`).
        ca_file: the CA bundle ``rediss://`` servers are verified against (else the system's).

    Raises:
        ValueError: on another scheme, or a Redis URL that cannot be used. The URL is never
            repeated: it may carry a password.
    """

    def __init__(self, url: str, *, ca_file: Path | None = None) -> None:
        scheme = urlsplit(url).scheme
        self.storage: Storage
        #: The Redis client for commands of our own (:mod:`gateway.slots`); None in memory.
        self.redis: Redis | None = None
        self._pool: ConnectionPool | None = None
        self._turns = asyncio.Semaphore(MAX_CALLS)
        self._down_until = 0.0
        #: What a failing Redis raises (nothing can fail in memory).
        self._failures: tuple[type[BaseException], ...] = ()
        if scheme == "memory":
            self.storage = _SweptMemoryStorage()
        elif scheme in ("redis", "rediss"):
            self.storage = self._connect(url, scheme, ca_file)
        else:
            raise ValueError(
                f"rate-limit storage must be memory:// or redis://, not {scheme or '(none)'}://"
            )

    def _connect(self, url: str, scheme: str, ca_file: Path | None) -> Storage:
        # The optional dependency, imported only when used.
        from redis.asyncio import ConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as LostConnection
        from redis.exceptions import RedisError

        options: dict[str, Any] = {
            "max_connections": MAX_CALLS,
            "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
            "socket_timeout": STORAGE_TIMEOUT_SECONDS,
            # One retry, on a new connection, for a connection lost: a pooled one may have
            # died with a Redis that restarted. A timeout is final.
            "retry": Retry(NoBackoff(), 1, supported_errors=(LostConnection,)),
        }
        if scheme == "rediss" and ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
        try:
            self._pool = ConnectionPool.from_url(url, **options)
        except (ValueError, TypeError):
            raise ValueError("GATEWAY_RATELIMIT_STORAGE_URL cannot be used") from None
        self.redis = Redis(connection_pool=self._pool)
        self._failures = (StorageError, RedisError, OSError, TimeoutError)
        return RedisStorage(
            url,
            wrap_exceptions=True,
            implementation="redispy",  # redis-py's asyncio client, not coredis
            connection_pool=self._pool,  # type: ignore[arg-type]
        )

    async def call(self, command: Callable[[], Awaitable[T]]) -> T:
        """Await ``command()``, a few calls to the store, under the rules above.

        Raises:
            StoreUnavailable: the store failed, or failed less than :data:`RETRY_SECONDS` ago.
        """
        if self._pool is None:
            return await command()
        async with self._turns:
            if time.monotonic() < self._down_until:
                raise StoreUnavailable("the quota store failed just now")
            try:
                return await command()
            except self._failures as error:
                self._down_until = time.monotonic() + RETRY_SECONDS
                raise StoreUnavailable(type(error).__name__) from None

    async def healthy(self) -> bool:
        """Whether the store answers (a Redis ``PING``)."""
        try:
            return await self.call(self.storage.check)
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        """Release the store: close the Redis pool."""
        if self._pool is not None:
            await self._pool.aclose()


class Throttle:
    """Says yes at most once per ``every`` seconds: for log lines that could come per call."""

    __slots__ = ("_every", "_next")

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        self._every = every
        self._next = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._every
        return True


def address_key(address: str) -> str:
    """The rate-limit key of a client address.

    One IPv6 client usually owns a whole /64 (RFC 4291 section 2.5.4, RFC 6177), so keying
    on the full address would give it 2**64 quotas: IPv6 addresses are keyed by their /64.
    IPv4-mapped IPv6 addresses are keyed as the IPv4 address. Anything that is not an IP
    address (a Unix socket, an empty peer) is returned unchanged.
    """
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectAttemptLimiter:
    """Connection attempts per client address, through ``limits`` (moving window).

    The moving window gives an exact ``Retry-After`` and no double burst at window edges; it
    keeps at most ``amount`` timestamps per key.

    The store failing (Redis down) fails closed: the attempt is refused with 503, since a
    gateway scaled out over Redis cannot serve without it anyway.

    Args:
        rate: in ``limits`` notation, like ``"30/minute"``: one limit, amount >= 1.
        store: where the attempts are counted.

    Raises:
        ValueError: on a rate :func:`~gateway.settings.parse_rate` refuses.
    """

    def __init__(self, rate: str, store: QuotaStore) -> None:
        self._item = parse_rate(rate)
        self._store = store
        self._limiter = MovingWindowRateLimiter(store.storage)

    async def hit(self, key: str) -> float | None:
        """Count one attempt from ``key`` (see :func:`address_key`).

        Returns:
            None when allowed; otherwise the whole seconds to wait, >= 1, for ``Retry-After``
            (RFC 9110 section 10.2.3).

        Raises:
            HandshakeRejected: 503 with ``Retry-After`` when the store cannot be reached.
        """
        try:
            return await self._store.call(lambda: self._hit(key))
        except StoreUnavailable:
            raise store_unavailable() from None

    async def _hit(self, key: str) -> float | None:
        if await self._limiter.hit(self._item, "connect", key):
            return None
        stats = await self._limiter.get_window_stats(self._item, "connect", key)
        return float(max(1, math.ceil(stats.reset_time - time.time())))


class UserMessageQuota:
    """The messages of one user over all its connections (and instances, with Redis), through
    ``limits`` (sliding window counter: two counters per user, O(1) per message).

    The store failing fails open: the message goes through, under its connection's own token
    bucket still, and a warning is logged at most once per :data:`LOG_EVERY_SECONDS`. A chat
    should not stop because Redis blinked, and the per-connection limits bound the damage.
    With Redis down, a message waits for the store at most once per :data:`RETRY_SECONDS`
    (see :class:`QuotaStore`); with ``memory://`` nothing can fail, and nothing waits.

    Args:
        rate: in ``limits`` notation, like ``"10/second"``: one limit, amount >= 1.
        store: where the messages are counted.

    Raises:
        ValueError: on a rate :func:`~gateway.settings.parse_rate` refuses.
    """

    def __init__(self, rate: str, store: QuotaStore) -> None:
        self._item = parse_rate(rate)
        self._store = store
        self._limiter = SlidingWindowCounterRateLimiter(store.storage)
        self._warnings = Throttle()

    async def hit(self, user_id: str) -> float:
        """Count one message of ``user_id``.

        Returns:
            0.0 when it may go through (or the store failed); otherwise the seconds until the
            user may send again (> 0), and nothing was counted.
        """
        try:
            return await self._store.call(lambda: self._hit(user_id))
        except StoreUnavailable as error:
            if self._warnings.allow():
                log.warning(
                    "user message quota not enforced: the quota store is unavailable",
                    extra={"error": str(error)},
                )
            return 0.0

    async def _hit(self, user_id: str) -> float:
        if await self._limiter.hit(self._item, "message", user_id):
            return 0.0
        stats = await self._limiter.get_window_stats(self._item, "message", user_id)
        return max(0.001, stats.reset_time - time.time())
