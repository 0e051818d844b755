"""One connection's logic: a frame in, replies and broadcasts out, or a close.

The session knows nothing of Quart or sockets (python-websockets' sans-I/O idea): the transport
feeds it frames with :meth:`Session.handle_frame` and drains its :class:`~gateway.outbox.Outbox`;
the session raises :class:`~gateway.errors.ConnectionClosing` when the connection must end, or
calls :meth:`request_close` when something outside the reader (a full outbox) decides it.

Every frame takes the same path, and nothing skips a step (docs/protocol.md):
size cap -> UTF-8 JSON -> JSON Schema (:func:`gateway.protocol.decode`) -> token bucket ->
handler. A rejected frame costs an ``error`` reply; repeated rejections within the abuse window
close the connection (1008 for invalid messages, 4029 for rate-limit abuse).

The frames the server's WebSocket layer handles without us (pings, pongs, and fragments that do
not end a message) are offered to :meth:`Session.meter_frame`: each takes a token from the same
bucket, a frame without one is refused (a ping goes unanswered) and counts as rate-limit abuse,
so a flood of them ends in 4029 like a flood of messages.

Every refused frame is counted (``gateway_frames_rejected_total``, by the pipeline step that
refused it). Refusals can come by the thousand, so only a connection's first refused message
is logged at INFO; the rest are logged at DEBUG, and the close that abuse earns is logged at
INFO by the transport. A log line names the connection, the user, the client address and the
error code: never the frame, the token or the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from gateway.auth import Principal, TokenVerifier
from gateway.broker import Broker, Envelope, Member, MemberPage, Once
from gateway.errors import (
    CLIENT_FAULTS,
    AuthError,
    BrokerUnavailable,
    CloseCode,
    ConnectionClosing,
    ErrorCode,
    MessageRejected,
)
from gateway.history import Entry, Recovery, Seam, SinceError
from gateway.hub import Hub, presence_envelope
from gateway.load import LoadMonitor
from gateway.metrics import Metrics
from gateway.outbox import Outbox, Outgoing, Put, utf8_size
from gateway.primitives import Flag
from gateway.protocol import MAX_CHAT_CHARS, decode, encode
from gateway.quotas import UserMessageQuota
from gateway.ratelimit import TokenBucket, Verdict, ViolationWindow
from gateway.rooms import RoomPolicy
from gateway.settings import Settings

__all__ = ["Session"]

log = logging.getLogger("gateway.session")

Frame = dict[str, Any]

#: ``retry_after_ms`` of an ``unavailable`` error: the broker reconnects within seconds.
_UNAVAILABLE_RETRY_MS = 2000

#: The ``gateway_frames_rejected_total`` reason of a frame that decode() refuses with a close.
_REJECT_REASON_OF_CLOSE = {
    CloseCode.UNSUPPORTED_DATA: "binary",
    CloseCode.MESSAGE_TOO_BIG: "size",
    CloseCode.INVALID_PAYLOAD: "utf8",
}


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


#: How the id of a chat frame (built with ``"id": 0``) is written by :func:`encode`.
_ID_ZERO = '"id":0,'


def _to_number(text: str) -> tuple[str, int]:
    """A chat frame's text without its placeholder id, and where the broker writes the id."""
    at = text.index(_ID_ZERO) + len(_ID_ZERO) - 2
    return text[:at] + text[at + 1 :], at


def _unavailable(message: str, ref: str | None) -> MessageRejected:
    return MessageRejected(
        ErrorCode.UNAVAILABLE, message, ref=ref, retry_after_ms=_UNAVAILABLE_RETRY_MS
    )


