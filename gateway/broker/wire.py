"""How an :class:`~gateway.broker.base.Envelope` travels between instances, authenticated.

A message on a room's pub/sub channel (:func:`channel`) is, byte for byte::

    [<id> "|"] "G1" <mac: 32> <nonce: 16> <ts: 8> <instance: 16> <room length: 1> <room> <envelope>

- ``<id>|``: the room's id in ASCII digits, only on a numbered envelope. Redis writes it (the
  publish script takes the id and publishes in one step), so it is outside the MAC.
- ``G1``: this format's version.
- ``mac``: HMAC-SHA256 under the broker secret of ``"G1" + channel + "\\n" + body``, where body
  is everything after the MAC: the channel name binds the message to its room.
- ``nonce``: 16 random bytes; ``ts``: the sender's clock in ms (big-endian); ``instance``: the
  sender's random id; then the room (ASCII, at most 64 bytes); then
  :meth:`~gateway.broker.base.Envelope.to_bytes`, serialized once by the publisher.

A receiver (:class:`Opener`) checks, in this order, and drops with the first reason that
applies (:data:`~gateway.broker.base.DROP_REASONS`): the framing (``malformed``), the MAC with
:func:`hmac.compare_digest` (``signature``), that the room signed for is the channel's
(``room``), the timestamp: at most :data:`WINDOW_BACK_MS` old and :data:`WINDOW_AHEAD_MS` ahead
of the receiver's clock (``stale``), the nonce: not seen within that window (``replayed``),
the envelope itself (``malformed``), and that an id prefix is there exactly when the envelope
is numbered (``number``). **Instances' clocks must agree within** :data:`WINDOW_AHEAD_MS`
(and deliveries take far less than :data:`WINDOW_BACK_MS`): keep them synchronized (NTP).

Why the unauthenticated id prefix cannot be abused: whoever can PUBLISH to Redis but lacks the
secret can only re-publish real messages, with any prefix. Redis delivers the original to every
subscribed instance before anyone can copy it, so each of them has its nonce and drops the copy
as ``replayed``, whatever its prefix; stripping or adding a prefix is a ``number`` drop. An
instance that subscribed only after the original takes at most one copy, within the window,
and only with an id above the last it delivered for the room (the broker drops the others as
``number``): an authentic message of that room, once. Changing the prefix of a message in
flight, before it reaches anyone, takes a position between Redis and the instances, where one
can as well drop or delay everything; ``rediss://`` (TLS) closes that position.
"""

from __future__ import annotations

import hmac
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from hashlib import sha256

from gateway.broker.base import Envelope
from gateway.settings import is_room_name

__all__ = [
    "CHANNEL_PREFIX",
    "INSTANCE_BYTES",
    "NONCE_BYTES",
    "REMEMBERED_NONCES",
    "VERSION",
    "WINDOW_AHEAD_MS",
    "WINDOW_BACK_MS",
    "Opener",
    "Rejected",
    "Sealer",
    "channel",
    "room_of_channel",
]

#: Every room's channel is this prefix and the room's name.
CHANNEL_PREFIX = b"gateway:room:"

#: The first bytes of a sealed envelope (the format's version).
VERSION = b"G1"

NONCE_BYTES = 16
INSTANCE_BYTES = 16
_MAC_BYTES = 32
#: nonce, timestamp (ms), sender instance, room length.
_HEADER = struct.Struct(f">{NONCE_BYTES}sQ{INSTANCE_BYTES}sB")
_BODY_START = len(VERSION) + _MAC_BYTES
#: At most 16 digits: ids stay below 2**53 (JavaScript's safe integers).
_MAX_ID_DIGITS = 16

#: How old (ms, by the receiver's clock) a message may be.
WINDOW_BACK_MS = 60_000
#: How far ahead of the receiver's clock a message may be (the clocks' disagreement).
WINDOW_AHEAD_MS = 5_000

#: At most this many nonces are remembered (about 25 MB). Past it the oldest are forgotten and
#: a message not newer than them counts as ``stale``: no replay ever passes, and the window
#: only shrinks under more than about 2000 messages a second per instance.
REMEMBERED_NONCES = 1 << 17


def channel(room: str) -> bytes:
    """The pub/sub channel of ``room``.

    Raises:
        ValueError: when ``room`` is not a room name (:data:`gateway.settings.ROOM_NAME`).
    """
    if not is_room_name(room):
        raise ValueError("not a room name")
    return CHANNEL_PREFIX + room.encode("ascii")


def room_of_channel(name: bytes) -> str | None:
    """The room whose channel is ``name``; None for any other channel."""
    if not name.startswith(CHANNEL_PREFIX):
        return None
    room = name[len(CHANNEL_PREFIX) :].decode("ascii", "replace")
    return room if is_room_name(room) else None


