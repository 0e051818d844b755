"""Hypercorn 0.18, with the defects that matter to a public-facing gateway fixed.

1. **permessage-deflate is accepted unconditionally** (``Handshake.accept`` hard-codes
   ``PerMessageDeflate()``). Every browser offers it; it costs CPU on every delivery, memory
   per connection, and invites decompression bombs. :class:`GatewayWSStream` removes the
   client's ``Sec-WebSocket-Extensions`` offer unless ``GATEWAY_PERMESSAGE_DEFLATE`` is on, so
   the handshake answers without the extension (RFC 6455 section 9.1).
2. **The size cap counts characters** (``WebsocketBuffer`` adds ``len(str)``): a message of
   4-byte characters passes at four times the cap. :class:`ByteCountingBuffer` counts UTF-8
   bytes.
3. **An over-cap message leaves the socket open**: after sending close 1009, ``_handle_events``
   stops with events still queued and never ends the stream, so a client that keeps sending
   fragments holds the connection. Here the stream ends (the TCP connection is closed) right
   after the 1009 close frame, whose reason is the one docs/protocol.md gives (Hypercorn's
   has none).
4. **A closed connection lingers** until its ping task wakes from a full ping interval (20 s
   here), which also holds up a graceful shutdown. Here the ping task wakes when the stream
   ends.

5. **A protocol error found by wsproto** (invalid UTF-8, a bad frame) ends the TCP connection
   without a close frame, so the client never learns 1007 or 1002. Here the close frame is
   sent first, with the reason docs/protocol.md gives (1007: ``invalid UTF-8``, not Python's
   decoder message); the app finds what was refused in :attr:`TransportControl.refused`.
6. **The access-log record carries every request header and the query string** in its
   ``args`` (``AccessLogAtoms``), so an ``Authorization`` header or an ``access_token`` reaches
   any handler that looks past the formatted line. :class:`SafeAccessLogger` hands the log
   record only the atoms in :data:`SAFE_ACCESS_ATOMS`.
7. **A TLS peer that sends data after our close_notify** makes ``TCPServer._close`` raise
   ``ssl.SSLError`` out of the connection task: logged as an unhandled error per connection,
   and at shutdown it escapes ``serve()`` and aborts the graceful stop; so does a connection
   the kernel gave up on while its buffer flushed (``ETIMEDOUT``, a reset). The connection is
   closed either way; :class:`GatewayTCPServer` says so quietly.
8. **The client's close code never reaches the app**: ``websocket.disconnect`` carries 1000
   when the app had closed and 1006 otherwise, so a client's close 1000 or 4000 looks like a
   dropped connection, and a frame refused by the WebSocket layer (1009, 1007) looks the same.
   Here the event carries the code of the close frame that ended the connection (RFC 6455
   section 7.1.5), when the app had not closed it itself.
9. **A closing connection can live for ever**: closing the transport waits until its buffer
   is flushed, and a client that does not read never lets it flush; a client that keeps
   sending after the app ended blocks the reader on the app's full queue. So a client closed
   with 4008 (too slow), 4001 or 1001 kept its socket, its tasks and megabytes of unsent data.
   Here, once a WebSocket starts closing (a close frame either way, the app ending), its TCP
   connection is aborted with a reset if it has not ended within
   :data:`CLOSE_TIMEOUT_SECONDS` (:data:`SOCKET_CLOSE_TIMEOUT_SECONDS` for any other connection
   the server closes), input for an app that has ended is dropped, and the transport's write
   buffer is capped at :data:`WRITE_BUFFER_HIGH_BYTES` (asyncio's TLS default is 512 KiB).
10. **Control frames and fragments bypass every limit**: Hypercorn answers each Ping itself
   and an unfinished fragment only extends a buffer, so a flood of them never meets the app.
   Here each ping, pong and fragment that does not end a message is offered to the app's
   frame meter (:class:`TransportControl`), which counts it against the connection's rate
   limit: a ping over the limit is not answered, and repeated abuse stops the reading at once
   while the app closes the connection. A pong that answers one of our own pings is free.
11. **HTTP/2 is reachable although ALPN offers only http/1.1**: the HTTP/1.1 protocol switches
   to HTTP/2 on an ``h2c`` upgrade or the HTTP/2 preface (prior knowledge), and WebSockets then
   open over HTTP/2 streams (RFC 8441), a second, untested path. Here HTTP/1.1 never switches:
   an ``h2c`` upgrade is answered as if the header were absent (RFC 7540 section 3.2), and the
   preface is an HTTP/1.1 request like any other, refused.

12. **Every TLS connection holds a 256 KiB read buffer** (asyncio's ``SSLProtocol.max_size``,
   allocated zero-filled, so resident, for each connection at its start): a TLS connection
   cost 320 KiB of memory where a plain one costs 37. A TLS record is at most 16 KiB: the
   buffer is :data:`TLS_READ_BUFFER_BYTES` here (a larger inflow takes more reads, no more).

:func:`install` points Hypercorn at the fixed HTTP/1.1 protocol, stream and TCP server;
server.py calls it and sets :class:`SafeAccessLogger`.
``pyproject.toml`` pins Hypercorn 0.18.*, and the end-to-end tests (tests/e2e/) prove each fix
on a real socket, so an upgrade that changes these internals fails loudly.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import dataclasses
import socket
import ssl
import struct
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from io import BytesIO, StringIO
from types import TracebackType
from typing import Any, cast

import hypercorn.asyncio.run
import hypercorn.asyncio.task_group as hypercorn_task_group
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.protocol.h11
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.logging import AccessLogAtoms, Logger
from hypercorn.protocol.events import Data, Event, Request, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import (
    ASGIWebsocketState,
    FrameTooLargeError,
    WebsocketBuffer,
    WSStream,
)
from hypercorn.typing import ResponseSummary, WWWScope
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.events import Event as WSProtoEvent

from gateway.errors import CLOSE_REASONS, CloseCode
from gateway.outbox import Offer, Outgoing, text_frame
from gateway.primitives import LeanQueue
from gateway.ratelimit import Verdict

__all__ = [
    "CLOSE_TIMEOUT_SECONDS",
    "COALESCE_LAG_SECONDS",
    "SAFE_ACCESS_ATOMS",
    "SOCKET_CLOSE_TIMEOUT_SECONDS",
    "TLS_READ_BUFFER_BYTES",
    "TRANSPORT_EXTENSION",
    "WRITE_BUFFER_HIGH_BYTES",
    "ByteCountingBuffer",
    "FrameMeter",
    "GatewayH11Protocol",
    "GatewayTCPServer",
    "GatewayWSStream",
    "SafeAccessLogger",
    "TransportControl",
    "WriteCoalescing",
    "install",
]

#: From the moment a WebSocket starts closing (a close frame sent or received, or the app
#: ending) to the abort of its TCP connection if it has not ended by itself: time for the
#: close frame to reach a client that reads, and the close handshake to finish.
CLOSE_TIMEOUT_SECONDS = 2.0
#: The same bound for any other connection the server closes (an HTTP connection at the end
#: of keep-alive, after an error): longer, so that a slow client still gets a response's end.
SOCKET_CLOSE_TIMEOUT_SECONDS = 10.0
#: A connection's transport buffer above which its writers wait (``drain``). With the
#: outbox's bound, what a connection holds unsent in the process; the kernel's socket buffer
#: comes on top, and is freed by the abort's reset.
WRITE_BUFFER_HIGH_BYTES = 64 * 1024
#: The encrypted bytes one read of a TLS connection takes at most (asyncio allocates this much
#: per connection, at once: fix 12). Two TLS records.
TLS_READ_BUFFER_BYTES = 32 * 1024
#: The ASGI scope extension where the app finds its WebSocket's :class:`TransportControl`
#: (a namespaced key, as the ASGI specification allows servers to add).
TRANSPORT_EXTENSION = "gateway.transport"
#: The event loop's sustained lag from which broadcasts' writes are coalesced (_Cork): a loop
#: this late has frames from several publishers to hand each connection in one turn.
COALESCE_LAG_SECONDS = 0.005
#: RFC 6455 section 5: a frame that is not the last of its message.
_FRAGMENT = "fragment"
#: What to log of a protocol error wsproto found, by close code, where its own message would
#: carry a piece of the frame (a decoder's message names the byte it could not decode).
_PROTOCOL_ERRORS = {int(CloseCode.INVALID_PAYLOAD): "a text frame or close reason not in UTF-8"}

#: A WebSocket's frame meter: told of each ``ping``, ``pong`` and ``fragment`` frame, it
#: answers whether to act on it (:class:`~gateway.ratelimit.Verdict`).
FrameMeter = Callable[[str], Verdict]

#: The TCP connection being served, for the streams it carries (set by
#: :meth:`GatewayTCPServer.run`; the tasks it spawns inherit it).
_SERVING: ContextVar[GatewayTCPServer | None] = ContextVar("gateway_serving", default=None)

#: Access-log atoms that hold no credential: address, request line without the query string,
#: status, sizes, timings. Not the headers, not ``R``/``Uq``/``q`` (query), not environ.
SAFE_ACCESS_ATOMS = ("h", "r", "s", "st", "m", "U", "H", "S", "b", "B", "T", "D", "L")


class ByteCountingBuffer(WebsocketBuffer):
    """Hypercorn's message buffer, with the cap counted in UTF-8 bytes."""

    def extend(self, event: Message[Any]) -> None:
        text = isinstance(event, TextMessage)
        if self.value is None:
            self.value = StringIO() if text else BytesIO()
        self.value.write(event.data)
        self.length += len(event.data.encode("utf-8", "surrogatepass")) if text else len(event.data)
        if self.length > self.max_length:
            raise FrameTooLargeError()


