"""Rate limits: per connection (our own token bucket), per address (``limits``), open slots.

- :class:`TokenBucket` meters the frames of one connection. ``limits`` has no token-bucket
  strategy, and a connection's bucket never needs sharing, so it is a few lines of our own.
- :class:`ViolationWindow` counts abuse (invalid frames, rate-limited frames) in a sliding window;
  too many close the connection.
- :class:`Verdict` is what a connection's limits say of a frame the server handles without the
  app (a ping, a pong, a fragment): act on it, refuse it, or stop reading (the app closes).
- :class:`ConnectAttemptLimiter` limits connection attempts per client address through ``limits``
  (moving window), in memory or in Redis so that every instance shares the quota.
- :class:`ConnectionSlots` caps the connections open in this process, in total and per user.

Every clock is injectable, so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import limits
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from gateway.errors import HandshakeRejected

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool

__all__ = [
    "ConnectAttemptLimiter",
    "ConnectionSlots",
    "TokenBucket",
    "Verdict",
    "ViolationWindow",
    "address_key",
]

Clock = Callable[[], float]

#: Seconds a client is told to wait when the server is full or its quota store is unreachable.
RETRY_AFTER_SECONDS = 5
#: How long one call to the shared quota store (Redis) may take before it counts as failed.
STORAGE_TIMEOUT_SECONDS = 2.0


class Verdict(Enum):
    """A connection's limits on one frame that the app does not handle itself."""

    #: Within the limits: handle it (answer a ping).
    ACCEPT = "accept"
    #: Over the rate limit: do not act on it (a ping goes unanswered); a violation was counted.
    REFUSE = "refuse"
    #: Repeated abuse: the connection is being closed; read nothing more from it.
    CLOSE = "close"


class TokenBucket:
    """A token bucket of ``burst`` tokens refilled at ``rate_per_second``; it starts full.

    Implemented as the equivalent GCRA ("virtual scheduling", ITU-T I.371): one float, the
    theoretical arrival time, instead of a token count that accumulates rounding errors. A
    token is available when that time is at most ``(burst - 1) / rate`` ahead of now.

    The clock should be monotonic; if it ever goes backwards, time is treated as standing
    still until it catches up, so no extra token is ever granted.

    Args:
        rate_per_second: tokens added per second; finite and > 0 (fractions allowed).
        burst: bucket capacity, >= 1.
        clock: seconds, monotonic.

    Raises:
        ValueError: on a rate or burst outside those bounds.
    """

    __slots__ = ("_clock", "_emission_seconds", "_now", "_tat", "_tolerance_seconds")

    def __init__(
        self, rate_per_second: float, burst: int, *, clock: Clock = time.monotonic
    ) -> None:
        if not (math.isfinite(rate_per_second) and rate_per_second > 0):
            raise ValueError(f"rate_per_second must be finite and > 0, not {rate_per_second!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, not {burst!r}")
        self._clock = clock
        self._emission_seconds = 1.0 / rate_per_second
        self._tolerance_seconds = (burst - 1) * self._emission_seconds
        self._now = clock()
        self._tat = self._now  # theoretical arrival time: a full bucket

    def take(self) -> float:
        """Take one token.

        Returns:
            0.0 when a token was taken; otherwise the seconds until one is available (> 0),
            and nothing was taken.
        """
        self._now = max(self._now, self._clock())
        tat = max(self._tat, self._now)  # an idle bucket refills to full, never beyond
        wait_seconds = tat - self._tolerance_seconds - self._now
        if wait_seconds > 0:
            return wait_seconds
        self._tat = tat + self._emission_seconds
        return 0.0


