"""Tests for gateway.connection.run_connection, driven through a fake socket: welcome first,
the one place a close code is chosen, token expiry, and a client that never lets go."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from quart import Quart

import gateway.connection
from gateway.broker import Member, MemoryBroker
from gateway.connection import (
    CLOSE_CODE_SCOPE_KEY,
    BoundedWebsocketConnection,
    Socket,
    run_connection,
    transport_close_code,
)
from gateway.errors import CLOSE_REASONS, CloseCode
from gateway.outbox import Outgoing, Put
from gateway.protocol import validate_server_frame
from gateway.session import Session
from tests.helpers import timeout
from tests.test_session import NOW_SECONDS, Frame, World

Received = str | bytes | None | BaseException


class FakeSocket:
    """Frames in from ``inbox`` (an exception there is raised), frames out to ``sent``.

    ``send_yields``: turns of the event loop each send takes (as an ASGI send through the
    server does), during which the reader may go on reading.
    """

    def __init__(
        self, *, send_hangs: bool = False, close_hangs: bool = False, send_yields: int = 0
    ) -> None:
        self.inbox: asyncio.Queue[Received] = asyncio.Queue()
        self.sent: list[Frame] = []
        self.closes: list[tuple[int, str]] = []
        self._send_hangs = send_hangs
        self._send_yields = send_yields
        self._close_hangs = close_hangs
        self._progress = asyncio.Event()

    def feed(self, *items: Received) -> FakeSocket:
        for item in items:
            self.inbox.put_nowait(item)
        return self

    async def receive(self) -> str | bytes | None:
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def send(self, text: str) -> None:
        if self._send_hangs:
            await asyncio.Event().wait()
        for _ in range(self._send_yields):
            await asyncio.sleep(0)
        frame = orjson.loads(text)
        validate_server_frame(frame)
        self.sent.append(frame)
        self._progress.set()

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        if self._close_hangs:
            await asyncio.Event().wait()

    def socket(self) -> Socket:
        return Socket(self.receive, self.send, self.close)

    async def wait_sent(self, count: int) -> list[str]:
        async with asyncio.timeout(timeout(5)):
            while len(self.sent) < count:
                self._progress.clear()
                await self._progress.wait()
        return [frame["type"] for frame in self.sent]


async def serve(socket: FakeSocket, session: Session, clock: Callable[[], float]) -> CloseCode:
    """run_connection within a bounded time; it must decide a close code."""
    async with asyncio.timeout(timeout(5)):
        code = await run_connection(socket.socket(), session, clock=clock)
    assert code is not None
    assert socket.closes == [(int(code), CLOSE_REASONS[code])]
    return code


@pytest.fixture
async def world() -> World:
    return await World({"GATEWAY_MAX_INVALID_MESSAGES": "1"}).start()


async def test_welcome_first_then_replies_until_the_server_goes_away(world: World) -> None:
    session = await world.session("alice")
    socket = FakeSocket().feed('{"type":"ping","ref":"p"}')
    task = asyncio.create_task(serve(socket, session, lambda: NOW_SECONDS))
    assert await socket.wait_sent(2) == ["welcome", "pong"]
    assert socket.sent[0]["connection_id"] == session.conn_id
    session.request_close(CloseCode.GOING_AWAY)  # the server drains
    assert await task is CloseCode.GOING_AWAY


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\x00"], CloseCode.UNSUPPORTED_DATA),
        ([None], CloseCode.UNSUPPORTED_DATA),
        (["x" * 16385], CloseCode.MESSAGE_TOO_BIG),
        (["{", '{"type":"join","room":"secret"}'], CloseCode.POLICY_VIOLATION),
    ],
)
async def test_the_sessions_close_code_is_sent(
    world: World, frames: list[Received], code: CloseCode
) -> None:
    socket = FakeSocket().feed(*frames)
    assert await serve(socket, await world.session("alice"), lambda: NOW_SECONDS) is code
    assert socket.sent[0]["type"] == "welcome"


async def test_an_unexpected_error_closes_1011_without_detail(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    socket = FakeSocket().feed(RuntimeError("secret detail /etc/passwd"))
    with caplog.at_level(logging.ERROR, logger="gateway.connection"):
        code = await serve(socket, await world.session("alice"), lambda: NOW_SECONDS)
    assert code is CloseCode.INTERNAL_ERROR
    assert socket.closes == [(1011, "internal error")]
    assert "secret" not in orjson.dumps(socket.sent).decode()
    [record] = caplog.records  # the detail goes to the log, and only there
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


class FailingMembersBroker(MemoryBroker):
    """members(), right after presence_add, fails (an outage) or blocks (a slow broker)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.blocked = asyncio.Event()

    async def members(self, room: str) -> list[Member]:
        if self.mode == "fail":
            raise RuntimeError("broker down")
        if self.mode == "block":
            self.blocked.set()
            await asyncio.Event().wait()
        return await super().members(room)