class _Cork:
    """The transports given frames in this turn of the event loop, written once at its end.

    While :attr:`active` (the loop is busy: :class:`WriteCoalescing`), a broadcast hands each
    recipient's :class:`TransportControl` its frame; the control holds it and joins this list,
    and one callback, at the end of the turn, writes what each holds with one ``write`` (one
    ``send`` system call). When several broadcasts reach a connection in one turn (publishers
    whose frames arrived together: more of them the busier the server), they cost one system
    call, not one each. While the loop keeps up, frames are written at once: holding a lone
    frame for a turn would only add a turn of latency (and its cost) to every broadcast.
    """

    __slots__ = ("__weakref__", "_held", "_loop", "_scheduled", "active")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[TransportControl] = []
        self._scheduled = False
        self.active = False

    def add(self, control: TransportControl) -> None:
        self._held.append(control)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        held, self._held = self._held, []
        for control in held:
            control.flush()


_CORKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Cork] = weakref.WeakKeyDictionary()


def _cork() -> _Cork:
    """The running loop's :class:`_Cork`."""
    loop = asyncio.get_running_loop()
    cork = _CORKS.get(loop)
    if cork is None:
        cork = _CORKS[loop] = _Cork(loop)
    return cork


#: One batch's frame, shared by every connection whose batch held the same frames: built once
#: per :meth:`_Batcher.flush`, keyed by the identities of the frames (kept alive beside it).
_SharedBatches = dict[tuple[int, ...], tuple[bytes, list[Outgoing]]]


