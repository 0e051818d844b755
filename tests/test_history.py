"""Unit tests of gateway.history: the bounded history ring of a room, and the seam between a
replay and the live delivery that was attached before it."""

from __future__ import annotations

import pytest

from gateway.history import History, Recovery, RoomHistory, Seam, SinceError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def filled(count: int, size: int = 5, ttl: float = 60.0) -> tuple[RoomHistory, Clock]:
    clock = Clock()
    history = RoomHistory(size, ttl, clock)
    for n in range(1, count + 1):
        history.append(n, f"m{n}")
        clock.now += 1
    return history, clock


def ids(recovery: Recovery | SinceError) -> list[int]:
    assert isinstance(recovery, Recovery), recovery
    return [entry.id for entry in recovery.messages]


def test_since_replays_what_followed_in_order_and_says_it_is_complete() -> None:
    history, _ = filled(4)
    recovery = history.since(1, limit=10)
    assert ids(recovery) == [2, 3, 4]
    assert isinstance(recovery, Recovery)
    assert (recovery.recovered, recovery.oldest_id, recovery.last_id) == (True, 1, 4)
    assert [e.payload for e in recovery.messages] == ["m2", "m3", "m4"]


def test_nothing_missed_is_complete_and_empty_and_an_empty_room_too() -> None:
    history, _ = filled(3)
    assert history.since(3, 10) == Recovery((), True, 1, 3)
    fresh = RoomHistory(5, 60.0)
    assert fresh.since(0, 10) == Recovery((), True, None, 0)


def test_a_since_older_than_the_ring_is_not_recovered_and_names_the_oldest_kept() -> None:
    history, _ = filled(8, size=5)  # keeps 4..8
    recovery = history.since(2, 10)  # 3 is gone
    assert ids(recovery) == [4, 5, 6, 7, 8]
    assert isinstance(recovery, Recovery)
    assert (recovery.recovered, recovery.oldest_id) == (False, 4)
    exact = history.since(3, 10)  # everything after 3 is still there
    assert isinstance(exact, Recovery) and exact.recovered and ids(exact) == [4, 5, 6, 7, 8]


def test_messages_older_than_the_ttl_are_gone_and_recovery_says_so() -> None:
    history, clock = filled(3, ttl=10.0)  # kept at 1000, 1001, 1002
    clock.now = 1011.5  # the first two are older than 10 s
    recovery = history.since(0, 10)
    assert ids(recovery) == [3]
    assert isinstance(recovery, Recovery) and (recovery.recovered, recovery.oldest_id) == (False, 3)
    clock.now = 2000.0
    assert history.since(1, 10) == Recovery((), False, None, 3)  # all gone, the id stays
    assert history.expired and len(history) == 0


def test_a_gap_larger_than_the_limit_replays_the_newest_and_is_not_recovered() -> None:
    history, _ = filled(5, size=10)
    recovery = history.since(0, limit=2)
    assert ids(recovery) == [4, 5]
    assert isinstance(recovery, Recovery) and recovery.recovered is False


def test_a_since_from_the_future_is_refused_and_bad_arguments_raise() -> None:
    history, _ = filled(3)
    assert history.since(4, 10) is SinceError.FUTURE
    with pytest.raises(ValueError, match="since"):
        history.since(-1, 10)
    with pytest.raises(ValueError, match="limit"):
        history.since(0, 0)
    with pytest.raises(ValueError, match="does not follow"):
        history.append(3, "again")  # ids only increase: the broker's order
    with pytest.raises(ValueError):
        RoomHistory(0, 60.0)
    with pytest.raises(ValueError):
        RoomHistory(5, 0)


def test_last_gives_a_newcomer_the_newest_messages() -> None:
    history, _ = filled(4)
    assert [e.id for e in history.last(2)] == [3, 4]
    assert [e.id for e in history.last(10)] == [1, 2, 3, 4]
    assert history.last(0) == ()
    with pytest.raises(ValueError):
        history.last(-1)


def test_history_of_many_rooms_forgets_rooms_whose_messages_all_expired() -> None:
    clock = Clock()
    history = History(3, 10.0, clock)
    history.append("a", 1, "a1")
    clock.now += 5
    history.append("b", 1, "b1")
    assert history.rooms == 2
    clock.now += 6  # a's message is 11 s old, b's 6 s
    assert history.prune() == 1
    assert history.rooms == 1 and history.room("a") is None
    # A forgotten room still answers from the broker's counter: nothing kept, not recovered.
    assert history.since("a", 0, 10, last_id=1) == Recovery((), False, None, 1)
    assert history.since("a", 1, 10, last_id=1) == Recovery((), True, None, 1)
    assert history.since("a", 2, 10, last_id=1) is SinceError.FUTURE
    assert [e.payload for e in history.last("b", 5)] == ["b1"]
    assert history.last("zzz", 5) == ()


def test_the_seam_drops_what_the_replay_carries_and_keeps_the_rest_in_order() -> None:
    seam: Seam[str] = Seam()
    # Live traffic that reached the joining connection while history was read: message 7 is
    # in the replay too (published before the read), 8 and 9 came after it; presence has no id.
    seam.hold(7, "chat7")
    seam.hold(None, "presence")
    seam.hold(8, "chat8")
    seam.hold(9, "chat9")
    assert len(seam) == 4
    assert seam.release(replayed_to=7) == ["presence", "chat8", "chat9"]
    assert len(seam) == 0 and seam.release(replayed_to=0) == []


def test_the_seam_after_an_empty_replay_keeps_everything() -> None:
    seam: Seam[str] = Seam()
    seam.hold(1, "chat1")
    assert seam.release(replayed_to=0) == ["chat1"]
