"""What a security tester tries first, on a real TLS server: clients that never read, floods of
control frames and fragments, re-join amplification."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from quart.wrappers import Websocket

from gateway.connection import FLUSH_BEFORE_CLOSE_SECONDS
from gateway.errors import CloseCode
from gateway.hypercorn_fixes import CLOSE_TIMEOUT_SECONDS, WRITE_BUFFER_HIGH_BYTES, TransportControl
from gateway.session import Session
from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.e2e.rawclient import CLOSE, CONTINUATION, PING, PONG, TEXT, RawClient, frame, tcp_sockets
from tests.helpers import timeout

pytestmark = pytest.mark.e2e

#: The kernel's TCP send buffer sizes: minimum, default, maximum (Linux).
TCP_WMEM = Path("/proc/sys/net/ipv4/tcp_wmem")


async def wait_for(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Poll ``condition()`` until true, for at most ``seconds`` (scaled)."""
    deadline = time.monotonic() + timeout(seconds)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)


def user_ids(gw: Gateway) -> set[str]:
    return {session.user_id for session in gw.services.sessions.values()}


async def drain(client: Client) -> None:
    """Read and drop everything, until the connection ends."""
    try:
        while True:
            await client.ws.recv()
    except Exception:  # noqa: S110 - closed: done
        pass


@dataclass
class Zombie:
    """A client in the lobby that never reads (a tiny receive window), the server's session of
    it, and a second member, ``sender``, whose frames a task reads and drops."""

    raw: RawClient
    session: Session
    sender: Client
    reader: asyncio.Task[None]

    @classmethod
    async def join(cls, gw: Gateway, ttl: float = 3600) -> Zombie:
        raw = await RawClient.open(gw, "zombie", receive_buffer_bytes=4096, ttl=ttl)
        raw.send(frame(TEXT, b'{"type":"join","room":"lobby"}'))
        sender = await gw.user("sender")
        await sender.join("lobby")
        await wait_for(lambda: gw.services.hub.members("lobby") == 2, 5, "both in the lobby")
        [session] = [s for s in gw.services.sessions.values() if s.user_id == "zombie"]
        return cls(raw, session, sender, asyncio.create_task(drain(sender)))

    async def close(self) -> None:
        await self.sender.close()
        await self.reader
        self.raw.close()


async def flood_until_closed(
    gw: Gateway, sender: Client, victim: str, meanwhile: Callable[[], object] = lambda: None
) -> None:
    """Publish long messages into the lobby until ``victim``'s connection is gone, calling
    ``meanwhile()`` after each."""
    body = "y" * 2000
    async with asyncio.timeout(timeout(30)):
        while victim in user_ids(gw):
            await sender.send({"type": "chat", "room": "lobby", "message": body})
            meanwhile()
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("keeps_sending", [False, True])
async def test_a_client_that_never_reads_is_gone_soon_after_its_4008(
    start_gateway: StartGateway, keeps_sending: bool
) -> None:
    async with start_gateway(
        GATEWAY_SEND_QUEUE_SIZE="16", GATEWAY_RATE_PER_SECOND="10000", GATEWAY_RATE_BURST="10000"
    ) as gw:
        await asyncio.sleep(0.1)  # the server's own tasks have started
        tasks_before = asyncio.all_tasks()
        z = await Zombie.join(gw)
        zombie, session, sender = z.raw, z.session, z.sender
        # As the attacker did: it never reads, and it may keep talking all along, through the
        # server's close, when no one reads its frames any more (a burst once the close is
        # decided: more than the app's queues hold).
        ping, burst_sent = frame(TEXT, b'{"type":"ping"}'), False

        def talk() -> None:
            nonlocal burst_sent
            if not keeps_sending:
                return
            if session.close_code is None:
                zombie.send(ping)
            elif not burst_sent:
                zombie.send(ping * 200)
                burst_sent = True

        await flood_until_closed(gw, sender, "zombie", talk)
        # The close frame cannot reach a client that does not read: the server gives up on it
        # within a bounded time, and the TCP connection (descriptor, buffers) is gone.
        port = zombie.local_port
        await wait_for(lambda: not tcp_sockets(gw.port, port), 5, "the server's socket gone")
        await wait_for(lambda: gw.services.slots.total == 1, 5, "its slot given back")
        await z.close()
        # Nothing of it is left in the server's tasks either (a reader blocked on the queue of
        # an app that has ended would be).
        await wait_for(
            lambda: asyncio.all_tasks() <= tasks_before, 5, "the connections' tasks gone"
        )


