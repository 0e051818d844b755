"""Tests for gateway.session: one connection's frame pipeline, refresh, close, and its limits.

:class:`World` (a broker, hub, policy, verifier and fake clocks) is shared with test_hub.py
and test_connection.py. Every frame a session queues is checked against its server schema.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
import orjson
import pytest

from gateway.auth import TokenVerifier, mint_token
from gateway.broker import Member, MemoryBroker
from gateway.errors import CloseCode, ConnectionClosing
from gateway.hub import DEFAULT_PRESENCE_MAX_MEMBERS, Hub
from gateway.load import LoadMonitor
from gateway.metrics import Metrics
from gateway.protocol import MAX_CHAT_CHARS, validate_server_frame
from gateway.quotas import QuotaStore, UserMessageQuota
from gateway.ratelimit import Verdict
from gateway.rooms import RoomPolicy
from gateway.session import Session
from tests.helpers import make_settings, timeout

__all__ = ["ALICE", "BOB", "NOW_MS", "NOW_SECONDS", "Frame", "World", "drain", "send"]

Frame = dict[str, Any]
NOW_SECONDS = 1_700_000_000.0
NOW_MS = int(NOW_SECONDS * 1000)
ALICE = {"id": "alice", "name": "Alice"}
BOB = {"id": "bob", "name": "Bob"}


class World:
    """One process's shared parts (broker, hub, policy, verifier, the users' message quota in
    memory unless given) and two fake clocks.

    The quota counts on ``limits``' own clock, not the fake ones, so a world opens it wide
    unless ``overrides`` set ``GATEWAY_USER_MESSAGE_RATE``. Large rooms' updates are never
    due by themselves (an hour): a test flushes them (``world.hub.room_updates.flush()``).
    """

    def __init__(
        self,
        overrides: Mapping[str, str] | None = None,
        broker: MemoryBroker | None = None,
        quota: UserMessageQuota | None = None,
        presence_max_members: int = DEFAULT_PRESENCE_MAX_MEMBERS,
    ) -> None:
        self.settings = make_settings(
            {
                "GATEWAY_OPEN_ROOMS": "lobby",
                "GATEWAY_USER_MESSAGE_RATE": "1000000/second",
                **(overrides or {}),
            }
        )
        self.broker = broker or MemoryBroker()
        self.hub = Hub(
            self.broker, presence_max_members=presence_max_members, room_update_seconds=3600
        )
        self.policy = RoomPolicy(self.settings.open_rooms)
        self.wall_seconds = NOW_SECONDS
        self.monotonic_seconds = 0.0
        self.verifier = TokenVerifier(self.settings, clock=lambda: self.wall_seconds)
        self.metrics = Metrics(process=False)
        #: Never sampled by a timer here: a test makes it overloaded with ``load.sample()``.
        self.load = LoadMonitor(0.05, [self.metrics], jitter=lambda: 0.5)
        self.quota = quota or UserMessageQuota(
            self.settings.user_message_rate, QuotaStore("memory://")
        )
        self._count = 0

    async def start(self) -> World:
        await self.hub.start()
        return self

    def token(self, sub: str, rooms: Iterable[str] = (), ttl_seconds: float = 3600) -> str:
        return mint_token(
            self.settings,
            sub=sub,
            name=sub.title(),
            rooms=rooms,
            ttl_seconds=ttl_seconds,
            now=self.wall_seconds,
        )

    async def session(self, sub: str, rooms: Iterable[str] = ()) -> Session:
        self._count += 1
        return Session(
            conn_id=f"{sub}-{self._count}",
            principal=await self.verifier.verify(self.token(sub, rooms)),
            client="203.0.113.9",
            settings=self.settings,
            policy=self.policy,
            hub=self.hub,
            broker=self.broker,
            verifier=self.verifier,
            metrics=self.metrics,
            quota=self.quota,
            load=self.load,
            clock=lambda: self.wall_seconds,
            monotonic=lambda: self.monotonic_seconds,
        )

    async def sessions(self, *subs: str) -> list[Session]:
        return [await self.session(sub) for sub in subs]


async def drain(session: Session) -> list[Frame]:
    """Every frame queued for ``session``, each checked against its server schema."""
    frames: list[Frame] = []
    while session.outbox.depth:
        frame = orjson.loads((await session.outbox.get()).text)
        validate_server_frame(frame)
        frames.append(frame)
    return frames


async def send(session: Session, raw: str | None = None, **message: Any) -> list[Frame]:
    """Feed one frame (``raw`` text, or ``message`` as JSON) and return what it queued."""
    await session.handle_frame(raw if raw is not None else orjson.dumps(message).decode())
    return await drain(session)


def without_message(frame: Frame) -> Frame:
    assert isinstance(frame.get("message"), str) and frame["message"]
    return {key: value for key, value in frame.items() if key != "message"}


@pytest.fixture
async def world() -> World:
    return await World().start()


async def test_welcome_describes_the_connection(world: World) -> None:
    s = await world.session("alice", rooms=["dev", "a:b"])
    frame = s.welcome()
    validate_server_frame(frame)
    assert frame == {
        "type": "welcome",
        "connection_id": s.conn_id,
        "user": ALICE,
        "rooms": ["a:b", "dev", "lobby"],
        "limits": {
            "max_message_bytes": 16384,
            "max_chat_chars": MAX_CHAT_CHARS,
            "rate_per_second": 5.0,
            "rate_burst": 15,
        },
        "expires_at": NOW_MS + 3_600_000,
    }


async def test_each_message_type_gets_its_reply_with_its_ref(world: World) -> None:
    s = await world.session("alice")
    joined = {"type": "joined", "room": "lobby", "members": [ALICE], "ref": "j"}
    assert await send(s, type="join", room="lobby", ref="j") == [joined]
    chat = {"type": "chat", "id": 1, "room": "lobby", "from": ALICE, "message": "hi"}
    assert await send(s, type="chat", room="lobby", message="hi", ref="c") == [
        {**chat, "ts": NOW_MS, "ref": "c"}
    ]
    assert await send(s, type="typing", room="lobby", typing=True, ref="t") == []  # others only
    assert await send(s, type="ping", ref="p") == [{"type": "pong", "ts": NOW_MS, "ref": "p"}]
    assert await send(s, type="ping") == [{"type": "pong", "ts": NOW_MS}]  # no ref, none echoed
    world.wall_seconds += 60
    token = world.token("alice", ttl_seconds=7200)
    assert await send(s, type="refresh", token=token, ref="r") == [
        {"type": "refreshed", "expires_at": NOW_MS + 7_260_000, "ref": "r"}
    ]
    assert s.expires_at == NOW_SECONDS + 7260
    assert await send(s, type="leave", room="lobby", ref="l") == [
        {"type": "left", "room": "lobby", "ref": "l"}
    ]


@pytest.mark.parametrize(
    ("raw", "code", "pointer", "ref"),
    [
        ('{"type":"join","room":"secret","ref":"r"}', "forbidden_room", "/room", "r"),
        ('{"type":"chat","room":"lobby","message":"hi","ref":"r"}', "not_joined", "/room", "r"),
        ('{"type":"typing","room":"lobby","typing":true}', "not_joined", "/room", None),
        ('{"type":"leave","room":"lobby","ref":"r"}', "not_joined", "/room", "r"),
        ('{"type":', "invalid_json", None, None),
        ('{"type":"ping","ref":"r"} {}', "invalid_json", None, None),
        ("[]", "invalid_message", "", None),
        ('{"type":"join","room":"lobby","extra":1,"ref":"r"}', "invalid_message", "/extra", "r"),
        ('{"type":"join","room":"lobby\\n"}', "invalid_message", "/room", None),
        ('{"type":"chat","room":"lobby","message":""}', "invalid_message", "/message", None),
        ('{"type":"welcome","ref":"r"}', "invalid_message", "/type", "r"),
        ('{"type":"ping","ref":"' + "x" * 65 + '"}', "invalid_message", "/ref", None),
        ('{"type":"refresh","token":""}', "invalid_message", "/token", None),
        ('{"type":"join","room":"LOBBY"}', "forbidden_room", "/room", None),
        ('{"type":"join","room":"lobby","type":"ping"}', "invalid_message", "/room", None),
        ("[" * 2000, "invalid_json", None, None),
        ('{"type":"ping","ref":"\ud800"}', "invalid_json", None, None),  # a lone surrogate
        ('\ufeff{"type":"ping"}', "invalid_json", None, None),
        ('{"type":"ping","ref":1e999}', "invalid_json", None, None),
        ('{"type":["ping"],"ref":"r"}', "invalid_message", "/type", "r"),
    ],
)
async def test_a_bad_frame_costs_an_error_and_changes_nothing(
    world: World, raw: str, code: str, pointer: str | None, ref: str | None
) -> None:
    s = await world.session("alice")
    [error] = await send(s, raw)
    expected: Frame = {"type": "error", "code": code}
    expected.update({k: v for k, v in (("pointer", pointer), ("ref", ref)) if v is not None})
    assert without_message(error) == expected
    assert (s.joined, world.hub.rooms, world.broker.presence_rooms) == (set(), 0, 0)
    assert s.close_code is None


async def test_rate_limit_reports_retry_after_from_the_monotonic_clock() -> None:
    world = await World({"GATEWAY_RATE_PER_SECOND": "1", "GATEWAY_RATE_BURST": "2"}).start()
    s = await world.session("alice")
    for _ in range(2):
        assert [f["type"] for f in await send(s, type="ping")] == ["pong"]
    [error] = await send(s, type="join", room="lobby", ref="r")
    limited = {"type": "error", "code": "rate_limited", "ref": "r"}
    assert without_message(error) == {**limited, "retry_after_ms": 1000}
    assert (s.joined, world.broker.presence_rooms) == (set(), 0)  # the handler never ran
    world.wall_seconds += 3600  # the wall clock does not refill the bucket
    world.monotonic_seconds += 0.25
    [error] = await send(s, type="ping", ref="r")
    assert without_message(error) == {**limited, "retry_after_ms": 750}
    world.monotonic_seconds += 0.7499
    [error] = await send(s, type="ping", ref="r")
    assert without_message(error) == {**limited, "retry_after_ms": 1}  # never 0
    world.monotonic_seconds += 0.0001
    assert [f["type"] for f in await send(s, type="ping")] == ["pong"]


async def test_repeated_invalid_messages_close_1008_within_the_window() -> None:
    overrides = {"GATEWAY_MAX_INVALID_MESSAGES": "3", "GATEWAY_ABUSE_WINDOW_SECONDS": "10"}
    world = await World(overrides).start()
    s = await world.session("alice")
    bad = ["{", '{"type":"nope"}', '{"type":"chat","room":"lobby","message":"x"}']
    for raw in bad:  # every kind of rejection counts
        assert [f["type"] for f in await send(s, raw)] == ["error"]
    world.monotonic_seconds += 10  # the first three leave the window
    for raw in bad:
        assert [f["type"] for f in await send(s, raw)] == ["error"]
    assert [f["type"] for f in await send(s, type="ping")] == ["pong"]  # a good frame: no reset
    with pytest.raises(ConnectionClosing) as caught:
        await s.handle_frame('{"type":"join","room":"secret"}')
    assert caught.value.code is CloseCode.POLICY_VIOLATION
    assert await drain(s) == []  # the closing frame gets no error reply


async def test_repeated_rate_limiting_closes_4029_and_is_not_counted_as_invalid() -> None:
    overrides = {
        "GATEWAY_RATE_PER_SECOND": "0.01",
        "GATEWAY_RATE_BURST": "1",
        "GATEWAY_MAX_RATE_VIOLATIONS": "2",
        "GATEWAY_MAX_INVALID_MESSAGES": "1",
    }
    world = await World(overrides).start()
    s = await world.session("alice")
    assert [f["type"] for f in await send(s, "{")] == ["error"]  # invalid: no token taken
    assert [f["type"] for f in await send(s, type="ping")] == ["pong"]
    for _ in range(2):
        assert [f["code"] for f in await send(s, type="ping")] == ["rate_limited"]
    with pytest.raises(ConnectionClosing) as caught:
        await s.handle_frame('{"type":"ping"}')
    assert caught.value.code is CloseCode.RATE_ABUSE


def rejected(world: World, reason: str) -> float:
    found = world.metrics.registry.get_sample_value(
        "gateway_frames_rejected_total", {"reason": reason}
    )
    assert found is not None
    return found


async def test_the_user_quota_holds_over_all_its_connections_and_counts_as_rate_abuse() -> None:
    overrides = {"GATEWAY_USER_MESSAGE_RATE": "3/minute", "GATEWAY_MAX_RATE_VIOLATIONS": "2"}
    world = await World(overrides).start()
    tab, other_tab, bob = await world.sessions("alice", "alice", "bob")
    assert [f["type"] for f in await send(tab, type="ping")] == ["pong"]
    for _ in range(2):
        assert [f["type"] for f in await send(other_tab, type="ping")] == ["pong"]
    # Each connection's own bucket is far from empty; the user's quota is spent.
    [error] = await send(tab, type="join", room="lobby", ref="r")
    assert (error["type"], error["code"], error["ref"]) == ("error", "rate_limited", "r")
    assert 1 <= error["retry_after_ms"] <= 60_000
    assert "user" in error["message"]
    assert tab.joined == set()  # the handler never ran
    assert (rejected(world, "user_rate"), rejected(world, "rate")) == (1, 0)
    assert [f["type"] for f in await send(bob, type="ping")] == ["pong"]  # his own quota
    # The same abuse window as the bucket's refusals: one more, and one too many.
    assert [f["code"] for f in await send(tab, type="ping")] == ["rate_limited"]
    with pytest.raises(ConnectionClosing) as caught:
        await tab.handle_frame('{"type":"ping"}')
    assert caught.value.code is CloseCode.RATE_ABUSE
    assert rejected(world, "user_rate") == 3


async def test_a_message_the_bucket_refuses_does_not_spend_the_user_quota() -> None:
    overrides = {
        "GATEWAY_RATE_PER_SECOND": "1",
        "GATEWAY_RATE_BURST": "1",
        "GATEWAY_USER_MESSAGE_RATE": "2/minute",
    }
    world = await World(overrides).start()
    tab, other_tab = await world.sessions("alice", "alice")
    assert [f["type"] for f in await send(tab, type="ping")] == ["pong"]
    for _ in range(3):
        assert [f["code"] for f in await send(tab, type="ping")] == ["rate_limited"]
    assert (rejected(world, "rate"), rejected(world, "user_rate")) == (3, 0)
    assert [f["type"] for f in await send(other_tab, type="ping")] == ["pong"]  # one left


async def test_a_quota_store_down_lets_messages_through_under_the_bucket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.quotas")
    store = QuotaStore("redis://127.0.0.1:1/0")  # nothing listens: refused at once
    overrides = {"GATEWAY_RATE_PER_SECOND": "1", "GATEWAY_RATE_BURST": "3"}
    world = await World(overrides, quota=UserMessageQuota("1/minute", store)).start()
    try:
        s = await world.session("alice")
        async with asyncio.timeout(timeout(5)):
            for _ in range(3):  # over the user quota, which cannot be counted: through
                assert [f["type"] for f in await send(s, type="ping")] == ["pong"]
            assert [f["code"] for f in await send(s, type="ping")] == ["rate_limited"]
    finally:
        await store.close()
    assert (rejected(world, "rate"), rejected(world, "user_rate")) == (1, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["user message quota not enforced: the quota store is unavailable"]


@pytest.mark.parametrize("data", [b'{"type":"ping"}', b"", None])
async def test_binary_frames_close_1003(world: World, data: bytes | None) -> None:
    s = await world.session("alice")
    with pytest.raises(ConnectionClosing) as caught:
        await s.handle_frame(data)
    assert (caught.value.code, await drain(s)) == (CloseCode.UNSUPPORTED_DATA, [])


async def test_the_size_cap_counts_utf8_bytes_and_is_inclusive() -> None:
    world = await World({"GATEWAY_MAX_MESSAGE_BYTES": "256"}).start()
    s = await world.session("alice")
    raw = '{"type":"ping","ref":"' + "é" * 32 + '"}' + " " * 168  # 256 bytes, 224 chars
    assert [f["type"] for f in await send(s, raw)] == ["pong"]
    with pytest.raises(ConnectionClosing) as caught:
        await s.handle_frame(raw + " ")
    assert (caught.value.code, await drain(s)) == (CloseCode.MESSAGE_TOO_BIG, [])


# -- refresh -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["other-sub", "bad-signature", "expired", "malformed"])
async def test_a_refused_refresh_keeps_the_old_principal(world: World, case: str) -> None:
    s = await world.session("alice", rooms=["dev"])
    before = s.principal
    token = {
        "other-sub": world.token("bob"),
        "bad-signature": jwt.encode({"sub": "alice", "exp": NOW_SECONDS + 60}, "k" * 64),
        "expired": mint_token(world.settings, sub="alice", now=NOW_SECONDS - 7200),
        "malformed": "a.b.c",
    }[case]
    [error] = await send(s, type="refresh", token=token, ref="r")
    refused = {"type": "error", "code": "invalid_message", "ref": "r", "pointer": "/token"}
    assert without_message(error) == refused
    assert token not in error["message"]
    assert s.principal is before


async def test_a_refresh_granting_fewer_rooms_leaves_them(world: World) -> None:
    alice = await world.session("alice", rooms=["dev"])
    alice2 = await world.session("alice", rooms=["dev"])  # another tab keeps the old token
    bob = await world.session("bob", rooms=["dev"])
    for s in (bob, alice, alice2):
        await send(s, type="join", room="dev")
    await send(alice, type="join", room="lobby")
    await drain(bob)
    assert await send(alice, type="refresh", token=world.token("alice"), ref="r") == [
        {"type": "left", "room": "dev"},
        {"type": "refreshed", "expires_at": NOW_MS + 3_600_000, "ref": "r"},
    ]
    assert alice.joined == {"lobby"}
    assert await drain(bob) == []  # alice is still in dev through her other tab
    assert [m.id for m in await world.broker.members("dev")] == ["alice", "bob"]
    assert [e["code"] for e in await send(alice, type="chat", room="dev", message="x")] == [
        "not_joined"
    ]
    assert [e["code"] for e in await send(alice, type="join", room="dev")] == ["forbidden_room"]
    await send(alice2, type="leave", room="dev")
    assert await drain(bob) == [
        {"type": "presence", "event": "leave", "room": "dev", "user": ALICE}
    ]


# -- close ---------------------------------------------------------------------------------


async def test_close_leaves_every_room_and_leaks_nothing(world: World) -> None:
    alice = await world.session("alice", rooms=["dev"])
    bob = await world.session("bob")
    for room in ("lobby", "dev"):
        await send(alice, type="join", room=room)
    await send(bob, type="join", room="lobby")
    await alice.close()
    await alice.close()  # twice: nothing more
    assert await drain(bob) == [
        {"type": "presence", "event": "leave", "room": "lobby", "user": ALICE}
    ]
    assert (alice.joined, alice.outbox.is_open) == (set(), False)
    assert await world.broker.members("lobby") == [Member("bob", "Bob")]
    await bob.close()
    assert (world.broker.presence_rooms, world.broker.subscribed_rooms, world.hub.rooms) == (
        0,
        0,
        0,
    )


# -- frames the WebSocket layer handles: pings, pongs, fragments --------------------------


async def test_control_frames_share_the_message_bucket_and_abuse_closes_4029() -> None:
    world = await World(
        {
            "GATEWAY_RATE_BURST": "3",
            "GATEWAY_RATE_PER_SECOND": "1",
            "GATEWAY_MAX_RATE_VIOLATIONS": "2",
        }
    ).start()
    s = await world.session("alice")
    assert [s.meter_frame(kind) for kind in ("ping", "pong")] == [Verdict.ACCEPT] * 2
    assert [f["type"] for f in await send(s, type="ping")] == ["pong"]  # the third token
    assert s.meter_frame("fragment") is Verdict.REFUSE  # none left: a violation
    assert [f["code"] for f in await send(s, type="ping")] == ["rate_limited"]  # the second
    world.monotonic_seconds += 1  # one token back
    assert s.meter_frame("ping") is Verdict.ACCEPT
    assert not s.close_requested.is_set()
    assert s.meter_frame("ping") is Verdict.CLOSE  # the third violation: over the limit
    assert (s.close_code, s.close_why) == (CloseCode.RATE_ABUSE, "ping frames over the rate limit")
    assert s.close_requested.is_set()
    world.monotonic_seconds += 100  # tokens again, but the connection is closing for abuse
    assert s.meter_frame("pong") is Verdict.CLOSE


async def test_a_session_closing_for_another_reason_still_meters(world: World) -> None:
    s = await world.session("alice")
    s.request_close(CloseCode.GOING_AWAY, "draining")
    # A client answering the server's pings while the drain closes it is not abusive: its
    # close reply must still be read.
    assert s.meter_frame("pong") is Verdict.ACCEPT
    assert (s.close_code, s.close_why) == (CloseCode.GOING_AWAY, "draining")


# -- a repeated join --------------------------------------------------------------------------


async def test_a_repeated_join_sends_the_member_list_only_when_it_changed(world: World) -> None:
    alice, bob = await world.sessions("alice", "bob")
    assert await send(alice, type="join", room="lobby") == [
        {"type": "joined", "room": "lobby", "members": [ALICE]}
    ]
    for ref in ("1", "2", "3"):  # an unchanged list is not sent again, however often asked
        assert await send(alice, type="join", room="lobby", ref=ref) == [
            {"type": "joined", "room": "lobby", "unchanged": True, "ref": ref}
        ]
    await send(bob, type="join", room="lobby")
    assert [f["type"] for f in await drain(alice)] == ["presence"]
    changed = {"type": "joined", "room": "lobby", "members": [ALICE, BOB], "ref": "4"}
    assert await send(alice, type="join", room="lobby", ref="4") == [changed]
    assert (await send(alice, type="join", room="lobby"))[0].get("unchanged") is True
    # After a leave, a join is a first join again: the whole list.
    await send(alice, type="leave", room="lobby")
    assert (await send(alice, type="join", room="lobby"))[0]["members"] == [ALICE, BOB]


# -- large rooms: a sample in joined, no presence per user, coalesced room updates -------------

CAROL = {"id": "carol", "name": "Carol"}
DAVE = {"id": "dave", "name": "Dave"}


def room(count: int, members: list[dict[str, str]] | None = None) -> Frame:
    frame: Frame = {"type": "room", "room": "lobby", "member_count": count}
    if members is not None:
        frame["members"] = members
    return frame


async def test_up_to_the_limit_joins_are_announced_as_before_and_no_update_comes() -> None:
    world = await World(presence_max_members=3).start()
    alice, bob, carol = await world.sessions("alice", "bob", "carol")
    assert await send(alice, type="join", room="lobby") == [
        {"type": "joined", "room": "lobby", "members": [ALICE]}
    ]
    await send(bob, type="join", room="lobby")
    assert await send(carol, type="join", room="lobby") == [
        {"type": "joined", "room": "lobby", "members": [ALICE, BOB, CAROL]}
    ]
    presence = {"type": "presence", "event": "join", "room": "lobby"}
    assert await drain(alice) == [{**presence, "user": BOB}, {**presence, "user": CAROL}]
    assert await drain(bob) == [{**presence, "user": CAROL}]
    await world.hub.room_updates.flush()
    assert [await drain(s) for s in (alice, bob, carol)] == [[], [], []]
    await send(carol, type="leave", room="lobby")
    await world.hub.room_updates.flush()  # a leave asks, and a room never large gets nothing
    assert await drain(alice) == [
        {"type": "presence", "event": "leave", "room": "lobby", "user": CAROL}
    ]


async def test_above_the_limit_a_join_is_told_by_one_room_update_not_to_each_member() -> None:
    world = await World(presence_max_members=2).start()
    alice, bob, carol, dave = await world.sessions("alice", "bob", "carol", "dave")
    for s in (alice, bob):
        await send(s, type="join", room="lobby")
    await drain(alice)
    # The third user makes the room large: a sample of the limit, with her in it, and the count.
    assert await send(carol, type="join", room="lobby", ref="j") == [
        {
            "type": "joined",
            "room": "lobby",
            "members": [ALICE, CAROL],
            "member_count": 3,
            "members_truncated": True,
            "ref": "j",
        }
    ]
    assert (await drain(alice), await drain(bob)) == ([], [])  # no presence frame
    [joined] = await send(dave, type="join", room="lobby")
    assert (joined["members"], joined["member_count"]) == ([ALICE, DAVE], 4)
    assert (await drain(alice), await drain(carol)) == ([], [])
    await world.hub.room_updates.flush()  # what the hub does once a second
    for s in (alice, bob, carol, dave):
        assert await drain(s) == [room(4)]  # one update for the two joins
    await world.hub.room_updates.flush()
    assert await drain(alice) == []  # nothing changed since


async def test_leaves_above_the_limit_are_coalesced_and_a_room_small_again_gets_its_list() -> None:
    world = await World(presence_max_members=2).start()
    alice, bob, carol, dave = await world.sessions("alice", "bob", "carol", "dave")
    for s in (alice, bob, carol, dave):
        await send(s, type="join", room="lobby")
    await world.hub.room_updates.flush()
    for s in (alice, bob, carol, dave):
        await drain(s)
    await send(dave, type="leave", room="lobby")
    assert await drain(alice) == []  # 3 users: still large
    await world.hub.room_updates.flush()
    assert await drain(alice) == await drain(bob) == [room(3)]
    await carol.close()  # 2 users: small again, so presence as before, then the whole list
    leave = {"type": "presence", "event": "leave", "room": "lobby", "user": CAROL}
    assert await drain(alice) == await drain(bob) == [leave]
    await world.hub.room_updates.flush()
    assert await drain(alice) == await drain(bob) == [room(2, [ALICE, BOB])]
    await send(bob, type="leave", room="lobby")
    await world.hub.room_updates.flush()  # small, and told so already: presence only
    assert await drain(alice) == [{**leave, "user": BOB}]


async def test_a_repeated_join_in_a_large_room_sends_the_sample_when_it_or_the_count_changed() -> (
    None
):
    world = await World(presence_max_members=1).start()
    alice, bob, carol = await world.sessions("alice", "bob", "carol")
    for s in (alice, bob):
        await send(s, type="join", room="lobby")
    again = await send(bob, type="join", room="lobby", ref="2")
    assert again == [{"type": "joined", "room": "lobby", "unchanged": True, "ref": "2"}]
    await send(carol, type="join", room="lobby")
    [joined] = await send(bob, type="join", room="lobby")  # the count changed: 3
    assert (joined["members"], joined["member_count"]) == ([BOB], 3)


async def test_a_rename_in_a_large_room_is_not_announced_to_everyone() -> None:
    world = await World(presence_max_members=1).start()
    alice, bob = await world.sessions("alice", "bob")
    for s in (alice, bob):
        await send(s, type="join", room="lobby")
    await world.hub.room_updates.flush()
    await drain(bob)
    token = mint_token(world.settings, sub="alice", name="Alice B.", now=world.wall_seconds)
    await send(alice, type="refresh", token=token)
    await world.hub.room_updates.flush()
    assert await drain(bob) == []  # the count did not change: nothing to tell
    assert Member("alice", "Alice B.") in await world.broker.members("lobby")


async def test_n_users_entering_one_room_cost_o_n_frames_not_n_squared() -> None:
    n, limit = 200, 10
    world = await World(presence_max_members=limit).start()
    sessions = await world.sessions(*(f"user{i:03}" for i in range(n)))
    received = 0
    for s in sessions:
        await s.handle_frame('{"type":"join","room":"lobby"}')
        if s is sessions[n // 2]:
            await world.hub.room_updates.flush()  # a second went by halfway
    await world.hub.room_updates.flush()
    frames = {kind: 0 for kind in ("joined", "presence", "room")}
    for s in sessions:
        for frame in await drain(s):
            frames[frame["type"]] += 1
            received += 1
            if frame["type"] == "joined":
                assert len(frame["members"]) <= limit
    # The first `limit` joins are a small room's: each is told to everyone already there.
    assert frames == {"joined": n, "presence": limit * (limit - 1) // 2, "room": n // 2 + 1 + n}
    assert received < 5 * n  # it was n * (n - 1) / 2 = 19,900 presence frames