async def _finish(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` to its end even if the caller is cancelled meanwhile (the caller
    still sees the cancellation); a failure after that is logged, not lost."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(_log_failure)
    await asyncio.shield(task)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("leaving a room failed", exc_info=task.exception())


class _Joining:
    """A joining session's seat in a room while its replay is read: what the room broadcasts
    meanwhile waits in :attr:`seam` (at most the send queue's frames: more, and the session
    is closed 4008, as a client that does not read would be)."""

    __slots__ = ("_session", "conn_id", "seam", "user_id")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.conn_id = session.conn_id
        self.user_id = session.user_id
        self.seam: Seam[Outgoing] = Seam()

    def deliver(self, item: Outgoing) -> Put:
        if len(self.seam) >= self._session.outbox.capacity:
            self._session.request_close(CloseCode.TOO_SLOW, "send queue full while joining")
            return Put.REFUSED
        chat_id = None
        if item.kind == "chat":
            value = orjson.loads(item.text).get("id")
            chat_id = value if isinstance(value, int) else None
        self.seam.hold(chat_id, item)
        return Put.QUEUED


class Session:
    """The state and rules of one authenticated connection.

    Args:
        conn_id: the connection id (random; in the welcome and in every log line).
        principal: who the token says the client is.
        client: the client's address, for the logs.
        metrics: where frames received and refused are counted.
        quota: the user's messages over all its connections, hit by each message the token
            bucket admits.
        load: the process's load: while it is overloaded, chats are refused with a retryable
            ``overloaded`` error and typing is dropped (None: never).
        clock: wall-clock time (timestamps, token expiry).
        monotonic: the token bucket's and the abuse windows' clock.
    """

    def __init__(
        self,
        *,
        conn_id: str,
        principal: Principal,
        client: str,
        settings: Settings,
        policy: RoomPolicy,
        hub: Hub,
        broker: Broker,
        verifier: TokenVerifier,
        metrics: Metrics,
        quota: UserMessageQuota,
        load: LoadMonitor | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn_id = conn_id
        self.principal = principal
        self.client = client
        self.metrics = metrics
        self._settings = settings
        self._policy = policy
        self._hub = hub
        self._broker = broker
        self._verifier = verifier
        self._quota = quota
        self._load = load
        self._clock = clock
        self.outbox = Outbox(settings.send_queue_size, settings.send_queue_bytes, self._on_overflow)
        self.joined: set[str] = set()
        #: Per joined room, a fingerprint of the member list last sent in a ``joined``: a
        #: repeated join answers ``unchanged`` instead of the same list again.
        self._members_sent: dict[str, int] = {}
        self._bucket = TokenBucket(settings.rate_per_second, settings.rate_burst, clock=monotonic)
        window = settings.abuse_window_seconds
        self._invalid = ViolationWindow(settings.max_invalid_messages, window, clock=monotonic)
        self._rate_abuse = ViolationWindow(settings.max_rate_violations, window, clock=monotonic)
        self.close_code: CloseCode | None = None
        #: Why, for the log line of the close (never sent to the client).
        self.close_why = ""
        #: Set when the frame meter closes the connection: nothing more is read.
        self._metered_out = False
        self.close_requested = Flag()
        #: Called by a refresh: the transport looks at the new expiry at once.
        self.on_expiry_changed: Callable[[], None] | None = None
        self.frames_in = 0
        #: Messages refused with an ``error`` reply (or the close that ended it).
        self.refused = 0

    # -- identity, as the hub sees it -------------------------------------------------------

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    @property
    def member(self) -> Member:
        return Member(id=self.principal.user_id, name=self.principal.name)

    @property
    def user(self) -> dict[str, str]:
        return {"id": self.principal.user_id, "name": self.principal.name}

    @property
    def expires_at(self) -> float | None:
        """When the current token expires (unix seconds); the transport closes 4001 then."""
        return self.principal.expires_at

    @property
    def allowed_rooms(self) -> frozenset[str]:
        return self._policy.allowed_rooms(self.principal.rooms)

    def deliver(self, item: Outgoing) -> Put:
        """Write or queue an already-serialized frame (the hub calls it for broadcasts, and
        counts what it wrote at once; the writer counts what it writes later)."""
        return self.outbox.put(item)

    def send(self, frame: Frame) -> None:
        """Serialize and send (or queue) a reply to this connection alone."""
        self._send_item(Outgoing(encode(frame), frame["type"]))

    def _send_item(self, item: Outgoing) -> None:
        if self.deliver(item) is Put.WRITTEN:
            self.metrics.written(item.kind, item.received_monotonic, time.monotonic())

    def request_close(self, code: CloseCode, why: str = "") -> None:
        """Ask the transport to close with ``code`` (the first request wins); ``why`` is for
        the log.

        Nothing more is queued from now on. What already waits in the outbox is written before
        the close frame (the transport gives the writer a bounded time for it), except after
        4008: that client does not read what waits, so it is dropped."""
        if self.close_code is None:
            self.close_code = code
            self.close_why = why
        if code is CloseCode.TOO_SLOW:
            self.outbox.close()
        else:
            self.outbox.seal()
        self.close_requested.set()

    def _on_overflow(self) -> None:
        self.request_close(CloseCode.TOO_SLOW, "send queue full")

    def meter_frame(self, kind: str) -> Verdict:
        """Count a frame the WebSocket layer handles itself against this connection's limits.

        Args:
            kind: ``ping``, ``pong``, or ``fragment`` (a frame that does not end its message).

        Returns:
            ACCEPT when a token was taken; REFUSE when none was left (a rate-limit violation);
            CLOSE when this made the violations too many: the connection closes with 4029 and
            the transport must read no more.
        """
        if self._metered_out:
            return Verdict.CLOSE
        self.metrics.control_frame(kind)
        if self._bucket.take() == 0:
            return Verdict.ACCEPT
        self.metrics.rejected("control")
        self._log_refusal(f"{kind}_over_rate")
        if self._rate_abuse.record():
            self._metered_out = True
            self.request_close(CloseCode.RATE_ABUSE, f"{kind} frames over the rate limit")
            return Verdict.CLOSE
        return Verdict.REFUSE

    # -- the frame pipeline -----------------------------------------------------------------

    def welcome(self) -> Frame:
        expires = self.expires_at
        return {
            "type": "welcome",
            "connection_id": self.conn_id,
            "user": self.user,
            "rooms": sorted(self.allowed_rooms),
            "limits": {
                "max_message_bytes": self._settings.max_message_bytes,
                "max_chat_chars": MAX_CHAT_CHARS,
                "rate_per_second": self._settings.rate_per_second,
                "rate_burst": self._settings.rate_burst,
            },
            "expires_at": _ms(expires) if expires is not None else None,
        }

    async def handle_frame(self, data: str | bytes | None) -> None:
        """Run one received frame through the pipeline.

        Raises:
            ConnectionClosing: the frame or the history of this connection ends it (1003,
                1009, 1008, 4029); the transport sends the close frame.
        """
        self.frames_in += 1
        try:
            message = decode(data, self._settings.max_message_bytes)
        except ConnectionClosing as closing:
            reason = _REJECT_REASON_OF_CLOSE.get(closing.code)
            if reason is not None:
                self.metrics.rejected(reason)
            raise
        except MessageRejected as rejection:
            invalid_json = rejection.code is ErrorCode.INVALID_JSON
            self.metrics.rejected("json" if invalid_json else "schema")
            self._reject(rejection)
            return
        self.metrics.received(message["type"])
        try:
            wait_seconds = self._bucket.take()
            reason, why = "rate", "too many messages; slow down"
            if wait_seconds == 0:  # this connection may send it: may its user, over all of them?
                wait_seconds = await self._quota.hit(self.user_id)
                reason, why = "user_rate", "too many messages from this user; slow down"
            if wait_seconds > 0:
                self.metrics.rejected(reason)
                raise MessageRejected(
                    ErrorCode.RATE_LIMITED,
                    why,
                    ref=message.get("ref"),
                    retry_after_ms=max(1, math.ceil(wait_seconds * 1000)),
                )
            await self._dispatch(message)
        except MessageRejected as rejection:
            self._reject(rejection)

    def _reject(self, rejection: MessageRejected) -> None:
        self._log_refusal(str(rejection.code))
        if rejection.code is ErrorCode.RATE_LIMITED:
            self.metrics.audit.record(
                "message_rate_limited",
                client=self.client,
                conn_id=self.conn_id,
                user_id=self.user_id,
            )
            if self._rate_abuse.record():
                raise ConnectionClosing(CloseCode.RATE_ABUSE, "rate limit exceeded repeatedly")
        elif rejection.code in CLIENT_FAULTS and self._invalid.record():
            raise ConnectionClosing(CloseCode.POLICY_VIOLATION, f"repeated {rejection.code}")
        self.send(rejection.to_frame())

    def _log_refusal(self, code: str) -> None:
        """Count a refusal; log the connection's first at INFO, the rest at DEBUG."""
        self.refused += 1
        level = logging.INFO if self.refused == 1 else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "message refused",
                extra={
                    "conn_id": self.conn_id,
                    "user_id": self.user_id,
                    "client": self.client,
                    "code": code,
                    "refused": self.refused,
                },
            )

    async def _dispatch(self, message: Frame) -> None:
        kind = message["type"]
        ref: str | None = message.get("ref")
        if kind == "chat":
            await self._chat(message["room"], message["message"], ref)
        elif kind == "typing":
            await self._typing(message["room"], message["typing"], ref)
        elif kind == "join":
            await self._join(message["room"], ref, message.get("since"), message.get("history"))
        elif kind == "leave":
            await self._leave(message["room"], ref)
        elif kind == "ping":
            self.send(self._with_ref({"type": "pong", "ts": _ms(self._clock())}, ref))
        elif kind == "refresh":
            await self._refresh(message["token"], ref)
        else:  # decode() admits only the types above; a new schema needs a handler here
            raise AssertionError(f"no handler for {kind!r}")

    @staticmethod
    def _with_ref(frame: Frame, ref: str | None) -> Frame:
        if ref is not None:
            frame["ref"] = ref
        return frame

    def _require_joined(self, room: str, ref: str | None) -> None:
        if room not in self.joined:
            raise MessageRejected(
                ErrorCode.NOT_JOINED, f"join room {room!r} first", ref=ref, pointer="/room"
            )

    # -- handlers ---------------------------------------------------------------------------

    async def _join(
        self, room: str, ref: str | None, since: int | None = None, history: int | None = None
    ) -> None:
        if room not in self.allowed_rooms:
            raise MessageRejected(
                ErrorCode.FORBIDDEN_ROOM,
                f"you may not join room {room!r}",
                ref=ref,
                pointer="/room",
            )
        limit = self._hub.room_updates.limit
        if room in self.joined:
            page = await self._broker.members_page(room, limit)
            if room in self.joined:  # not left while the broker answered
                self.send(self._joined(room, page, ref))
            return
        try:
            await self._hub.acquire(room)
        except BrokerUnavailable:
            raise _unavailable("the room cannot be joined just now", ref) from None
        try:
            first = await self._broker.presence_add(room, self.member, self.conn_id)
            page = await self._broker.members_page(room, limit)
        except BaseException as error:
            # Failing or cancelled (client gone) after presence_add, the join would leave this
            # connection recorded and the user listed in the room for ever: undo it (removing
            # an unrecorded connection is harmless), to the end even if cancelled again. No
            # presence event: none was announced.
            await _finish(self._depart(room, announce=False))
            if isinstance(error, BrokerUnavailable):
                raise _unavailable("the room cannot be joined just now", ref) from None
            raise
        self.joined.add(room)
        if since is None and history is None:
            # No await between attach and the reply: `joined` precedes the room's traffic.
            self._hub.attach(room, self)
            self.send(self._joined(room, page, ref))
        else:
            await self._join_replaying(room, page, ref, since, history)
        if first:
            await self._announce(room, "join", page.total)

    async def _join_replaying(
        self, room: str, page: MemberPage, ref: str | None, since: int | None, count: int | None
    ) -> None:
        """Join with a replay of the room's history (docs/protocol.md, History and resume):
        attached at once through a :class:`_Joining` stand-in, whose seam holds the live
        traffic while history is read; then ``joined``, the replay, and the held frames the
        replay does not carry, in that order, before the session itself takes the seat."""
        joining = _Joining(self)
        self._hub.attach(room, joining)
        recovery: Recovery | SinceError | None = None
        try:
            recovery = await self._broker.history(room, since, self._replay_limit(count))
        except BrokerUnavailable:
            log.warning("room history unavailable", extra={"conn_id": self.conn_id, "room": room})
        if recovery is SinceError.FUTURE:
            self._hub.detach(room, joining)
            self.joined.discard(room)
            await _finish(self._depart(room, announce=False))
            raise MessageRejected(
                ErrorCode.SINCE_AHEAD,
                f"since is ahead of room {room!r}'s last id: its ids restarted; join again "
                "without since (what was said before is gone)",
                ref=ref,
                pointer="/since",
            )
        frame = self._joined(room, page, ref)
        messages: tuple[Entry, ...] = ()
        seen_to = 0
        recovered = False
        if isinstance(recovery, Recovery):
            messages, recovered = self._fit(recovery.messages), recovery.recovered
            recovered = recovered and len(messages) == len(recovery.messages)
            seen_to = recovery.last_id
        if since is not None:
            frame["recovered"] = recovered
            oldest = recovery.oldest_id if isinstance(recovery, Recovery) else None
            if not recovered and oldest is not None:
                frame["oldest_id"] = oldest
        self.send(frame)
        for entry in messages:
            self._send_item(Outgoing(entry.payload, "chat"))
        for item in joining.seam.release(seen_to):
            self._send_item(item)
        if room in self.joined and self._hub.seat(room, self.conn_id) is joining:
            self._hub.attach(room, self)

    def _replay_limit(self, count: int | None) -> int:
        """The most chats a replay may bring: what history keeps, what was asked for, and
        half the send queue, so that a replay never overflows it into a 4008."""
        settings = self._settings
        limit = min(max(settings.history_size, 1), max(settings.send_queue_size // 2, 1))
        return limit if count is None else min(limit, count)

    def _fit(self, messages: tuple[Entry, ...]) -> tuple[Entry, ...]:
        """The newest of ``messages`` that fit in half the send queue's bytes."""
        budget = self._settings.send_queue_bytes // 2
        kept = 0
        for entry in reversed(messages):
            budget -= utf8_size(entry.payload)
            if budget < 0:
                break
            kept += 1
        return messages[len(messages) - kept :]

    def _joined(self, room: str, page: MemberPage, ref: str | None) -> Frame:
        """The ``joined`` reply: the member list, or ``unchanged`` when this connection was
        last sent the same one for this room (presence frames have kept it up to date).

        In a large room the list is the broker's page, with this user in it, and the frame
        says so (``members_truncated``) and how many users there are (``member_count``)."""
        members = page.members
        truncated = page.truncated
        if truncated and all(member.id != self.user_id for member in members):
            mine = (*members[: len(members) - 1], self.member)
            members = tuple(sorted(mine, key=lambda member: member.id))
        fingerprint = hash((members, page.total if truncated else None))
        frame: Frame = {"type": "joined", "room": room}
        if self._members_sent.get(room) == fingerprint:
            frame["unchanged"] = True
        else:
            self._members_sent[room] = fingerprint
            frame["members"] = [{"id": m.id, "name": m.name} for m in members]
            if truncated:
                frame["member_count"] = page.total
                frame["members_truncated"] = True
        return self._with_ref(frame, ref)

    async def _leave(self, room: str, ref: str | None) -> None:
        self._require_joined(room, ref)
        await self._part(room)
        self.send(self._with_ref({"type": "left", "room": room}, ref))

    async def _part(self, room: str) -> None:
        """Leave ``room`` here at once, and in the broker to the end even if the caller is
        cancelled (a client gone mid-leave): no presence entry or subscription is left."""
        self.joined.discard(room)
        self._members_sent.pop(room, None)
        self._hub.detach(room, self)
        await _finish(self._depart(room, announce=True))

    async def _depart(self, room: str, *, announce: bool) -> None:
        try:
            last = await self._broker.presence_remove(room, self.user_id, self.conn_id)
            if last and announce:
                await self._announce(room, "leave")
        except BrokerUnavailable:
            # The entry expires with this instance's heartbeat (GATEWAY_PRESENCE_TTL_SECONDS),
            # and whoever removes it then announces the leave.
            log.warning("presence left to expire", extra={"conn_id": self.conn_id, "room": room})
        finally:
            await self._hub.release(room)

    async def _announce(self, room: str, event: str, count: int | None = None) -> None:
        """Tell the room this user entered or left (or was renamed: ``join``); lost, not
        raised, when the broker is down (the member list, read at each join, stays right).

        In a room of ``count`` users (counted when not given) that is large, nobody is told
        now: the hub's room updates tell everyone the count within a second. A leave always
        marks the room for an update, so one that is small again gets its list back."""
        updates = self._hub.room_updates
        if event == "leave":
            updates.changed(room)
        try:
            if count is None:
                count = await self._broker.member_count(room)
            if updates.is_large(count):
                updates.changed(room)
            else:
                await self._broker.publish(presence_envelope(room, event, self.member))
        except BrokerUnavailable:
            log.warning("presence not announced", extra={"conn_id": self.conn_id, "room": room})

    async def _chat(self, room: str, text: str, ref: str | None) -> None:
        self._require_joined(room, ref)
        load = self._load
        if load is not None and load.overloaded:
            self.metrics.shed("chat")
            raise MessageRejected(
                ErrorCode.OVERLOADED,
                "the server is busy; the message was not sent, send it again",
                ref=ref,
                retry_after_ms=load.retry_after_ms(),
            )
        frame: Frame = {
            "type": "chat",
            "id": 0,  # a placeholder: the broker writes the room's next id there
            "room": room,
            "from": self.user,
            "message": text,
            "ts": _ms(self._clock()),
        }
        payload, at = _to_number(encode(frame))
        envelope = Envelope(room, payload, id_at=at)
        if ref is not None:  # the sender's own copy carries its ref: the acknowledgement
            echo, echo_at = _to_number(encode({**frame, "ref": ref}))
            envelope = Envelope(
                room,
                payload,
                echo_conn=self.conn_id,
                echo_payload=echo,
                id_at=at,
                echo_id_at=echo_at,
            )
        window = self._settings.dedupe_window_seconds
        try:
            if ref is None or not window:
                await self._broker.publish_numbered(envelope)
                return
            # Idempotent: the same ref from the same user in this room within the window is
            # the same message (a resend whose acknowledgement was lost): published once.
            user = self.user_id
            once = Once(f"{len(user)}:{user}{ref}", window, stamp=frame["ts"])
            number, first_ts = await self._broker.publish_numbered_once(envelope, once)
        except BrokerUnavailable:
            raise _unavailable("the message was not sent; send it again", ref) from None
        if first_ts is not None:  # a duplicate: the first one's acknowledgement, again
            self.metrics.duplicate()
            self.send({**frame, "id": number, "ts": first_ts, "ref": ref})

    async def _typing(self, room: str, typing: bool, ref: str | None) -> None:
        self._require_joined(room, ref)
        if self._load is not None and self._load.overloaded:  # of the moment: dropped
            self.metrics.shed("typing")
            return
        frame = {"type": "typing", "room": room, "user": self.user, "typing": typing}
        # Typing is of the moment: while the broker is down it is dropped, not refused.
        with contextlib.suppress(BrokerUnavailable):
            await self._broker.publish(Envelope(room, encode(frame), skip_user=self.user_id))

    async def _refresh(self, token: str, ref: str | None) -> None:
        try:
            principal = await self._verifier.verify(token)
        except AuthError as error:
            raise MessageRejected(
                ErrorCode.INVALID_MESSAGE,
                f"refresh token rejected: {error.detail}",
                ref=ref,
                pointer="/token",
            ) from None
        if principal.user_id != self.principal.user_id:
            raise MessageRejected(
                ErrorCode.INVALID_MESSAGE,
                "refresh token is for another user",
                ref=ref,
                pointer="/token",
            )
        renamed = principal.name != self.principal.name
        self.principal = principal
        if self.on_expiry_changed is not None:
            self.on_expiry_changed()
        # A new token may grant fewer rooms: leave those it no longer grants.
        for room in sorted(self.joined - self.allowed_rooms):
            await self._part(room)
            self.send({"type": "left", "room": room})
        if renamed:  # the member lists show the current name: record it, and tell the rooms
            for room in sorted(self.joined):
                with contextlib.suppress(BrokerUnavailable):  # the heartbeat records it later
                    await self._broker.presence_add(room, self.member, self.conn_id)
                await self._announce(room, "join")
        expires = principal.expires_at
        frame = {"type": "refreshed", "expires_at": _ms(expires) if expires is not None else None}
        self.send(self._with_ref(frame, ref))

    async def close(self) -> None:
        """Leave every room (presence leave where this was the user's last connection)."""
        self.outbox.close()
        for room in sorted(self.joined):
            await self._part(room)