class _Batcher:
    """The connections of batched delivery (docs/protocol.md, Batched delivery) holding
    broadcasts, written together once ``window`` seconds have passed since the first.

    Every connection that got its first held frame in one window is flushed by one timer; the
    members of a room then hold the same frames, so their batch (a JSON array) is built once
    and the same bytes are written to each (:data:`_SharedBatches`): one system call per
    connection for every frame of the window, and nothing serialized per recipient.
    """

    __slots__ = ("__weakref__", "_handle", "_held", "_loop", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self._loop = loop
        self._held: list[TransportControl] = []
        self._handle: asyncio.Handle | None = None
        self.window = window

    def add(self, control: TransportControl) -> None:
        self._held.append(control)
        if self._handle is None:
            if self.window > 0:
                self._handle = self._loop.call_later(self.window, self.flush)
            else:
                self._handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._handle = None
        held, self._held = self._held, []
        shared: _SharedBatches = {}
        for control in held:
            control.flush(shared)


_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Batcher]] = (
    weakref.WeakKeyDictionary()
)


def _batcher(window: float) -> _Batcher:
    """The running loop's :class:`_Batcher` for ``window`` seconds."""
    loop = asyncio.get_running_loop()
    batchers = _BATCHERS.get(loop)
    if batchers is None:
        batchers = _BATCHERS[loop] = {}
    batcher = batchers.get(window)
    if batcher is None:
        batcher = batchers[window] = _Batcher(loop, window)
    return batcher