def leaks(world: World) -> tuple[int, int, int]:
    return (world.broker.presence_rooms, world.broker.subscribed_rooms, world.hub.rooms)


async def test_a_join_failing_in_the_broker_closes_1011_and_leaves_no_ghost() -> None:
    broker = FailingMembersBroker()
    world = await World(broker=broker).start()
    bob = await world.session("bob")
    await bob.handle_frame('{"type":"join","room":"lobby"}')
    broker.mode = "fail"
    alice = await world.session("alice")
    socket = FakeSocket().feed('{"type":"join","room":"lobby"}')
    assert await serve(socket, alice, lambda: NOW_SECONDS) is CloseCode.INTERNAL_ERROR
    await alice.close()  # the transport's clean-up
    broker.mode = "ok"
    assert await world.broker.members("lobby") == [Member("bob", "Bob")]
    await bob.close()
    assert leaks(world) == (0, 0, 0)


async def test_a_client_gone_mid_join_is_cancelled_and_leaves_no_ghost() -> None:
    broker = FailingMembersBroker()
    broker.mode = "block"
    world = await World(broker=broker).start()
    session = await world.session("alice")
    socket = FakeSocket().feed('{"type":"join","room":"lobby"}')
    task = asyncio.create_task(run_connection(socket.socket(), session))
    await broker.blocked.wait()
    task.cancel()  # how the ASGI layer reports a disconnect: re-raised, never swallowed
    with pytest.raises(asyncio.CancelledError):
        await task
    assert socket.closes == []  # nobody left to send a close frame to
    assert asyncio.all_tasks() == {asyncio.current_task()}  # reader, writer... all gone
    await session.close()
    assert leaks(world) == (0, 0, 0)


async def test_an_expired_token_closes_4001(world: World) -> None:
    session = await world.session("alice")
    expires_at = session.expires_at
    assert expires_at is not None
    socket = FakeSocket()
    assert await serve(socket, session, lambda: expires_at) is CloseCode.TOKEN_EXPIRED
    assert [frame["type"] for frame in socket.sent] == ["welcome"]


class ScriptedClock:
    """First 50 ms before the expiry (the watcher sleeps that long for real), then after it."""

    def __init__(self, expires_at: float) -> None:
        self.values = [expires_at - timeout(0.05)]
        self.after = expires_at + 1
        self.rechecked = asyncio.Event()

    def __call__(self) -> float:
        if self.values:
            return self.values.pop(0)
        self.rechecked.set()
        return self.after


async def test_the_token_expires_on_time_without_a_refresh(world: World) -> None:
    session = await world.session("alice")
    assert session.expires_at is not None
    clock = ScriptedClock(session.expires_at)
    assert await serve(FakeSocket(), session, clock) is CloseCode.TOKEN_EXPIRED
    assert clock.rechecked.is_set()