class ViolationWindow:
    """Counts violations in a sliding window of ``window_seconds``.

    Memory is bounded: at most ``limit + 1`` timestamps are kept, the most that can matter.

    Args:
        limit: violations tolerated within the window (>= 0); one more trips it.
        window_seconds: the window, > 0.
        clock: seconds, monotonic (a clock going backwards is treated as standing still).

    Raises:
        ValueError: on a limit or window outside those bounds.
    """

    __slots__ = ("_clock", "_limit", "_now", "_times", "_window_seconds")

    def __init__(self, limit: int, window_seconds: float, *, clock: Clock = time.monotonic) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit!r}")
        if not (math.isfinite(window_seconds) and window_seconds > 0):
            raise ValueError(f"window_seconds must be finite and > 0, not {window_seconds!r}")
        self._clock = clock
        self._limit = limit
        self._window_seconds = window_seconds
        self._times: deque[float] = deque(maxlen=limit + 1)
        self._now = clock()

    def record(self) -> bool:
        """Record one violation.

        Returns:
            True when more than ``limit`` violations happened within the window ending now.
        """
        self._now = max(self._now, self._clock())
        self._times.append(self._now)
        horizon = self._now - self._window_seconds
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        return len(self._times) > self._limit


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
        storage_url: ``memory://``, or ``redis://`` / ``rediss://`` (needs :pypi:`redis`).

    Raises:
        ValueError: on a rate ``limits`` cannot parse, several limits, a zero amount, or
            another storage scheme. The URL is never repeated: it may carry a password.
    """

    def __init__(self, rate: str, storage_url: str) -> None:
        items = limits.parse_many(rate)  # raises ValueError
        if len(items) != 1 or items[0].amount < 1:
            raise ValueError(
                f"connect rate must be one limit of at least 1, like 30/minute: {rate!r}"
            )
        self._item = items[0]
        self._pool: ConnectionPool | None = None
        scheme = urlsplit(storage_url).scheme
        storage: Storage
        if scheme == "memory":
            storage = MemoryStorage()
        elif scheme in ("redis", "rediss"):
            from redis.asyncio import ConnectionPool  # the optional dependency, only when used

            # Our own pool, so close() can release it; limits' client does not own it.
            self._pool = ConnectionPool.from_url(
                storage_url,
                socket_connect_timeout=STORAGE_TIMEOUT_SECONDS,
                socket_timeout=STORAGE_TIMEOUT_SECONDS,
            )
            storage = RedisStorage(
                storage_url,
                wrap_exceptions=True,
                implementation="redispy",  # redis-py's asyncio client, not coredis
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
        else:
            raise ValueError(
                f"rate-limit storage must be memory:// or redis://, not {scheme or '(none)'}://"
            )
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(storage)

    async def hit(self, key: str) -> float | None:
        """Count one attempt from ``key`` (see :func:`address_key`).

        Returns:
            None when allowed; otherwise the whole seconds to wait, >= 1, for ``Retry-After``
            (RFC 9110 section 10.2.3).

        Raises:
            HandshakeRejected: 503 with ``Retry-After`` when the store cannot be reached.
        """
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT_SECONDS):
                if await self._limiter.hit(self._item, "connect", key):
                    return None
                stats = await self._limiter.get_window_stats(self._item, "connect", key)
        except (StorageError, TimeoutError) as exc:
            raise HandshakeRejected(
                503,
                "unavailable",
                "the connection quota store is unavailable, try again later",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        return float(max(1, math.ceil(stats.reset_time - time.time())))

    async def healthy(self) -> bool:
        """Whether the store answers (a Redis ``PING``), within the storage timeout."""
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT_SECONDS):
                return await self._storage.check()
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Release the store: stop the memory store's expiry task, close the Redis pool."""
        if isinstance(self._storage, MemoryStorage) and self._storage.timer is not None:
            self._storage.timer.cancel()
            self._storage.timer = None
        if self._pool is not None:
            await self._pool.aclose()


class ConnectionSlots:
    """Open connections in this process, capped in total and per user.

    Args:
        max_total: connections this process holds at most (>= 1).
        max_per_user: connections one user id holds at most (>= 1).

    Raises:
        ValueError: on a cap below 1.
    """

    __slots__ = ("_max_per_user", "_max_total", "_per_user", "_total")

    def __init__(self, max_total: int, max_per_user: int) -> None:
        if max_total < 1 or max_per_user < 1:
            raise ValueError("max_total and max_per_user must be >= 1")
        self._max_total = max_total
        self._max_per_user = max_per_user
        self._per_user: dict[str, int] = {}
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    def for_user(self, user_id: str) -> int:
        return self._per_user.get(user_id, 0)

    def acquire(self, user_id: str) -> None:
        """Take a slot for ``user_id``; pair it with exactly one :meth:`release`.

        Raises:
            HandshakeRejected: 503 ``server_full`` when the total is reached; 429
                ``too_many_connections`` when the user holds ``max_per_user`` already. Both
                carry ``Retry-After`` (RFC 6585 section 4, RFC 9110 section 15.6.4).
        """
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self._total >= self._max_total:
            raise HandshakeRejected(503, "server_full", "the server is full, try later", retry)
        held = self._per_user.get(user_id, 0)
        if held >= self._max_per_user:
            raise HandshakeRejected(
                429,
                "too_many_connections",
                f"at most {self._max_per_user} open connections per user",
                retry,
            )
        self._per_user[user_id] = held + 1
        self._total += 1

    def release(self, user_id: str) -> None:
        """Give back a slot of ``user_id``; a release without a held slot does nothing."""
        held = self._per_user.get(user_id, 0)
        if held <= 0:
            return
        if held == 1:
            del self._per_user[user_id]
        else:
            self._per_user[user_id] = held - 1
        self._total -= 1