@pytest.mark.parametrize("code", [4001, 1001])
async def test_expiry_and_drain_of_a_client_that_never_reads_end_its_connection(
    start_gateway: StartGateway, code: int
) -> None:
    async with start_gateway(
        GATEWAY_SEND_QUEUE_SIZE="100000",  # the queue never overflows here: no 4008
        GATEWAY_SEND_QUEUE_BYTES=str(1 << 30),
        GATEWAY_RATE_PER_SECOND="10000",
        GATEWAY_RATE_BURST="10000",
    ) as gw:
        z = await Zombie.join(gw, ttl=4 if code == 4001 else 3600)
        session, sender, port = z.session, z.sender, z.raw.local_port

        # Stuff its connection: the kernel's buffer full, the writer waiting on the transport.
        def stuffed() -> bool:
            [(state, unsent_bytes)] = tcp_sockets(gw.port, port)
            assert state == "ESTABLISHED"
            return session.outbox.depth >= 10 and unsent_bytes > 1024 * 1024

        async with asyncio.timeout(timeout(20)):
            while not stuffed():
                for _ in range(20):
                    await sender.send({"type": "chat", "room": "lobby", "message": "y" * 2000})
                await asyncio.sleep(0.01)
        if code == 1001:
            session.request_close(CloseCode.GOING_AWAY)  # what the drain does, one by one
        await wait_for(lambda: session.close_code == code, timeout(10), f"closed {code}")
        # What its outbox holds may go first, if it reads (it does not): the close frame follows
        # within FLUSH_BEFORE_CLOSE_SECONDS, and the reset CLOSE_TIMEOUT_SECONDS after that.
        bound_seconds = FLUSH_BEFORE_CLOSE_SECONDS + CLOSE_TIMEOUT_SECONDS + 2
        await wait_for(lambda: not tcp_sockets(gw.port, port), bound_seconds, "socket gone")
        await wait_for(lambda: "zombie" not in user_ids(gw), 5, "its session gone")
        await z.close()


async def frames_until_close(raw: RawClient) -> tuple[list[tuple[int, bytes]], int, str]:
    """Every frame the server sends before its close frame (pings and pongs left out), and
    that close frame's code and reason."""
    frames: list[tuple[int, bytes]] = []
    while True:
        opcode, payload = await raw.read_frame()
        if opcode == CLOSE:
            return frames, struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        frames.append((opcode, payload))


@pytest.mark.parametrize("reads", [True, False])
async def test_replies_queued_behind_a_backlog_arrive_before_the_abuse_close(
    start_gateway: StartGateway, reads: bool
) -> None:
    async with start_gateway(GATEWAY_RATE_PER_SECOND="10000", GATEWAY_RATE_BURST="10000") as gw:
        z = await Zombie.join(gw)
        session, raw = z.session, z.raw
        # Its connection backs up (it does not read for now): frames wait in its outbox.
        async with asyncio.timeout(timeout(30)):
            while session.outbox.depth < 20:
                await z.sender.send({"type": "chat", "room": "lobby", "message": "y" * 2000})
                await asyncio.sleep(0.001)
        # Eleven invalid frames in one write: ten error replies queue behind the backlog, the
        # eleventh crosses the line (GATEWAY_MAX_INVALID_MESSAGES=10).
        raw.send(frame(TEXT, b"not json") * 11)
        await wait_for(lambda: session.close_code is not None, 5, "the abuse close decided")
        assert session.close_code == CloseCode.POLICY_VIOLATION
        # Nothing more is queued once the close is decided: the outbox only shrinks.
        bound = session.outbox.depth
        assert bound >= 20
        for _ in range(20):
            await z.sender.send({"type": "chat", "room": "lobby", "message": "y" * 2000})
        assert session.outbox.depth <= bound
        port = raw.local_port
        if reads:
            # It reads now: everything queued before the close, the ten errors last, then the
            # close frame, promptly.
            started = time.monotonic()
            frames, code, reason = await frames_until_close(raw)
            assert time.monotonic() - started < timeout(2)
            texts = [json.loads(payload) for opcode, payload in frames if opcode == TEXT]
            assert [t.get("code") for t in texts[-10:]] == ["invalid_json"] * 10
            assert all(t["type"] != "error" for t in texts[:-10])
            assert (code, reason) == (1008, "too many invalid messages")
        # Read or not, the connection ends within the flush and the close's bounds.
        bound_seconds = FLUSH_BEFORE_CLOSE_SECONDS + CLOSE_TIMEOUT_SECONDS + 2
        await wait_for(lambda: not tcp_sockets(gw.port, port), bound_seconds, "socket gone")
        await wait_for(lambda: "zombie" not in user_ids(gw), 5, "its session gone")
        await z.close()