class Rejected(Exception):
    """A message is dropped; ``reason`` is one of :data:`~gateway.broker.base.DROP_REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _mac(key: bytes, channel_name: bytes, body: bytes | memoryview) -> bytes:
    mac = hmac.new(key, VERSION, sha256)
    mac.update(channel_name)
    mac.update(b"\n")
    mac.update(body)
    return mac.digest()


def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


class Sealer:
    """Seals envelopes for the wire.

    Args:
        key: the broker secret.
        instance: this instance's id (:data:`INSTANCE_BYTES` bytes).
        clock: wall time in seconds (the timestamp).
    """

    def __init__(self, key: bytes, instance: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(instance) != INSTANCE_BYTES:
            raise ValueError(f"an instance id has {INSTANCE_BYTES} bytes")
        self._key = key
        self._instance = instance
        self._clock = clock

    def seal(self, envelope: Envelope) -> bytes:
        """``envelope`` as one message: serialized once, signed, with a fresh nonce.

        Raises:
            ValueError: when the room is not a room name, or a field is not encodable as
                UTF-8 (:meth:`~gateway.broker.base.Envelope.to_bytes`).
        """
        channel_name = channel(envelope.room)
        room = channel_name[len(CHANNEL_PREFIX) :]
        header = _HEADER.pack(
            secrets.token_bytes(NONCE_BYTES), _now_ms(self._clock), self._instance, len(room)
        )
        body = b"".join((header, room, envelope.to_bytes()))
        return b"".join((VERSION, _mac(self._key, channel_name, body), body))


class Opener:
    """Checks messages from the wire and gives back their envelopes (see the module's text).

    Args:
        key: the broker secret.
        clock: wall time in seconds. It is only ever taken forward: a clock stepped back does
            not make forgotten nonces acceptable again.
        remembered: how many nonces to remember at most.
    """

    def __init__(
        self,
        key: bytes,
        clock: Callable[[], float] = time.time,
        remembered: int = REMEMBERED_NONCES,
    ) -> None:
        self._key = key
        self._clock = clock
        self._remembered = remembered
        #: nonce -> its message's timestamp, oldest arrival first.
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        #: Messages stamped at or before this (ms) may have had their nonce forgotten.
        self._horizon = -1
        self._now = 0

    @property
    def remembered_nonces(self) -> int:
        """How many nonces are remembered now (bounded by ``remembered``)."""
        return len(self._seen)

    def open(self, room: str, data: bytes) -> tuple[Envelope, int | None]:
        """Check ``data``, which arrived on ``room``'s channel.

        Returns:
            The envelope (with its id written in, when numbered), and the id or None.

        Raises:
            Rejected: with the reason it is dropped.
        """
        number, sealed = _split_number(data)
        nonce, stamp, envelope_bytes = self._authentic(room, sealed)
        self._check_fresh(nonce, stamp)
        return self._numbered(room, envelope_bytes, number)

    def open_stored(self, room: str, sealed: bytes, number: int) -> Envelope:
        """Check ``sealed``, kept in ``room``'s history under id ``number`` (it was checked
        for freshness and replay when it was published live; history is read, never
        re-published), and give back its envelope with the id written in.

        Raises:
            Rejected: with the reason it is dropped (``malformed``, ``signature``, ``room``,
                ``number``).
        """
        _nonce, _stamp, envelope_bytes = self._authentic(room, sealed)
        envelope, _ = self._numbered(room, envelope_bytes, number)
        return envelope

    def _authentic(self, room: str, sealed: bytes) -> tuple[bytes, int, bytes]:
        """The nonce, timestamp and envelope bytes of ``sealed``, once its framing, MAC and
        room are checked."""
        if len(sealed) < _BODY_START + _HEADER.size or not sealed.startswith(VERSION):
            raise Rejected("malformed")
        view = memoryview(sealed)
        nonce, stamp, _instance, room_length = _HEADER.unpack_from(view, _BODY_START)
        room_at = _BODY_START + _HEADER.size
        signed_room = bytes(view[room_at : room_at + room_length])
        if len(signed_room) != room_length or not signed_room:
            raise Rejected("malformed")
        body = view[_BODY_START:]
        expected = _mac(self._key, CHANNEL_PREFIX + signed_room, body)
        if not hmac.compare_digest(expected, view[len(VERSION) : _BODY_START]):
            raise Rejected("signature")
        if signed_room != room.encode("ascii"):
            raise Rejected("room")
        return nonce, stamp, bytes(view[room_at + room_length :])

    @staticmethod
    def _numbered(
        room: str, envelope_bytes: bytes, number: int | None
    ) -> tuple[Envelope, int | None]:
        try:
            envelope = Envelope.from_bytes(envelope_bytes)
        except ValueError:
            raise Rejected("malformed") from None
        if envelope.room != room:
            raise Rejected("room")
        if number is None:
            if envelope.to_number:
                raise Rejected("number")
            return envelope, None
        if not envelope.to_number:
            raise Rejected("number")
        return envelope.numbered(number), number

    def _check_fresh(self, nonce: bytes, stamp: int) -> None:
        now = self._now = max(self._now, _now_ms(self._clock))
        if stamp < now - WINDOW_BACK_MS or stamp > now + WINDOW_AHEAD_MS:
            raise Rejected("stale")
        seen = self._seen
        while seen:  # forget nonces whose messages would be stale by now anyway
            oldest = next(iter(seen.values()))
            if oldest >= now - WINDOW_BACK_MS:
                break
            seen.popitem(last=False)
        if stamp <= self._horizon:
            raise Rejected("stale")
        if nonce in seen:
            raise Rejected("replayed")
        seen[nonce] = stamp
        if len(seen) > self._remembered:
            _, forgotten = seen.popitem(last=False)
            self._horizon = max(self._horizon, forgotten)


def _split_number(data: bytes) -> tuple[int | None, bytes]:
    """The id prefix of ``data`` (None without one), and the sealed envelope after it.

    Raises:
        Rejected: ``malformed`` when a prefix is not a positive number of at most
            :data:`_MAX_ID_DIGITS` digits.
    """
    if data.startswith(VERSION):
        return None, data
    bar = data.find(b"|", 0, _MAX_ID_DIGITS + 1)
    digits = data[:bar]
    if bar < 1 or not digits.isdigit() or digits.startswith(b"0"):
        raise Rejected("malformed")
    return int(digits), data[bar + 1 :]
