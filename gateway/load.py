"""Overload: how far behind the event loop runs, and whether publishers are pushed back.

A server that cannot keep up with what its rooms are sent must not make its subscribers pay:
their queues filling because the *server* is slow is no reason to close them as slow
consumers. :class:`LoadMonitor` measures the event loop's lag (how late a timer that should
fire every ``interval_seconds`` fires: the time every ready callback, every connection's
reading and every fan-out, takes before it) and says the process is **overloaded** while that
lag is above ``GATEWAY_OVERLOAD_LAG_MS``. While it is, the session refuses new ``chat`` frames
with a retryable ``overloaded`` error (and drops ``typing``), so the work that comes in is the
work the loop can do: subscribers stay connected and keep receiving, publishers retry after
``retry_after_ms`` (docs/protocol.md, Overload).

What counts is *sustained* lag: the lesser of the last two samples. One late tick is a pause
(a full garbage collection with thousands of connections takes 100 to 200 ms), not overload,
and refusing chats for it would only annoy; two in a row are a loop with no time to spare. That
lag rises at once and falls by halves (a few on-time ticks end shedding), so shedding does not
flicker on every other tick.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["TICK_SECONDS", "LoadMonitor", "LoadObserver"]

log = logging.getLogger("gateway.load")

#: How often the loop's lag is sampled: 20 cheap callbacks a second.
TICK_SECONDS = 0.05
#: The retry advice's bounds, in milliseconds; the advice is jittered so publishers that were
#: refused together do not come back together.
_MIN_RETRY_MS = 250
_MAX_RETRY_MS = 5000


class LoadObserver(Protocol):
    """Where the monitor reports (gateway.metrics.Metrics)."""

    def loop_lag(self, seconds: float, overloaded: bool) -> None: ...


class LoadMonitor:
    """The event loop's lag, sampled every ``interval_seconds``; overloaded above a threshold.

    Args:
        threshold_seconds: lag above which the process is overloaded; 0 turns shedding off
            (the lag is still measured and reported).
        observers: told the lag and the state at each tick (metrics, write coalescing).
        interval_seconds: the sampling period.
        clock: a monotonic clock.
        jitter: the random source of the retry advice (a fixed one in tests).
    """

    def __init__(
        self,
        threshold_seconds: float,
        observers: Sequence[LoadObserver] = (),
        *,
        interval_seconds: float = TICK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if threshold_seconds < 0 or interval_seconds <= 0:
            raise ValueError("the lag threshold must be at least 0 and the interval positive")
        self.threshold_seconds = threshold_seconds
        self._observers = tuple(observers)
        self._interval = interval_seconds
        self._clock = clock
        self._jitter = jitter
        #: The smoothed sustained lag, in seconds.
        self.lag_seconds = 0.0
        self._last_sample = 0.0
        #: Whether publishers are being pushed back now.
        self.overloaded = False
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start sampling on the running loop (idempotent)."""
        if self._timer is None:
            self._schedule()

    def close(self) -> None:
        """Stop sampling; the process is no longer reported overloaded. Safe twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.overloaded = False

    def _schedule(self) -> None:
        self._due = self._clock() + self._interval
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        self.sample(max(0.0, self._clock() - self._due))
        self._schedule()

    def sample(self, lag_seconds: float) -> None:
        """Take one lag measurement into account (the timer's; tests call it directly)."""
        sustained = min(lag_seconds, self._last_sample)
        self._last_sample = lag_seconds
        self.lag_seconds = max(sustained, (self.lag_seconds + sustained) / 2)
        overloaded = 0 < self.threshold_seconds < self.lag_seconds
        if overloaded != self.overloaded:
            self.overloaded = overloaded
            log.log(
                logging.WARNING if overloaded else logging.INFO,
                "overloaded: new chats are refused" if overloaded else "no longer overloaded",
                extra={"lag_ms": round(self.lag_seconds * 1000)},
            )
        for observer in self._observers:
            observer.loop_lag(self.lag_seconds, self.overloaded)

    def retry_after_ms(self) -> int:
        """When a refused publisher should try again: a few times the current lag, jittered
        between 1x and 2x, within 250 ms to 5 s."""
        base = max(_MIN_RETRY_MS, 4000 * self.lag_seconds)
        return int(min(_MAX_RETRY_MS, base * (1 + self._jitter())))
