"""Who may join which room: the rooms a token grants, plus the rooms open to everyone.

The rules are data (a set of open room names) and take plain arguments, so this module
depends on neither the token format nor the transport. A room name outside the wire
contract's pattern is never allowed, whoever grants it: a token is not trusted to produce
frames that break the schema.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.settings import ROOM_NAME, is_room_name

__all__ = ["ROOM_NAME", "RoomPolicy", "is_room_name"]


def _checked(rooms: Iterable[str]) -> tuple[str, ...]:
    if isinstance(rooms, str | bytes):
        # frozenset("lobby") would be {"l", "o", "b", "y"}: a claim of the wrong type is a bug.
        raise TypeError("rooms must be an iterable of room names, not a single string")
    return tuple(rooms)


def _names(rooms: Iterable[str]) -> frozenset[str]:
    return frozenset(room for room in _checked(rooms) if is_room_name(room))


class RoomPolicy:
    """Room permissions.

    Args:
        open_rooms: rooms every authenticated user may join (GATEWAY_OPEN_ROOMS).

    Raises:
        ValueError: when an open room is not a valid room name.
        TypeError: when ``open_rooms`` is a single string.
    """

    __slots__ = ("_open",)

    def __init__(self, open_rooms: Iterable[str]) -> None:
        rooms = _checked(open_rooms)
        invalid = [room for room in rooms if not is_room_name(room)]
        if invalid:
            raise ValueError(f"invalid open room names: {invalid!r}")
        self._open = frozenset(rooms)

    @property
    def open_rooms(self) -> frozenset[str]:
        return self._open

    def allowed_rooms(self, granted: Iterable[str]) -> frozenset[str]:
        """The rooms a user may join: ``granted`` (the token's ``rooms`` claim) + open rooms.

        Invalid names in ``granted`` are dropped.

        Raises:
            TypeError: when ``granted`` is a single string.
        """
        return _names(granted) | self._open

    def may_join(self, granted: Iterable[str], room: str) -> bool:
        """Whether a user granted ``granted`` may join ``room``.

        Raises:
            TypeError: when ``granted`` is a single string.
        """
        granted = _checked(granted)
        return is_room_name(room) and (room in self._open or room in granted)
