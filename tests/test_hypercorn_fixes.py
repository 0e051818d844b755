"""Unit tests of gateway.hypercorn_fixes' WebSocket stream, driven event by event without a
socket (the end-to-end tests in tests/e2e/ prove each fix on a real one)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any, cast

import hypercorn.asyncio.task_group as hypercorn_task_group
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.protocol.events import Data, Event, Request, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage
from wsproto.events import Event as WSEvent

from gateway.hypercorn_fixes import (
    COALESCE_LAG_SECONDS,
    TRANSPORT_EXTENSION,
    WRITE_BUFFER_HIGH_BYTES,
    GatewayWSStream,
    TransportControl,
    WriteCoalescing,
)
from gateway.outbox import Offer, Outgoing, text_frame
from gateway.ratelimit import Verdict
from tests.helpers import timeout

UPGRADE_HEADERS = [
    (b"host", b"localhost"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),  # RFC 6455 section 1.3's example
    (b"sec-websocket-version", b"13"),
]


class FakeTaskGroup:
    """Spawns no app: the test plays it, through the queue the stream fills."""

    def __init__(self, queue_size: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)

    async def spawn_app(
        self, app: object, config: object, scope: object, send: object
    ) -> Callable[[dict[str, Any]], Awaitable[None]]:
        return self.queue.put

    def spawn(self, func: Callable[..., object], *args: object) -> None:
        raise AssertionError("nothing else is spawned with pings off")


class Harness:
    """A GatewayWSStream past the upgrade, and the client end of its frames."""

    def __init__(self, queue_size: int = 4) -> None:
        self.sent: list[Event] = []
        self.tasks = FakeTaskGroup(queue_size)
        config = Config()
        config.websocket_ping_interval = None
        self.stream = GatewayWSStream(
            None, config, None, self.tasks, False, ("127.0.0.1", 5), None, self.send, 1
        )
        self.client = Connection(ConnectionType.CLIENT)

    async def send(self, event: Event) -> None:
        self.sent.append(event)

    async def open(self) -> None:
        request = Request(
            stream_id=1,
            headers=UPGRADE_HEADERS,
            http_version="1.1",
            method="GET",
            raw_path=b"/ws",
            state={},  # type: ignore[arg-type]
        )
        await self.stream.handle(request)
        await self.stream.app_send({"type": "websocket.accept"})
        assert (await self.tasks.queue.get())["type"] == "websocket.connect"

    def frames(self, *events: WSEvent) -> Data:
        return Data(stream_id=1, data=b"".join(self.client.send(e) for e in events))

    def pongs(self) -> int:
        """Pong frames the stream wrote (each a Data event of 2 bytes: opcode 0xA, empty)."""
        return sum(1 for e in self.sent if isinstance(e, Data) and e.data[:1] == b"\x8a")


async def test_the_app_finds_the_transport_control_in_the_scope() -> None:
    h = Harness()
    await h.open()
    extensions = cast(dict[str, object], h.stream.scope["extensions"])
    assert extensions[TRANSPORT_EXTENSION] is h.stream.control


async def test_pings_pongs_and_fragments_go_through_the_meter() -> None:
    h = Harness()
    await h.open()
    seen: list[str] = []
    verdicts = iter([Verdict.ACCEPT, Verdict.REFUSE, Verdict.ACCEPT, Verdict.ACCEPT])

    def meter(kind: str) -> Verdict:
        seen.append(kind)
        return next(verdicts)

    h.stream.control.frame_meter = meter
    await h.stream.handle(h.frames(Ping(b"a"), Ping(b"b"), Pong(b"")))
    assert (seen, h.pongs()) == (["ping", "ping", "pong"], 1)  # the refused ping: no answer
    # A message in three frames: two fragments metered, the last one ends it (the app's).
    parts = [TextMessage("ab", message_finished=False), TextMessage("cd", message_finished=False)]
    verdicts = iter([Verdict.ACCEPT] * 2)
    await h.stream.handle(h.frames(*parts, TextMessage("ef")))
    assert seen[3:] == ["fragment", "fragment"]
    assert (await h.tasks.queue.get())["text"] == "abcdef"


async def test_a_close_verdict_stops_the_reading_at_once() -> None:
    h = Harness()
    await h.open()
    calls: list[str] = []

    def meter(kind: str) -> Verdict:
        calls.append(kind)
        return Verdict.CLOSE

    h.stream.control.frame_meter = meter
    await h.stream.handle(h.frames(*[Ping(b"") for _ in range(1000)]))
    await h.stream.handle(h.frames(Ping(b""), TextMessage('{"type":"ping"}')))
    assert (calls, h.pongs(), h.tasks.queue.qsize()) == (["ping"], 0, 0)


async def test_input_for_an_app_that_has_ended_never_blocks_the_stream() -> None:
    # The app stopped reading (it is closing): the client keeps sending until the queue is
    # full and the stream's reader waits on it. When the app ends, nothing will ever read that
    # queue: the reader must be let go, and the stream close without waiting on it.
    h = Harness(queue_size=4)
    await h.open()
    messages = [TextMessage(f"m{i}") for i in range(10)]
    reader = asyncio.create_task(h.stream.handle(h.frames(*messages)))
    await asyncio.sleep(0.01)
    assert not reader.done() and h.tasks.queue.full()
    async with asyncio.timeout(timeout(1)):
        await h.stream.app_send(None)  # the app has ended
        await reader
        await h.stream.handle(StreamClosed(stream_id=1))
    assert h.stream.closed


def test_written_for_the_hypercorn_and_wsproto_it_reaches_into() -> None:
    # gateway/hypercorn_fixes.py subclasses Hypercorn 0.18's stream, protocol and TCP server,
    # overrides private methods and writes to the transport below them: an upgrade must be a
    # decision, with every fix reviewed (the e2e tests prove each on a real socket).
    assert version("hypercorn").startswith("0.18."), version("hypercorn")
    assert version("wsproto").startswith("1."), version("wsproto")
    for name in ("_handle_events", "_send_wsproto_event", "_send_pings", "app_send", "handle"):
        assert callable(getattr(WSStream, name)), name
    assert callable(TCPServer._close) and callable(H11Protocol._check_protocol)
    # _LeanAppQueues repeats TaskGroup.spawn_app around Hypercorn's own _handle.
    assert callable(hypercorn_task_group._handle) and callable(TaskGroup.spawn_app)


def item(text: str, *, reply: bool = False) -> Outgoing:
    """A broadcast's frame (it has a receipt time), or a direct reply's (it has none)."""
    return Outgoing(text, "chat", None if reply else 1.0)


def frame(text: str) -> bytes:
    return text_frame(text.encode())


async def test_the_control_writes_only_while_the_websocket_is_open() -> None:
    h = Harness()
    control = h.stream.control
    assert control.offer(item("")) is Offer.CLOSED  # no server here, and not accepted yet
    await h.open()
    assert control.open is True  # accepted
    await h.stream.handle(h.frames(CloseConnection(code=1000)))  # the client closes
    assert control.open is False
    assert control.write(b"\x81\x00") is False


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


class FakeWriter:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport


class FakeServer:
    def __init__(self) -> None:
        self.writer = FakeWriter(FakeTransport())


def open_control() -> tuple[TransportControl, FakeTransport]:
    server = FakeServer()
    control = TransportControl(None, cast(Any, server))
    control.open = True
    return control, server.writer.transport


def coalescing(active: bool) -> None:
    """Tell the running loop's writes that the loop lags (or not), as the load monitor does."""
    WriteCoalescing().loop_lag(COALESCE_LAG_SECONDS if active else 0.0, overloaded=False)


