"""Tests for gateway.rooms: the token's grants plus the open rooms, and nothing else."""

from __future__ import annotations

import pytest

from gateway.rooms import RoomPolicy, is_room_name


def test_allowed_rooms_are_grants_plus_open_rooms() -> None:
    policy = RoomPolicy(["lobby", "news"])
    assert policy.allowed_rooms(["team:1"]) == {"lobby", "news", "team:1"}
    assert policy.allowed_rooms([]) == {"lobby", "news"}


def test_no_open_rooms_means_only_grants() -> None:
    policy = RoomPolicy([])
    assert policy.allowed_rooms([]) == frozenset()
    assert policy.may_join([], "lobby") is False
    assert policy.may_join(["a"], "a") is True


def test_may_join() -> None:
    policy = RoomPolicy(["lobby"])
    assert policy.may_join([], "lobby") is True
    assert policy.may_join(["ops"], "ops") is True
    assert policy.may_join(["ops"], "dev") is False


@pytest.mark.parametrize(
    "room",
    ["LOBBY", "lobby ", " lobby", "lobby\n", "lobb", "lobby/..", "*", "", "lobby\x00"],
)
def test_near_misses_are_refused(room: str) -> None:
    policy = RoomPolicy(["lobby"])
    assert policy.may_join(["ops"], room) is False


def test_invalid_granted_names_are_dropped() -> None:
    policy = RoomPolicy(["lobby"])
    granted = ["ok", "", "has space", "x" * 65, "é", "*", "a\nb", "y" * 64]
    assert policy.allowed_rooms(granted) == {"lobby", "ok", "y" * 64}
    assert policy.may_join(granted, "has space") is False
    assert policy.may_join(granted, "x" * 65) is False


def test_non_string_grants_are_dropped() -> None:
    policy = RoomPolicy([])
    granted: list[object] = ["ok", 1, None, ["nested"], b"bytes"]
    assert policy.allowed_rooms(granted) == {"ok"}  # type: ignore[arg-type]


def test_a_single_string_is_not_a_list_of_rooms() -> None:
    policy = RoomPolicy(["lobby"])
    with pytest.raises(TypeError):
        policy.allowed_rooms("ops")  # would otherwise grant "o", "p" and "s"
    with pytest.raises(TypeError):
        policy.may_join("ops", "o")
    with pytest.raises(TypeError):
        RoomPolicy("lobby")


def test_grants_may_be_any_iterable_even_a_one_shot_generator() -> None:
    policy = RoomPolicy(room for room in ["lobby"])
    assert policy.open_rooms == {"lobby"}
    assert policy.may_join((r for r in ["ops"]), "ops") is True


def test_invalid_open_rooms_are_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="bad room"):
        RoomPolicy(["lobby", "bad room"])


def test_room_name_pattern_matches_the_wire_contract() -> None:
    assert is_room_name("A-z_0.9:x")
    assert is_room_name("a" * 64)
    assert not is_room_name("a" * 65)
    assert not is_room_name("")
    assert not is_room_name("lobby\n")  # `$` would accept a trailing newline; fullmatch does not
    assert not is_room_name(None)