async def test_a_refresh_moves_the_expiry_the_watcher_waits_for(world: World) -> None:
    session = await world.session("alice")
    assert session.expires_at is not None
    clock = ScriptedClock(session.expires_at)
    refresh = orjson.dumps({"type": "refresh", "token": world.token("alice", ttl_seconds=7200)})
    socket = FakeSocket()
    task = asyncio.create_task(serve(socket, session, clock))
    await socket.wait_sent(1)
    assert clock.values == []  # the watcher sleeps until the old expiry
    socket.feed(refresh.decode())
    assert await socket.wait_sent(2) == ["welcome", "refreshed"]
    async with asyncio.timeout(timeout(5)):
        await clock.rechecked.wait()  # woke at the old expiry and looked again
    await asyncio.sleep(0)
    assert not task.done()
    session.request_close(CloseCode.GOING_AWAY)
    assert await task is CloseCode.GOING_AWAY


async def test_a_refresh_to_a_sooner_expiry_is_enforced_at_once(world: World) -> None:
    session = await world.session("alice")  # expires in an hour
    sooner = orjson.dumps({"type": "refresh", "token": world.token("alice", ttl_seconds=60)})
    socket = FakeSocket()
    # The watcher's clock is 100 s on: the old token has an hour left, the new one is past.
    task = asyncio.create_task(serve(socket, session, lambda: NOW_SECONDS + 100))
    await socket.wait_sent(1)
    socket.feed(sooner.decode())
    async with asyncio.timeout(timeout(5)):
        assert await task is CloseCode.TOKEN_EXPIRED


async def test_a_token_without_expiry_is_never_closed_4001(world: World) -> None:
    session = await world.session("alice")
    session.principal = dataclasses.replace(session.principal, expires_at=None)
    socket = FakeSocket().feed('{"type":"ping"}')
    task = asyncio.create_task(serve(socket, session, lambda: 1e12))  # far past any expiry
    assert await socket.wait_sent(2) == ["welcome", "pong"]
    assert not task.done()
    session.request_close(CloseCode.GOING_AWAY)
    assert await task is CloseCode.GOING_AWAY


# --- what was queued before a close goes out before it ----------------------------------------


async def test_the_replies_before_an_abuse_close_all_go_out_before_it() -> None:
    # The reader outruns a writer whose every send takes a few turns (the ASGI path): the
    # replies wait in the outbox when the eleventh invalid frame crosses the line. They used
    # to be dropped with the queue (one error of ten arrived, then 1008).
    world = await World().start()  # GATEWAY_MAX_INVALID_MESSAGES=10, the default
    socket = FakeSocket(send_yields=3).feed(*["not json"] * 11)
    code = await serve(socket, await world.session("mallory"), lambda: NOW_SECONDS)
    assert code is CloseCode.POLICY_VIOLATION
    assert [f["type"] for f in socket.sent] == ["welcome"] + ["error"] * 10
    assert {f["code"] for f in socket.sent[1:]} == {"invalid_json"}


async def test_every_pong_and_rate_limited_error_goes_out_before_the_4029() -> None:
    # Default limits, a clock that stands still: a burst of 15, then 20 refusals tolerated;
    # the 36th ping is the 21st refusal and gets the close instead of its error.
    world = await World().start()
    socket = FakeSocket(send_yields=3).feed(*['{"type":"ping"}'] * 36)
    code = await serve(socket, await world.session("mallory"), lambda: NOW_SECONDS)
    assert code is CloseCode.RATE_ABUSE
    kinds = [f.get("code", f["type"]) for f in socket.sent[1:]]
    assert kinds == ["pong"] * 15 + ["rate_limited"] * 20