async def test_while_the_loop_keeps_up_each_frame_is_written_at_once() -> None:
    control, transport = open_control()
    coalescing(False)
    control.offer(item("1"))
    control.offer(item("2"))
    assert transport.writes == [frame("1"), frame("2")]


async def test_frames_offered_in_one_turn_of_a_busy_loop_go_out_in_one_write() -> None:
    coalescing(True)
    one, t1 = open_control()
    two, t2 = open_control()
    for n in range(3):
        assert one.offer(item(f"A{n}")) is Offer.WRITTEN
    assert two.offer(item("B")) is Offer.WRITTEN
    assert t1.writes == [] and t2.writes == []  # held until the end of this turn
    await asyncio.sleep(0)
    three = frame("A0") + frame("A1") + frame("A2")
    assert t1.writes == [three]  # one system call for three broadcasts, three frames
    assert t2.writes == [frame("B")]
    assert one.offer(item("C")) is Offer.WRITTEN  # the next turn: a write of its own
    await asyncio.sleep(0)
    assert t1.writes == [three, frame("C")]
    coalescing(False)  # the loop caught up: at once again
    one.offer(item("D"))
    assert t1.writes == [three, frame("C"), frame("D")]


async def test_held_frames_count_toward_the_buffer_limit() -> None:
    control, transport = open_control()
    coalescing(True)
    transport.buffered = WRITE_BUFFER_HIGH_BYTES - 5
    assert control.offer(item("x" * 6)) is Offer.WRITTEN
    assert control.offer(item("y" * 6)) is Offer.FULL  # 6 held + the buffer reach the mark
    await asyncio.sleep(0)
    assert transport.writes == [frame("x" * 6)]


