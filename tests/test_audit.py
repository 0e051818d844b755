"""Unit tests of gateway.audit: one counted, throttled line per security decision."""

from __future__ import annotations

import logging

import pytest

from gateway.audit import EVENTS, LINES_PER_SECOND, Audit


class Counter:
    def __init__(self) -> None:
        self.events: list[str] = []

    def security_event(self, event: str) -> None:
        self.events.append(event)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.audit"]


def test_a_decision_is_one_line_with_its_event_and_client_and_one_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    counter = Counter()
    Audit(counter).record("auth_refused", client="203.0.113.9", reason="expired", status=401)
    [line] = lines(caplog)
    assert line.getMessage() == "auth_refused"
    assert (line.__dict__["client"], line.__dict__["reason"]) == ("203.0.113.9", "expired")
    assert counter.events == ["auth_refused"]


def test_abuse_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    Audit().record("abuse_closed", client="x", close_code=1008)
    Audit().record("message_rate_limited", client="x")
    assert [r.levelno for r in lines(caplog)] == [logging.WARNING, logging.INFO]
    assert {"abuse_closed", "message_rate_limited"} <= set(EVENTS)


def test_an_unknown_event_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown audit event"):
        Audit().record("auth_refsued", client=None)


def test_a_flood_is_counted_whole_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    counter, clock = Counter(), Clock()
    audit = Audit(counter, clock)
    for _ in range(1000):
        audit.record("connect_rate_limited", client="198.51.100.1")
    audit.record("origin_refused", client="198.51.100.1")  # another event: its own budget
    assert len(counter.events) == 1001
    assert len(lines(caplog)) == LINES_PER_SECOND + 1
    clock.now += 1.0
    audit.record("connect_rate_limited", client="198.51.100.1")
    last = lines(caplog)[-1]
    assert last.__dict__["left_out"] == 1000 - LINES_PER_SECOND  # says what it left out
