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
   after the 1009 close frame.
4. **A closed connection lingers** until its ping task wakes from a full ping interval (20 s
   here), which also holds up a graceful shutdown. Here the ping task wakes when the stream
   ends.

5. **A protocol error found by wsproto** (invalid UTF-8, a bad frame) ends the TCP connection
   without a close frame, so the client never learns 1007 or 1002. Here the close frame is
   sent first.
6. **The access-log record carries every request header and the query string** in its
   ``args`` (``AccessLogAtoms``), so an ``Authorization`` header or an ``access_token`` reaches
   any handler that looks past the formatted line. :class:`SafeAccessLogger` hands the log
   record only the atoms in :data:`SAFE_ACCESS_ATOMS`.
7. **A TLS peer that sends data after our close_notify** makes ``TCPServer._close`` raise
   ``ssl.SSLError`` out of the connection task: logged as an unhandled error per connection,
   and at shutdown it escapes ``serve()`` and aborts the graceful stop. The connection is
   closed either way; :class:`GatewayTCPServer` says so quietly.
8. **The client's close code never reaches the app**: ``websocket.disconnect`` carries 1000
   when the app had closed and 1006 otherwise, so a client's close 1000 or 4000 looks like a
   dropped connection, and a frame refused by the WebSocket layer (1009, 1007) looks the same.
   Here the event carries the code of the close frame that ended the connection (RFC 6455
   section 7.1.5), when the app had not closed it itself.

:func:`install` points Hypercorn's HTTP/1.1 and HTTP/2 protocols at the fixed stream and its
asyncio runner at the fixed TCP server; server.py calls it and sets :class:`SafeAccessLogger`.
``pyproject.toml`` pins Hypercorn 0.18.*, and the end-to-end tests (tests/e2e/) prove each fix
on a real socket, so an upgrade that changes these internals fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from io import BytesIO, StringIO
from typing import Any

import hypercorn.asyncio.run
import hypercorn.protocol.h2
import hypercorn.protocol.h11
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.logging import AccessLogAtoms, Logger
from hypercorn.protocol.events import Event, Request, StreamClosed
from hypercorn.protocol.ws_stream import (
    ASGIWebsocketState,
    FrameTooLargeError,
    WebsocketBuffer,
    WSStream,
)
from hypercorn.typing import ResponseSummary, WWWScope
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

__all__ = [
    "SAFE_ACCESS_ATOMS",
    "ByteCountingBuffer",
    "GatewayTCPServer",
    "GatewayWSStream",
    "SafeAccessLogger",
    "install",
]

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


class GatewayWSStream(WSStream):
    """See the module docstring: no unrequested deflate, byte caps, 1009 really closes, no
    lingering after close, the close code reaches the app."""

    permessage_deflate = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ByteCountingBuffer(self.config.websocket_max_message_size)
        self._ended = asyncio.Event()
        #: The code of the close frame that ended the connection when the app did not close it:
        #: the client's, or ours for a frame the WebSocket layer refused.
        self._close_code: int | None = None

    async def handle(self, event: Event) -> None:
        if isinstance(event, Request) and not self.permessage_deflate:
            headers = [(n, v) for n, v in event.headers if n.lower() != b"sec-websocket-extensions"]
            event = dataclasses.replace(event, headers=headers)
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
        if self.closed:
            self._ended.set()

    async def _send_pings(self) -> None:
        # Hypercorn sleeps the whole interval between pings, so a closed connection's task
        # (and with it the TCP server task) lingers up to GATEWAY_PING_INTERVAL_SECONDS and
        # holds up shutdown: wake as soon as the stream ends.
        while not self.closed:
            await self._send_wsproto_event(Ping())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), self.config.websocket_ping_interval)

    async def _handle_events(self) -> None:
        # Hypercorn 0.18's loop, except that an over-cap message ends the stream.
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    self.buffer.clear()
                    self._close_code = CloseReason.MESSAGE_TOO_BIG.value
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    await self.send(StreamClosed(stream_id=self.stream_id))
                    return
                if event.message_finished:
                    assert self.app_put is not None  # set when the upgrade request arrived
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    self._close_code = event.code  # the client closed first
                    await self._send_wsproto_event(event.response())
                elif self.connection.state == ConnectionState.OPEN:
                    self._close_code = event.code
                    # wsproto reports a protocol error it found (1007 invalid UTF-8, 1002) as
                    # a close event without sending one; tell the client why (RFC 6455 7.1.7).
                    await self._send_wsproto_event(
                        CloseConnection(code=event.code, reason=event.reason)
                    )
                await self.send(StreamClosed(stream_id=self.stream_id))


class GatewayTCPServer(TCPServer):
    """Hypercorn's asyncio connection, closing quietly when the TLS peer misbehaves at the end."""

    async def _close(self) -> None:
        # The transport is closed whether or not the peer's close_notify dance was clean.
        with contextlib.suppress(ssl.SSLError):
            await super()._close()


class SafeAccessLogger(Logger):
    """Hypercorn's logger, with access-log records that carry no credential."""

    def atoms(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> dict[str, str]:
        every = AccessLogAtoms(request, response, request_time)
        return {name: every[name] for name in SAFE_ACCESS_ATOMS}


def install(*, permessage_deflate: bool) -> None:
    """Make Hypercorn use :class:`GatewayWSStream` and :class:`GatewayTCPServer`."""
    GatewayWSStream.permessage_deflate = permessage_deflate
    hypercorn.protocol.h11.WSStream = GatewayWSStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = GatewayWSStream  # type: ignore[attr-defined]
    hypercorn.asyncio.run.TCPServer = GatewayTCPServer  # type: ignore[attr-defined]
