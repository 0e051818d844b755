"""Tests for gateway.load and the session's push-back under overload.

While the event loop lags more than the threshold, new chats are refused with a retryable
``overloaded`` error (nothing published), typing is dropped, and none of it is held against the
client: subscribers keep receiving and nobody is closed.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.broker import Envelope, MemoryBroker
from gateway.errors import BrokerUnavailable
from gateway.load import LoadMonitor
from gateway.metrics import Metrics
from tests.test_session import World, drain, send


def metric(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


# --- the monitor ---------------------------------------------------------------------------


def overload(load: LoadMonitor, lag_seconds: float = 0.2) -> None:
    load.sample(lag_seconds)
    load.sample(lag_seconds)


def test_one_late_tick_is_a_pause_not_an_overload() -> None:
    load = LoadMonitor(0.05)
    for _ in range(3):
        load.sample(0.0)
        load.sample(0.19)  # a full garbage collection, now and then
        assert not load.overloaded
    assert load.lag_seconds == 0.0


def test_two_late_ticks_overload_and_on_time_ticks_end_it_by_halves() -> None:
    metrics = Metrics(process=False)
    load = LoadMonitor(0.05, [metrics])
    load.sample(0.0)
    assert not load.overloaded
    load.sample(0.3)
    load.sample(0.2)  # two in a row: the lesser counts
    assert load.overloaded
    assert metric(metrics, "gateway_overloaded") == 1
    assert metric(metrics, "gateway_event_loop_lag_seconds") == pytest.approx(0.2)
    load.sample(0.0)  # 0.1
    load.sample(0.0)  # 0.05: not above the threshold
    assert not load.overloaded
    assert metric(metrics, "gateway_overloaded") == 0
    assert metric(metrics, "gateway_event_loop_lag_seconds") == pytest.approx(0.05)


def test_a_threshold_of_zero_measures_but_never_sheds() -> None:
    load = LoadMonitor(0.0)
    overload(load, 10.0)
    assert load.lag_seconds == 10.0
    assert not load.overloaded


def test_the_retry_advice_grows_with_the_lag_is_jittered_and_bounded() -> None:
    low = LoadMonitor(0.05, jitter=lambda: 0.0)
    high = LoadMonitor(0.05, jitter=lambda: 0.999)
    assert low.retry_after_ms() == 250  # the floor
    assert high.retry_after_ms() == 499
    overload(low, 0.1)
    overload(high, 0.1)
    assert low.retry_after_ms() == 400
    assert high.retry_after_ms() == 799
    overload(high, 100.0)
    assert high.retry_after_ms() == 5000  # the ceiling


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        LoadMonitor(-1.0)
    with pytest.raises(ValueError, match="interval"):
        LoadMonitor(0.05, interval_seconds=0)


class Seen:
    def __init__(self) -> None:
        self.samples: list[tuple[float, bool]] = []

    def loop_lag(self, seconds: float, overloaded: bool) -> None:
        self.samples.append((seconds, overloaded))


async def test_a_blocked_loop_is_seen_by_the_timer_and_close_stops_it() -> None:
    seen = Seen()
    load = LoadMonitor(0.05, [seen], interval_seconds=0.01)
    load.start()
    load.start()  # idempotent: one timer
    began = time.monotonic()
    await asyncio.sleep(0.05)
    assert 1 <= len(seen.samples) <= (time.monotonic() - began) / 0.01 + 1  # one timer, not two
    assert not any(overloaded for _, overloaded in seen.samples)
    time.sleep(0.3)  # a pause: one late tick  # noqa: ASYNC251
    await asyncio.sleep(0.05)
    assert not any(overloaded for _, overloaded in seen.samples)
    for _ in range(4):  # what a fan-out too big for one core does to every timer
        time.sleep(0.1)  # noqa: ASYNC251
        await asyncio.sleep(0.002)
    assert max(seen.samples) >= (0.08, True)
    load.close()
    load.close()
    assert not load.overloaded
    count = len(seen.samples)
    await asyncio.sleep(0.05)
    assert len(seen.samples) == count  # no more samples


# --- the session under overload --------------------------------------------------------------


async def test_an_overloaded_server_refuses_chats_with_a_retryable_error() -> None:
    world = await World().start()
    alice, bob = await world.sessions("alice", "bob")
    for s in (alice, bob):
        await send(s, type="join", room="lobby", ref="j")
    await drain(alice)
    overload(world.load)
    [error] = await send(bob, type="chat", room="lobby", message="hi", ref="c1")
    assert error["code"] == "overloaded"
    assert error["ref"] == "c1"
    assert error["retry_after_ms"] == 1200  # 4 x 0.2 s, x1.5 jitter
    assert await drain(alice) == []  # nothing was published
    assert metric(world.metrics, "gateway_messages_shed_total", {"type": "chat"}) == 1

    for _ in range(3):  # 0.1, 0.05: back under the threshold
        world.load.sample(0.0)
    [echo] = await send(bob, type="chat", room="lobby", message="hi", ref="c1")
    assert echo["type"] == "chat"
    assert echo["ref"] == "c1"
    [chat] = await drain(alice)
    assert chat["message"] == "hi"


async def test_typing_is_dropped_silently_under_overload() -> None:
    world = await World().start()
    alice, bob = await world.sessions("alice", "bob")
    for s in (alice, bob):
        await send(s, type="join", room="lobby")
    await drain(alice)
    overload(world.load)
    assert await send(bob, type="typing", room="lobby", typing=True) == []
    assert await drain(alice) == []
    assert metric(world.metrics, "gateway_messages_shed_total", {"type": "typing"}) == 1


async def test_refusals_for_the_servers_state_never_close_the_client() -> None:
    """More overloaded (and unavailable) refusals than GATEWAY_MAX_INVALID_MESSAGES allows
    invalid ones: the server's state is not the client's fault, so no 1008."""

    class DownBroker(MemoryBroker):
        down = False

        async def publish_numbered(self, envelope: Envelope) -> int:
            if self.down:
                raise BrokerUnavailable("redis is down")
            return await super().publish_numbered(envelope)

    broker = DownBroker()
    world = await World({"GATEWAY_MAX_INVALID_MESSAGES": "2"}, broker=broker).start()
    [bob] = await world.sessions("bob")
    await send(bob, type="join", room="lobby")
    overload(world.load)
    for n in range(5):
        [error] = await send(bob, type="chat", room="lobby", message="hi", ref=f"o{n}")
        assert error["code"] == "overloaded"
    for _ in range(3):
        world.load.sample(0.0)
    broker.down = True
    for n in range(5):
        [error] = await send(bob, type="chat", room="lobby", message="hi", ref=f"u{n}")
        assert error["code"] == "unavailable"
    assert bob.close_code is None
    # ...while invalid messages still count, as before: the third closes.
    for _ in range(2):
        await send(bob, type="chat", room="nowhere", message="hi")
    with pytest.raises(Exception, match="1008"):
        await send(bob, type="chat", room="nowhere", message="hi")
