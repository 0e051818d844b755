"""Rate limits of one connection: its token bucket and its abuse windows.

- :class:`TokenBucket` meters the frames of one connection. ``limits`` has no token-bucket
  strategy, and a connection's bucket never needs sharing, so it is a few lines of our own.
- :class:`ViolationWindow` counts abuse (invalid frames, rate-limited frames) in a sliding window;
  too many close the connection.
- :class:`Verdict` is what a connection's limits say of a frame the server handles without the
  app (a ping, a pong, a fragment): act on it, refuse it, or stop reading (the app closes).

Every clock is injectable, so tests drive time by hand. The limits shared by connections and
instances (attempts per address, messages per user, open connections per user) are in
:mod:`gateway.quotas` and :mod:`gateway.slots`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

__all__ = ["TokenBucket", "Verdict", "ViolationWindow"]

Clock = Callable[[], float]


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
        #: Made at the first violation: most connections never have one.
        self._times: deque[float] | None = None
        self._now = clock()

    def record(self) -> bool:
        """Record one violation.

        Returns:
            True when more than ``limit`` violations happened within the window ending now.
        """
        self._now = max(self._now, self._clock())
        times = self._times
        if times is None:
            times = self._times = deque(maxlen=self._limit + 1)
        times.append(self._now)
        horizon = self._now - self._window_seconds
        while times and times[0] <= horizon:
            times.popleft()
        return len(times) > self._limit
