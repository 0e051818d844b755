"""The audit trail: every security decision, one JSON log line and one count.

Each line is logged by ``gateway.audit`` with a stable ``event`` (:data:`EVENTS`), the client's
address (``client``) and what else identifies the decision (``reason``, ``close_code``,
``conn_id``, ``user_id``), never token content or message text; each decision counts in
``gateway_security_events_total{event}``. Lines are throttled per event
(:data:`LINES_PER_SECOND`, then one line saying how many were left out), so that a flood of
refusals cannot flood the log; the counter counts every one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["EVENTS", "LINES_PER_SECOND", "Audit", "SecurityCounter"]

log = logging.getLogger("gateway.audit")

#: The events, a metric label each (docs/deployment.md, Audit trail).
EVENTS = (
    "auth_refused",  # an upgrade's token refused; reason: which check
    "origin_refused",  # an upgrade from an Origin not allowed
    "connect_rate_limited",  # too many upgrade attempts from one address
    "connection_cap",  # too many connections (per user, or the server's)
    "message_rate_limited",  # a frame over the connection's or the user's rate
    "abuse_closed",  # a connection closed for abuse: 1008 (invalid frames) or 4029 (rate)
    "frame_refused",  # a frame refused by the WebSocket layer: 1009 (size), 1007, 1003
    "broker_message_dropped",  # a message on Redis that is not ours: forged, replayed, stale
)
#: Lines per event and second, at most.
LINES_PER_SECOND = 20
#: What an event is logged at.
_LEVELS = {"abuse_closed": logging.WARNING, "broker_message_dropped": logging.WARNING}


class SecurityCounter(Protocol):
    def security_event(self, event: str) -> None: ...


class Audit:
    """Records security decisions (see the module's text).

    Args:
        counter: where each decision is counted (the metrics), or None.
        clock: monotonic seconds.
    """

    def __init__(
        self, counter: SecurityCounter | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._counter = counter
        self._clock = clock
        #: event -> (the second's start, lines in it, lines left out since the last line)
        self._windows: dict[str, tuple[float, int, int]] = {}

    def record(self, event: str, *, client: str | None, **fields: object) -> None:
        """One decision: counted, and logged unless this event's lines are over the rate.

        Raises:
            ValueError: on an event not in :data:`EVENTS` (a typo would make a new series).
        """
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        if self._counter is not None:
            self._counter.security_event(event)
        level = _LEVELS.get(event, logging.INFO)
        if not log.isEnabledFor(level):
            return
        now = self._clock()
        start, lines, left_out = self._windows.get(event, (now, 0, 0))
        if now - start >= 1.0:
            start, lines = now, 0
        if lines >= LINES_PER_SECOND:
            self._windows[event] = (start, lines, left_out + 1)
            return
        self._windows[event] = (start, lines + 1, 0)
        extra: dict[str, object] = {"client": client, **fields}
        if left_out:
            extra["left_out"] = left_out
        log.log(level, event, extra=extra)