def batch_frame(items: list[Outgoing]) -> bytes:
    """One text frame holding ``items`` as a JSON array, in order (each item is a JSON
    object's text, so joining them with commas inside brackets is the array)."""
    return text_frame(b"[" + b",".join([item.payload for item in items]) + b"]")


class WriteCoalescing:
    """Coalesces the broadcasts' writes while the event loop lags (a
    :class:`gateway.load.LoadObserver`): on at :data:`COALESCE_LAG_SECONDS` of sustained lag,
    off below it."""

    def __init__(self, threshold_seconds: float = COALESCE_LAG_SECONDS) -> None:
        self.threshold_seconds = threshold_seconds

    def loop_lag(self, seconds: float, overloaded: bool) -> None:
        _cork().active = seconds >= self.threshold_seconds


class TransportControl:
    """What a WebSocket app may do beyond ASGI: meter the frames the server answers itself, and
    write whole frames straight to the transport (the fast path of a broadcast).

    Found in the scope, ``scope["extensions"][TRANSPORT_EXTENSION]``, once the app runs. It is
    a :class:`gateway.outbox.Sink` when :attr:`can_write`.

    Writing below Hypercorn is safe because Hypercorn itself writes whole frames with one
    ``write`` each (pings, pongs, close) and never fragments what it sends, so frames never
    interleave; a data frame is written only while the handshake is done, the stream open and
    the WebSocket OPEN (never after a close frame, either way); server frames are unmasked, and
    may be uncompressed even when permessage-deflate was negotiated (RSV1 clear, RFC 7692
    section 6), so wsproto's state is untouched.

    Attributes:
        frame_meter: set by the app; called for every ping, pong and fragment (a frame that
            does not end its message) the client sends. ``ACCEPT``: handle it; ``REFUSE``: a
            ping is not answered; ``CLOSE``: the app is closing the connection for abuse, and
            nothing more is read from it.
        refused: set by the stream when it closed the connection for a frame it refused
            before the app saw it: ``(code, reason sent, why)``.
    """

    __slots__ = (
        "_batcher",
        "_cork",
        "_held",
        "_held_bytes",
        "_server",
        "_stream",
        "_transport",
        "frame_meter",
        "open",
        "refused",
    )

    def __init__(
        self, stream: GatewayWSStream | None = None, server: GatewayTCPServer | None = None
    ) -> None:
        self.frame_meter: FrameMeter | None = None
        self._stream = stream
        self._server = server
        self._transport = server.writer.transport if server is not None else None
        self._cork = _cork() if server is not None else None
        #: Set by :meth:`batch`: broadcasts are held for its window, then written as one frame.
        self._batcher: _Batcher | None = None
        #: Frames offered and not written yet: in this turn of the loop (_Cork), or in this
        #: batch's window (_Batcher).
        self._held: list[Outgoing] | None = None
        self._held_bytes = 0
        #: True from the accept until the WebSocket starts closing (a close frame either way,
        #: the stream or the app ending): data frames may be written only then. The stream
        #: keeps it, so a write costs no state lookups.
        self.open = False
        #: Set when this layer closed the connection for a frame it refused (1009 over the
        #: size cap, 1007 invalid UTF-8, 1002 a framing error), before the app saw it: the
        #: close code, the reason sent, and what was wrong (for the app's log, never sent).
        self.refused: tuple[int, str, str] | None = None

    def meter(self, kind: str) -> Verdict:
        meter = self.frame_meter
        return Verdict.ACCEPT if meter is None else meter(kind)

    @property
    def can_write(self) -> bool:
        """Whether this connection's transport is within reach (Hypercorn's asyncio worker)."""
        return self._stream is not None and self._server is not None

    def batch(self, window_seconds: float) -> None:
        """From now on hold broadcasts for up to ``window_seconds`` (0: to the end of the
        loop's turn) and write what a window held as one frame, a JSON array (the client
        negotiated batched delivery). Replies are not held: each goes out at once, after
        whatever was held."""
        self._batcher = _batcher(window_seconds)

    @property
    def batching(self) -> bool:
        return self._batcher is not None

    def write(self, frame: bytes) -> bool:
        """Write one whole server frame now, after any held (a transport write never blocks);
        False, writing nothing, when the WebSocket is no longer open."""
        transport = self._transport
        if not self.open or transport is None:
            return False
        self.flush()
        transport.write(frame)
        return True

    def offer(self, item: Outgoing) -> Offer:
        """Write ``item``'s frame now (while the loop is busy: at the end of this turn, with
        whatever else this connection gets in it, :class:`_Cork`; with batched delivery, a
        broadcast at the end of its window, :class:`_Batcher`), unless the WebSocket is
        closing (CLOSED) or the transport's buffer and what is held reach
        :data:`WRITE_BUFFER_HIGH_BYTES` (FULL: queue it): the hot path of a broadcast, with no
        state lookups beyond two flags and the buffer's size."""
        transport = self._transport
        cork = self._cork
        if not self.open or transport is None or cork is None:
            return Offer.CLOSED
        held = self._held
        if held is None:
            if transport.get_write_buffer_size() >= WRITE_BUFFER_HIGH_BYTES:
                return Offer.FULL
            batcher = self._batcher
            if batcher is None:
                if not cork.active:
                    transport.write(item.frame)
                    return Offer.WRITTEN
                cork.add(self)
            elif item.is_reply:
                transport.write(item.frame)
                return Offer.WRITTEN
            else:
                batcher.add(self)
            self._held = [item]
            self._held_bytes = item.size_bytes
            return Offer.WRITTEN
        if self._held_bytes + transport.get_write_buffer_size() >= WRITE_BUFFER_HIGH_BYTES:
            return Offer.FULL
        held.append(item)
        self._held_bytes += item.size_bytes
        if item.is_reply and self._batcher is not None:
            self.flush()  # a reply is not kept waiting: the batch so far goes with it
        return Offer.WRITTEN

    def flush(self, shared: _SharedBatches | None = None) -> None:
        """Write what is held, with one ``write``: one frame each, or with batched delivery
        one JSON array (built once for every connection that held the same frames, through
        ``shared``); dropped when the transport is closing (the connection is lost: nobody
        would read it)."""
        held = self._held
        if held is None:
            return
        self._held = None
        self._held_bytes = 0
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if len(held) == 1:
            transport.write(held[0].frame)
        elif self._batcher is None:
            transport.write(b"".join([item.frame for item in held]))
        elif shared is None:
            transport.write(batch_frame(held))
        else:
            key = tuple(map(id, held))
            entry = shared.get(key)
            if entry is None:
                entry = shared[key] = (batch_frame(held), held)
            transport.write(entry[0])

    def close(self) -> None:
        """The WebSocket starts closing: what is held goes out first, then no more data."""
        self.flush()
        self.open = False

    async def drained(self) -> None:
        """Until the transport's buffer is back under its low-water mark.

        Raises:
            ConnectionError: the connection was lost.
        """
        if self._server is not None:
            await self._server.writer.drain()