def rejected_control(gw: Gateway) -> float:
    value = gw.services.metrics.registry.get_sample_value(
        "gateway_frames_rejected_total", {"reason": "control"}
    )
    return value or 0.0


async def read_until_close(raw: RawClient) -> tuple[int, int]:
    """Read every frame until the close frame: (pongs seen, close code)."""
    pongs = 0
    while True:
        opcode, payload = await raw.read_any_frame()
        if opcode == PONG:
            pongs += 1
        elif opcode == CLOSE:
            return pongs, struct.unpack("!H", payload[:2])[0]


FLOODS = {
    # 20,000 empty pings in one write: each would cost a pong and a socket write.
    "ping": frame(PING, b"") * 20_000,
    # Unsolicited pongs: nothing to answer, but each still costs parsing.
    "pong": frame(PONG, b"") * 20_000,
    # A message that never ends: empty fragments do not grow the buffer toward the size cap.
    "fragment": frame(TEXT, b'{"type":', fin=False) + frame(CONTINUATION, b"", fin=False) * 20_000,
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
async def test_floods_of_control_frames_and_fragments_close_4029(
    start_gateway: StartGateway, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    async with start_gateway(
        GATEWAY_RATE_BURST="10", GATEWAY_RATE_PER_SECOND="1", GATEWAY_MAX_RATE_VIOLATIONS="5"
    ) as gw:
        raw = await RawClient.open(gw, "mallory")
        raw.send(FLOODS[kind])
        async with asyncio.timeout(timeout(10)):
            pongs, code = await read_until_close(raw)
        assert code == 4029
        # The server's own ping may be answered by a pong of the flood; at most the burst of
        # the client's pings was answered, none after it.
        assert pongs <= (10 if kind == "ping" else 0)
        # Counted, logged, and the connection is gone (the server stopped reading the flood).
        assert rejected_control(gw) == 6  # the 5 tolerated violations and the one that closed
        [closing] = [r for r in caplog.records if r.msg == "closing connection"]
        assert closing.__dict__["close_code"] == 4029
        assert closing.__dict__["why"] == f"{kind} frames over the rate limit"
        port = raw.local_port
        await wait_for(lambda: not tcp_sockets(gw.port, port), 5, "the server's socket gone")
        raw.close()


async def test_control_frames_take_tokens_from_the_connections_bucket(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(GATEWAY_RATE_BURST="5", GATEWAY_RATE_PER_SECOND="0.01") as gw:
        raw = await RawClient.open(gw, "alice")
        # The server pinged at once on accept: the first pong answers it and is free; the
        # second is the client's own, and takes a token like each ping.
        raw.send(frame(PING, b"1") + frame(PING, b"2") + frame(PONG, b"") + frame(PONG, b""))
        # A message in two frames: the fragment takes one token, the message one.
        raw.send(frame(TEXT, b'{"type":"ping",', fin=False))
        raw.send(frame(CONTINUATION, b'"ref":"five"}'))
        answers: list[str] = []
        while len(answers) < 3:
            opcode, payload = await raw.read_any_frame()
            if opcode == PONG and payload in (b"1", b"2"):
                answers.append(payload.decode())
            elif opcode == TEXT:
                answers.append(json.loads(payload)["ref"])
        assert answers == ["1", "2", "five"]
        # The bucket is empty: a ping now goes unanswered, a message is refused.
        raw.send(frame(PING, b"3") + frame(TEXT, b'{"type":"ping","ref":"six"}'))
        opcode, payload = await raw.read_frame()
        assert (opcode, json.loads(payload)["code"]) == (TEXT, "rate_limited")
        assert rejected_control(gw) == 1
        raw.close()


async def test_the_send_queue_is_bounded_in_bytes_not_only_in_frames(
    start_gateway: StartGateway,
) -> None:
    queue_bytes = 65536
    async with start_gateway(
        GATEWAY_SEND_QUEUE_SIZE="100000",  # frames: never the bound here
        GATEWAY_SEND_QUEUE_BYTES=str(queue_bytes),
        GATEWAY_RATE_PER_SECOND="10000",
        GATEWAY_RATE_BURST="10000",
    ) as gw:
        z = await Zombie.join(gw)
        session, sender = z.session, z.sender
        # What a client that does not read can make the server hold: the kernel's send buffer
        # (at most tcp_wmem's maximum), the transport's buffers (TLS, then TCP), the queue's
        # bytes, a frame in flight; with a margin for TLS records' overhead. The frame bound
        # alone would have let 100,000 frames (200 MB) wait.
        kernel_max = int(TCP_WMEM.read_text().split()[2])  # noqa: ASYNC240 - /proc, at once
        allowance = kernel_max + 2 * WRITE_BUFFER_HIGH_BYTES + queue_bytes + 1024 * 1024
        body, published, deepest = "y" * 2000, 0, 0
        async with asyncio.timeout(timeout(60)):
            while session.close_code is None:
                assert published < allowance, f"not closed after {published} bytes"
                await sender.send({"type": "chat", "room": "lobby", "message": body})
                published += len(body) + 150  # and the frame around it
                deepest = max(deepest, session.outbox.size_bytes)
                await asyncio.sleep(0)
        assert session.close_code == 4008
        assert deepest <= queue_bytes
        await z.close()


async def test_a_repeated_join_does_not_resend_an_unchanged_member_list(gateway: Gateway) -> None:
    alice = await gateway.user("alice")
    assert [m["id"] for m in (await alice.join("lobby"))["members"]] == ["alice"]
    again = await alice.request({"type": "join", "room": "lobby", "ref": "2"}, "joined")
    assert again == {"type": "joined", "room": "lobby", "unchanged": True, "ref": "2"}
    bob = await gateway.user("bob")
    await bob.join("lobby")
    assert (await alice.recv_type("presence"))["user"]["id"] == "bob"
    changed = await alice.request({"type": "join", "room": "lobby"}, "joined")
    assert sorted(m["id"] for m in changed["members"]) == ["alice", "bob"]
    await alice.close()
    await bob.close()


async def test_a_slow_client_that_reads_again_in_time_gets_its_4008(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(
        GATEWAY_SEND_QUEUE_SIZE="16", GATEWAY_RATE_PER_SECOND="10000", GATEWAY_RATE_BURST="10000"
    ) as gw:
        # max_queue=1 and no reads: websockets stops reading the socket, TCP fills up.
        slow = Client(await gw.connect(gw.token("slow"), max_queue=1))
        await slow.send({"type": "join", "room": "lobby"})
        sender = await gw.user("sender")
        await sender.join("lobby")
        await wait_for(lambda: gw.services.hub.members("lobby") == 2, 5, "both in the lobby")
        reader = asyncio.create_task(drain(sender))
        [session] = [s for s in gw.services.sessions.values() if s.user_id == "slow"]
        body = "y" * 2000
        async with asyncio.timeout(timeout(30)):
            while session.close_code is None:
                await sender.send({"type": "chat", "room": "lobby", "message": body})
                await asyncio.sleep(0.001)
        # It reads again at once: everything already sent, then the close frame, in time.
        assert await slow.close_code(wait_seconds=10) == 4008
        await sender.close()
        await reader


async def test_an_accepted_connection_keeps_no_copy_of_its_token(gateway: Gateway) -> None:
    """A heap dump of a running gateway must not hand out every client's token: once
    accepted, neither the ASGI scope nor Quart's websocket object keeps the request's headers
    or query string (the token is in one of them)."""
    in_header = gateway.token("alice")
    in_query = gateway.token("bob")
    alice = await gateway.connect(in_header)
    bob = await gateway.connect(url=f"{gateway.url}?access_token={in_query}")
    for ws in (alice, bob):
        assert json.loads(await ws.recv())["type"] == "welcome"
    sessions = list(gateway.services.sessions.values())
    assert len(sessions) == 2
    for session in sessions:
        control = session.outbox.sink
        assert isinstance(control, TransportControl)
        scope = control._stream.scope  # type: ignore[union-attr]
        assert (scope["headers"], scope["query_string"]) == ([], b"")
    # type(), not isinstance(): a dead weak proxy among the objects raises on isinstance().
    websockets_objects = [o for o in gc.get_objects() if issubclass(type(o), Websocket)]
    assert len(websockets_objects) >= 2
    for ws_object in websockets_objects:
        assert not ws_object.headers and ws_object.query_string == b""
        assert "args" not in ws_object.__dict__
    # ...and the connections work as before.
    await alice.send(json.dumps({"type": "ping"}))
    assert json.loads(await alice.recv())["type"] == "pong"
    await alice.close()
    await bob.close()