async def test_frames_queued_before_a_drain_go_out_before_the_1001(world: World) -> None:
    session = await world.session("alice")
    socket = FakeSocket(send_yields=3)
    task = asyncio.create_task(serve(socket, session, lambda: NOW_SECONDS))
    await socket.wait_sent(1)  # the welcome
    for n in range(5):
        session.send({"type": "pong", "ts": n})
    session.request_close(CloseCode.GOING_AWAY)
    assert session.deliver(Outgoing('{"type":"pong","ts":9}', "pong")) is Put.REFUSED
    assert await task is CloseCode.GOING_AWAY
    assert [f.get("ts") for f in socket.sent[1:]] == [0, 1, 2, 3, 4]  # and nothing after


async def test_a_client_that_does_not_take_the_queue_gets_its_close_in_bounded_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.connection, "FLUSH_BEFORE_CLOSE_SECONDS", timeout(0.05))
    session = await world.session("mallory")
    socket = FakeSocket(send_hangs=True).feed(*["not json"] * 11)  # stuck on the welcome
    started = asyncio.get_running_loop().time()
    assert await serve(socket, session, lambda: NOW_SECONDS) is CloseCode.POLICY_VIOLATION
    assert asyncio.get_running_loop().time() - started < timeout(1)
    assert socket.sent == []


async def test_a_client_that_does_not_read_is_closed_4008_at_once_dropping_its_queue() -> None:
    world = await World({"GATEWAY_SEND_QUEUE_SIZE": "2"}).start()
    session = await world.session("alice")
    socket = FakeSocket(send_hangs=True)  # the writer is stuck on the welcome
    task = asyncio.create_task(serve(socket, session, lambda: NOW_SECONDS))
    await asyncio.sleep(0)
    for _ in range(3):
        session.deliver(Outgoing('{"type":"pong","ts":0}', "pong"))
    async with asyncio.timeout(timeout(gateway.connection.FLUSH_BEFORE_CLOSE_SECONDS / 2)):
        assert await task is CloseCode.TOO_SLOW  # not waiting for the writer
    assert session.outbox.depth == 0


async def test_a_close_that_never_completes_is_abandoned(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.connection, "CLOSE_TIMEOUT_SECONDS", 0.01)
    session = await world.session("alice")
    socket = FakeSocket(close_hangs=True).feed(b"binary")
    assert await serve(socket, session, lambda: NOW_SECONDS) is CloseCode.UNSUPPORTED_DATA
    assert session.close_code is CloseCode.UNSUPPORTED_DATA


# --- the client's close code reaches the handler ----------------------------------------------


def websocket_scope() -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "scheme": "wss",
        "http_version": "1.1",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("203.0.113.9", 40000),
        "server": ("127.0.0.1", 3001),
        "subprotocols": [],
        "extensions": {},
    }


@pytest.mark.parametrize(
    ("disconnect", "code"),
    [
        ({"type": "websocket.disconnect", "code": 4000}, 4000),
        ({"type": "websocket.disconnect", "code": 1000}, 1000),
        ({"type": "websocket.disconnect"}, 1005),  # ASGI: no code means 1005, "no status"
    ],
)
async def test_the_disconnect_code_is_kept_in_the_scope(
    disconnect: dict[str, Any], code: int
) -> None:
    scope = websocket_scope()
    connection = BoundedWebsocketConnection(Quart(__name__), scope)
    events: list[dict[str, Any]] = [{"type": "websocket.receive", "text": "hi"}, disconnect]

    async def receive() -> Any:
        return events.pop(0)

    assert transport_close_code(scope) is None  # nothing yet: the handler would say 1006
    async with asyncio.timeout(timeout(5)):
        await connection.handle_messages(receive)
        assert await connection.queue.get() == "hi"  # frames still flow as before
    assert transport_close_code(scope) == code
    assert connection.queue.maxsize == gateway.connection.RECEIVE_QUEUE_FRAMES


def test_a_forged_scope_value_is_not_a_close_code() -> None:
    assert transport_close_code({CLOSE_CODE_SCOPE_KEY: "1000"}) is None
    assert transport_close_code({}) is None
