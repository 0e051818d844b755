"""Hypercorn 0.18's WebSocket stream, with three defects fixed for a public-facing gateway.

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

:func:`install` points Hypercorn's HTTP/1.1 and HTTP/2 protocols at the fixed stream; server.py
calls it before serving. ``pyproject.toml`` pins Hypercorn 0.18.*, and
tests/e2e/test_frames.py proves each fix on a real socket, so an upgrade that changes these
internals fails loudly.
"""

from __future__ import annotations

import dataclasses
from io import BytesIO, StringIO
from typing import Any

import hypercorn.protocol.h2
import hypercorn.protocol.h11
from hypercorn.protocol.events import Event, Request, StreamClosed
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

__all__ = ["ByteCountingBuffer", "GatewayWSStream", "install"]


class ByteCountingBuffer(WebsocketBuffer):  # type: ignore[misc]
    """Hypercorn's message buffer, with the cap counted in UTF-8 bytes."""

    def extend(self, event: Message) -> None:
        text = isinstance(event, TextMessage)
        if self.value is None:
            self.value = StringIO() if text else BytesIO()
        self.value.write(event.data)
        self.length += len(event.data.encode("utf-8", "surrogatepass")) if text else len(event.data)
        if self.length > self.max_length:
            raise FrameTooLargeError()


class GatewayWSStream(WSStream):  # type: ignore[misc]
    """See the module docstring: no unrequested deflate, byte caps, and 1009 really closes."""

    permessage_deflate = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = ByteCountingBuffer(self.config.websocket_max_message_size)

    async def handle(self, event: Event) -> None:
        if isinstance(event, Request) and not self.permessage_deflate:
            headers = [(n, v) for n, v in event.headers if n.lower() != b"sec-websocket-extensions"]
            event = dataclasses.replace(event, headers=headers)
        await super().handle(event)

    async def _handle_events(self) -> None:
        # Hypercorn 0.18's loop, except that an over-cap message ends the stream.
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    self.buffer.clear()
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    await self.send(StreamClosed(stream_id=self.stream_id))
                    return
                if event.message_finished:
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))


def install(*, permessage_deflate: bool) -> None:
    """Make Hypercorn's protocols build :class:`GatewayWSStream` for WebSocket upgrades."""
    GatewayWSStream.permessage_deflate = permessage_deflate
    hypercorn.protocol.h11.WSStream = GatewayWSStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = GatewayWSStream  # type: ignore[attr-defined]