async def test_what_is_held_goes_before_anything_written_after_it_and_before_a_close() -> None:
    control, transport = open_control()
    coalescing(True)
    control.offer(item("1"))
    assert control.write(frame("2")) is True  # the writer's path: the held frame first
    assert transport.writes == [frame("1"), frame("2")]
    control.offer(item("3"))
    control.close()  # the WebSocket starts closing: its data goes before the close frame
    assert transport.writes == [frame("1"), frame("2"), frame("3")]
    assert control.offer(item("4")) is Offer.CLOSED
    await asyncio.sleep(0)
    assert transport.writes == [frame("1"), frame("2"), frame("3")]


async def test_frames_held_for_a_lost_connection_are_dropped() -> None:
    control, transport = open_control()
    coalescing(True)
    control.offer(item("1"))
    transport.closing = True
    await asyncio.sleep(0)
    assert transport.writes == []


def batching(window_seconds: float) -> tuple[TransportControl, FakeTransport]:
    control, transport = open_control()
    control.batch(window_seconds)
    return control, transport


def messages(written: bytes) -> Any:
    """The JSON of one written text frame (unmasked, payload under 64 KiB)."""
    assert written[0] == 0x81
    length = written[1]
    start = 2 if length < 126 else 4
    return json.loads(written[start:])


def chat(n: int) -> Outgoing:
    return item(json.dumps({"type": "chat", "id": n}))


async def test_a_windows_broadcasts_go_out_as_one_array_built_once_for_the_room() -> None:
    coalescing(False)
    (one, t1), (two, t2) = batching(0.01), batching(0.01)
    first, second = chat(1), chat(2)
    for control in (one, two):
        assert control.offer(first) is Offer.WRITTEN
        assert control.offer(second) is Offer.WRITTEN
    await asyncio.sleep(0)
    assert t1.writes == [] and t2.writes == []  # held for the window, not just the turn
    await asyncio.sleep(0.05)
    assert messages(t1.writes[0]) == [{"type": "chat", "id": 1}, {"type": "chat", "id": 2}]
    assert t2.writes[0] is t1.writes[0]  # one array for every member that held the same
    assert len(t1.writes) == len(t2.writes) == 1


async def test_a_lone_broadcast_goes_as_its_own_frame_and_a_different_batch_as_its_own() -> None:
    (alone, t1), (sender, t2) = batching(0), batching(0)
    shared, echo = chat(1), item(json.dumps({"type": "chat", "id": 1, "ref": "r"}))
    alone.offer(shared)
    sender.offer(echo)  # the publisher's own copy carries its ref
    sender.offer(chat(2))
    await asyncio.sleep(0)  # a window of 0: the end of the turn
    assert t1.writes == [shared.frame]  # one message: a plain object, as without batching
    assert messages(t2.writes[0]) == [
        {"type": "chat", "id": 1, "ref": "r"},
        {"type": "chat", "id": 2},
    ]


async def test_a_reply_is_not_held_and_goes_after_the_broadcasts_held_before_it() -> None:
    control, transport = batching(10.0)
    pong = item(json.dumps({"type": "pong"}), reply=True)
    assert control.offer(pong) is Offer.WRITTEN
    assert transport.writes == [pong.frame]  # nothing held: at once, as a plain object
    control.offer(chat(1))
    control.offer(pong)
    assert [messages(w) for w in transport.writes[1:]] == [
        [{"type": "chat", "id": 1}, {"type": "pong"}]
    ]
    control.offer(chat(2))
    assert control.write(frame('{"type":"error"}')) is True  # the writer's path, in order
    control.offer(chat(3))
    control.close()  # closing: what is held goes before the close frame
    assert [messages(w) for w in transport.writes[2:]] == [
        {"type": "chat", "id": 2},
        {"type": "error"},
        {"type": "chat", "id": 3},
    ]
    assert control.offer(chat(4)) is Offer.CLOSED


async def test_a_batch_is_bounded_by_the_buffer_limit_and_dropped_for_a_lost_connection() -> None:
    control, transport = batching(0)
    transport.buffered = WRITE_BUFFER_HIGH_BYTES - 20
    assert control.offer(chat(1)) is Offer.WRITTEN
    assert control.offer(chat(2)) is Offer.FULL  # held + buffered reach the mark: queue it
    await asyncio.sleep(0)
    assert transport.writes == [chat(1).frame]
    control.offer(chat(3))
    transport.closing = True
    await asyncio.sleep(0)
    assert len(transport.writes) == 1


def test_install_bounds_the_read_buffer_asyncio_gives_each_tls_connection() -> None:
    import asyncio.sslproto

    from gateway.hypercorn_fixes import TLS_READ_BUFFER_BYTES, install

    install(permessage_deflate=False)
    assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER_BYTES == 32 * 1024