class _LeanAppQueues:
    """Hypercorn 0.18's per-connection :class:`TaskGroup`, spawning the app with a
    :class:`~gateway.primitives.LeanQueue` for its events instead of an ``asyncio.Queue`` (four
    deques, about 3 KiB, for every idle connection). ``spawn_app`` is Hypercorn's, but for the
    queue."""

    def __init__(self, group: TaskGroup) -> None:
        self._group = group

    async def spawn_app(
        self,
        app: Any,
        config: Any,
        scope: Any,
        send: Callable[[Any], Awaitable[None]],
    ) -> Callable[[Any], Awaitable[None]]:
        app_queue: LeanQueue[Any] = LeanQueue(config.max_app_queue_size)
        loop = asyncio.get_running_loop()

        def _call_soon(func: Callable[..., Any], *args: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(func(*args), loop).result()

        self._group.spawn(
            hypercorn_task_group._handle,
            app,
            config,
            scope,
            app_queue.get,
            send,
            partial(loop.run_in_executor, None),
            _call_soon,
        )
        return app_queue.put

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        self._group.spawn(func, *args)

    async def __aenter__(self) -> _LeanAppQueues:
        await self._group.__aenter__()
        return self

    async def __aexit__(self, exc_type: type, exc_value: BaseException, tb: TracebackType) -> None:
        await self._group.__aexit__(exc_type, exc_value, tb)


class GatewayWSStream(WSStream):
    """See the module docstring: no unrequested deflate, byte caps, 1009 really closes, no
    lingering after close, the close code reaches the app, control frames are metered."""

    permessage_deflate = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ByteCountingBuffer(self.config.websocket_max_message_size)
        if isinstance(self.task_group, TaskGroup):
            self.task_group = _LeanAppQueues(self.task_group)
        #: The next ping, a timer rather than a task sleeping for it (None: none due).
        self._ping_timer: asyncio.TimerHandle | None = None
        #: The code of the close frame that ended the connection when the app did not close it:
        #: the client's, or ours for a frame the WebSocket layer refused.
        self._close_code: int | None = None
        self._server = _SERVING.get()
        self.control = TransportControl(self, self._server)
        #: False once the frame meter said CLOSE: the client's bytes are dropped unread.
        self._reading = True
        #: The queue the app reads its events from, and whether the app has ended.
        self._app_queue: asyncio.Queue[Any] | LeanQueue[Any] | None = None
        self._app_ended = False
        #: Our pings not answered yet: a pong for one of them is not the client's doing.
        self._pings_unanswered = 0

    def _closing(self) -> None:
        """The WebSocket is closing: no more data frames; its TCP connection ends within
        CLOSE_TIMEOUT_SECONDS."""
        self.control.close()
        if self._server is not None:
            self._server.close_within(CLOSE_TIMEOUT_SECONDS)

    async def _send_wsproto_event(self, event: WSProtoEvent) -> None:
        if isinstance(event, CloseConnection):
            self._closing()  # before the write, which waits while the client does not read
        await super()._send_wsproto_event(event)

    async def app_send(self, message: Any) -> None:
        if message is None:  # the app has ended: nothing will read its queue any more
            self._app_ended = True
            self._closing()
            self._drop_app_input()
        await super().app_send(message)
        if (
            message is not None
            and message["type"] == "websocket.accept"
            and self.state is ASGIWebsocketState.CONNECTED
            and not self.closed
        ):
            self.control.open = True

    def _drop_app_input(self) -> None:
        queue = self._app_queue
        if queue is not None:
            while not queue.empty():  # wakes a reader blocked on the full queue
                queue.get_nowait()

    async def _put_for_app(self, message: dict[str, Any]) -> None:
        if self._app_ended or self.app_put is None:
            return
        await self.app_put(message)

    async def handle(self, event: Event) -> None:
        if isinstance(event, Data) and not self._reading:
            return
        if isinstance(event, Request) and not self.permessage_deflate:
            headers = [(n, v) for n, v in event.headers if n.lower() != b"sec-websocket-extensions"]
            event = dataclasses.replace(event, headers=headers)
        if isinstance(event, StreamClosed):
            self._closing()
            if self._app_ended:
                self.closed = True
                self._stop_pings()
                return
        if (
            isinstance(event, StreamClosed)
            and not self.closed
            and self.app_put is not None
            and self._close_code is not None
            and self.state not in {ASGIWebsocketState.HTTPCLOSED, ASGIWebsocketState.CLOSED}
        ):
            # Hypercorn's StreamClosed branch, with the real code instead of 1006.
            self.closed = True
            await self.app_put({"type": "websocket.disconnect", "code": self._close_code})
        else:
            await super().handle(event)
        if isinstance(event, Request) and self.app_put is not None:
            # The app looks for it once it has accepted, long after this.
            extensions = cast(dict[str, Any], self.scope["extensions"])
            extensions[TRANSPORT_EXTENSION] = self.control
            queue = getattr(self.app_put, "__self__", None)
            if isinstance(queue, asyncio.Queue | LeanQueue):
                self._app_queue = queue
        if self.closed:
            self._stop_pings()

    async def _send_pings(self) -> None:
        # Hypercorn sleeps the whole interval between pings in a task of its own, so a closed
        # connection's task (and with it the TCP server task) lingered up to
        # GATEWAY_PING_INTERVAL_SECONDS and held up shutdown, and every idle connection kept a
        # sleeping task. Here: a timer per ping, cancelled when the stream ends; this task ends
        # at once. The first ping is one interval after the accept, not at once as Hypercorn
        # sends it: a connection just made needs no keepalive, and a client still writing its
        # first frame would answer the ping in the middle of it (Autobahn's 6.4.3 and 6.4.4 do).
        self._schedule_ping()

    async def _ping(self) -> None:
        if self.closed:
            return
        self._pings_unanswered += 1
        await self._send_wsproto_event(Ping())
        self._schedule_ping()

    def _schedule_ping(self) -> None:
        if not self.closed and self.config.websocket_ping_interval is not None:
            loop = asyncio.get_running_loop()
            self._ping_timer = loop.call_later(self.config.websocket_ping_interval, self._ping_due)

    def _ping_due(self) -> None:
        self._ping_timer = None
        if not self.closed:
            self.task_group.spawn(self._ping)

    def _stop_pings(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    async def _handle_events(self) -> None:
        # Hypercorn 0.18's loop, except that an over-cap message ends the stream, control frames
        # and fragments are metered, and an app that has ended gets nothing.
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    self.buffer.clear()
                    await self._refuse(
                        CloseCode.MESSAGE_TOO_BIG, f"a message over {self.buffer.max_length} bytes"
                    )
                    await self.send(StreamClosed(stream_id=self.stream_id))
                    return
                if event.message_finished:
                    await self._put_for_app(self.buffer.to_message())
                    self.buffer.clear()
                elif event.frame_finished and not self._metered(_FRAGMENT):
                    return
            elif isinstance(event, Ping):
                verdict = self.control.meter("ping")
                if verdict is Verdict.ACCEPT:
                    await self._send_wsproto_event(event.response())
                elif verdict is Verdict.CLOSE:
                    self._reading = False
                    return
            elif isinstance(event, Pong):
                if self._pings_unanswered:
                    self._pings_unanswered -= 1
                elif not self._metered("pong"):
                    return
            elif isinstance(event, CloseConnection):
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    self._close_code = event.code  # the client closed first
                    await self._send_wsproto_event(event.response())
                elif self.connection.state == ConnectionState.OPEN:
                    # wsproto reports a protocol error it found (1007 invalid UTF-8, 1002) as
                    # a close event without sending one; tell the client why (RFC 6455 7.1.7).
                    why = _PROTOCOL_ERRORS.get(event.code) or event.reason or "protocol error"
                    await self._refuse(event.code, why)
                await self.send(StreamClosed(stream_id=self.stream_id))

    async def _refuse(self, code: int, why: str) -> None:
        """Close for a frame this layer refused, before the app saw it: with the reason
        docs/protocol.md gives the code (:data:`gateway.errors.CLOSE_REASONS`; wsproto's own
        for a code the table lacks, 1002), never a decoder's message. The code reaches the app
        in the disconnect event, and ``why`` (for its log) in :attr:`TransportControl.refused`."""
        try:
            reason = CLOSE_REASONS[CloseCode(code)]
        except (ValueError, KeyError):
            reason = why
        self._close_code = code
        self.control.refused = (code, reason, why)
        await self._send_wsproto_event(CloseConnection(code=code, reason=reason))

    def _metered(self, kind: str) -> bool:
        """Offer a frame the app never sees to its meter; False when reading must stop."""
        if self.control.meter(kind) is Verdict.CLOSE:
            self._reading = False
            return False
        return True


class GatewayH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, which never switches to HTTP/2."""

    async def _check_protocol(self, event: Any) -> None:
        # Hypercorn raises here to switch on "Upgrade: h2c" or the "PRI *" preface. Neither:
        # the upgrade is ignored (RFC 7540 section 3.2), the preface is a request like others.
        return None


class GatewayTCPServer(TCPServer):
    """Hypercorn's asyncio connection: a bounded write buffer, an abort when closing takes too
    long, and a quiet close when the TLS peer misbehaves at the end."""

    _abort_handle: asyncio.TimerHandle | None = None
    #: The socket, taken while the transport is open (a TLS transport forgets it once closed;
    #: a closed socket object refuses options, so a reused descriptor is never touched).
    _socket: Any = None

    async def run(self) -> None:
        _SERVING.set(self)  # this task's context: the streams and app tasks inherit it
        self._socket = self.writer.get_extra_info("socket")
        self.writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        try:
            await super().run()
        finally:
            if self._abort_handle is not None:
                self._abort_handle.cancel()

    def close_within(self, seconds: float) -> None:
        """Abort the connection unless it has ended ``seconds`` from now (or an earlier
        deadline set before).

        Two clocks: ours aborts the transport while it still holds the socket; the kernel's
        (``TCP_USER_TIMEOUT``) drops the connection once its unsent data has made no progress
        for ``seconds``, also after the socket was closed gracefully and the kernel alone
        still holds data the client does not read.
        """
        deadline = self.loop.time() + seconds
        handle = self._abort_handle
        if handle is not None:
            if handle.when() <= deadline:
                return
            handle.cancel()
        self._abort_handle = self.loop.call_at(deadline, self.abort)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            self._set_option(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000))
            )

    def abort(self) -> None:
        """End the TCP connection now, with a reset: the kernel drops what it still holds for
        the client instead of keeping the socket until the client reads it."""
        self._set_option(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def _set_option(self, level: int, option: int, value: int | bytes) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # closed already, or not TCP (a Unix socket)
                self._socket.setsockopt(level, option, value)

    async def _close(self) -> None:
        # Closing waits for the write buffer to flush: not for ever.
        self.close_within(SOCKET_CLOSE_TIMEOUT_SECONDS)
        # The transport is closed whether or not the peer's close_notify dance was clean, or
        # the kernel gave up on the connection (ETIMEDOUT, a reset) while it flushed.
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):
            await super()._close()


class SafeAccessLogger(Logger):
    """Hypercorn's logger, with access-log records that carry no credential."""

    def atoms(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> dict[str, str]:
        every = AccessLogAtoms(request, response, request_time)
        return {name: every[name] for name in SAFE_ACCESS_ATOMS}


def install(*, permessage_deflate: bool) -> None:
    """Make Hypercorn use :class:`GatewayH11Protocol`, :class:`GatewayWSStream` and
    :class:`GatewayTCPServer`."""
    GatewayWSStream.permessage_deflate = permessage_deflate
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES
    hypercorn.protocol.H11Protocol = GatewayH11Protocol  # type: ignore[attr-defined]
    hypercorn.protocol.h11.WSStream = GatewayWSStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = GatewayWSStream  # type: ignore[attr-defined]
    hypercorn.asyncio.run.TCPServer = GatewayTCPServer  # type: ignore[attr-defined]
