"""An accepted WebSocket, driven: one reader, one writer, and the one place closes are decided.

:func:`run_connection` feeds received frames to the :class:`~gateway.session.Session` and
drains its outbox to the socket, each in its own task, until something ends the connection:

* the session raises :class:`~gateway.errors.ConnectionClosing` (1003, 1008, 1009, 4029);
* something outside the reader asks, via ``request_close``: the session's outbox overflows
  (4008), the server drains (1001), control frames over the rate limit (4029);
* the token expires without a refresh (4001);
* the client goes away (the ASGI layer cancels us: re-raised, never swallowed);
* anything unexpected: close 1011, with the detail in the log and never on the wire.

The reader stamps each frame's receipt time (:data:`gateway.hub.RECEIVED_MONOTONIC`) and the
writer observes, after each write, how long a broadcast took from the frame that caused it.
When the client closes first, :class:`BoundedWebsocketConnection` keeps its close code in the
ASGI scope (:func:`transport_close_code`): Quart does not hand it to the handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent
from quart.asgi import ASGIWebsocketConnection

from gateway.errors import CLOSE_REASONS, CloseCode, ConnectionClosing
from gateway.hub import RECEIVED_MONOTONIC
from gateway.hypercorn_fixes import CLOSE_TIMEOUT_SECONDS, TransportControl
from gateway.primitives import LeanQueue
from gateway.session import Session

__all__ = [
    "CLOSE_CODE_SCOPE_KEY",
    "FLUSH_BEFORE_CLOSE_SECONDS",
    "BoundedWebsocketConnection",
    "Socket",
    "run_connection",
    "transport_close_code",
]

log = logging.getLogger("gateway.connection")

#: Received frames Quart may hold for us before it stops reading from Hypercorn (which then
#: stops reading the socket): back-pressure instead of an unbounded queue.
RECEIVE_QUEUE_FRAMES = 16
#: Where :class:`BoundedWebsocketConnection` leaves the ``websocket.disconnect`` event's code in
#: the ASGI scope (a namespaced key, as the ASGI specification allows extensions to add).
CLOSE_CODE_SCOPE_KEY = "gateway.close_code"
#: The code of a disconnect event that carries none (ASGI 2.3: "defaults to 1005").
_NO_STATUS = 1005
#: Once a close is decided, how long the writer may take to write what the outbox already
#: held (bounded by the outbox: nothing is queued after the decision) before the close frame
#: goes anyway. A client that reads takes it at once; one that does not is not waited for longer.
FLUSH_BEFORE_CLOSE_SECONDS = CLOSE_TIMEOUT_SECONDS


class BoundedWebsocketConnection(ASGIWebsocketConnection):
    """Quart's ASGI WebSocket handler with a bounded receive queue (Quart 0.22's is unbounded),
    and the close code of the ``websocket.disconnect`` event kept in the scope."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = cast(asyncio.Queue[Any], LeanQueue(maxsize=RECEIVE_QUEUE_FRAMES))

    async def handle_messages(self, receive: ASGIReceiveCallable) -> None:
        # Quart returns on websocket.disconnect and cancels the handler, dropping the code;
        # keep it where the handler's clean-up finds it (the scope is the handler's too).
        scope = cast(dict[str, Any], self.scope)

        async def receive_recording_close() -> ASGIReceiveEvent:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                scope[CLOSE_CODE_SCOPE_KEY] = int(event.get("code", _NO_STATUS))
            return event

        await super().handle_messages(receive_recording_close)


def transport_close_code(scope: Mapping[str, Any]) -> int | None:
    """The close code of the connection's ``websocket.disconnect`` event, if one came: the
    client's code when it closed first (RFC 6455 section 7.1.5), 1006 when the connection
    dropped, 1009 or 1007 when the server's WebSocket layer refused a frame."""
    code = scope.get(CLOSE_CODE_SCOPE_KEY)
    return code if isinstance(code, int) else None


class Socket:
    """The three operations we need of an accepted WebSocket (Quart's ``websocket`` fits)."""

    def __init__(
        self,
        receive: Callable[[], Awaitable[str | bytes | None]],
        send: Callable[[str], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
    ) -> None:
        self.receive = receive
        self.send = send
        self.close = close


async def _read(socket: Socket, session: Session) -> None:
    while True:
        data = await socket.receive()
        # This task's own context: the stamp reaches the broadcasts this frame causes.
        RECEIVED_MONOTONIC.set(time.monotonic())
        await session.handle_frame(data)


async def _write(socket: Socket, session: Session) -> None:
    """Drain what the outbox queued (frames it could not write at once), in order: through the
    transport's own sink once it has drained, or the ASGI send where there is no sink."""
    metrics = session.metrics
    outbox = session.outbox
    while True:
        item = await outbox.get()
        sink = outbox.sink
        if sink is None:
            await socket.send(item.text)
            written = True
        else:
            try:
                await sink.drained()
            except ConnectionError:  # the client is gone: the ASGI disconnect ends us
                outbox.close()
                await asyncio.get_running_loop().create_future()
            written = sink.write(item.frame)
        outbox.sent()
        if written:
            metrics.written(item.kind, item.received_monotonic, time.monotonic())
        if not outbox.is_open and outbox.settled:
            return  # closing, and what was queued before the close is out: the close is next


class _ExpiryTimer:
    """Closes the connection 4001 when its token expires: one timer, no task. A refresh (to a
    later or a sooner expiry) makes it look again at once; on time, it looks at the clock
    again before closing (a timer may fire early by the loop's clock resolution)."""

    __slots__ = ("_clock", "_handle", "_session")

    def __init__(self, session: Session, clock: Callable[[], float]) -> None:
        self._session = session
        self._clock = clock
        self._handle: asyncio.Handle | None = None
        session.on_expiry_changed = self.arm

    def start(self) -> None:
        """Look at the expiry in the next turn of the loop: after the connection's tasks took
        their first step (a token that expired meanwhile still gets its welcome out)."""
        self._handle = asyncio.get_running_loop().call_soon(self.arm)

    def arm(self) -> None:
        self.cancel()
        expires_at = self._session.expires_at
        if expires_at is None:
            return
        remaining = expires_at - self._clock()
        if remaining <= 0:
            self._session.request_close(
                CloseCode.TOKEN_EXPIRED, CLOSE_REASONS[CloseCode.TOKEN_EXPIRED]
            )
        else:
            self._handle = asyncio.get_running_loop().call_later(remaining, self.arm)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def run_connection(
    socket: Socket, session: Session, *, clock: Callable[[], float] = time.time
) -> CloseCode | None:
    """Serve an accepted connection until it ends; return the close code we sent, if any.

    Once a close is decided, nothing more is read, and what the outbox already held is written
    before the close frame (for at most :data:`FLUSH_BEFORE_CLOSE_SECONDS`; nothing after
    4008, whose client does not read): so the replies to every frame before the one that
    crossed an abuse limit arrive, then the close.

    The caller owns clean-up (``session.close()``, releasing the slot): it must run it in a
    ``finally`` because a client disconnect arrives here as ``CancelledError``.
    """
    session.send(session.welcome())
    expiry = _ExpiryTimer(session, clock)
    # Two tasks a connection, and the close request watched as a plain future: an idle
    # connection's memory is mostly what its tasks and queues hold (docs/performance.md).
    reader = asyncio.create_task(_read(socket, session), name="reader")
    writer = asyncio.create_task(_write(socket, session), name="writer")
    expiry.start()
    try:
        done, _ = await asyncio.wait(
            {reader, writer, session.close_requested.future()},
            return_when=asyncio.FIRST_COMPLETED,
        )
        expiry.cancel()
        reader.cancel()  # nothing more is read once the connection is closing
        await asyncio.gather(reader, return_exceptions=True)
        code = _close_code(session, reader, writer, done)
        session.request_close(code)  # nothing more is queued; what waits goes first
        await _flush(writer, session)
    except asyncio.CancelledError:  # the client, or the WebSocket layer, ended the connection
        _log_refused(session)
        raise
    finally:
        expiry.cancel()
        session.on_expiry_changed = None
        for task in (reader, writer):
            task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
    # Bounded: a client that does not read cannot take the close frame. The server's WebSocket
    # layer aborts the TCP connection within the same time (gateway.hypercorn_fixes).
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await socket.close(int(code), CLOSE_REASONS[code])
    except TimeoutError:
        log.info("close frame not delivered in time", extra={"conn_id": session.conn_id})
    except Exception:  # the peer is gone: nothing more to tell it
        log.debug("close failed", exc_info=True, extra={"conn_id": session.conn_id})
    return code


def _close_code(
    session: Session,
    reader: asyncio.Task[None],
    writer: asyncio.Task[None],
    done: set[asyncio.Future[None]],
) -> CloseCode:
    """The code to close with, logged with why: the reader's (the frame that ended the
    connection), 1011 for a task that failed, else the session's request."""
    code = session.close_code or CloseCode.INTERNAL_ERROR
    why = session.close_why
    for task in (reader, writer):
        if task not in done:
            continue
        error = None if task.cancelled() else task.exception()
        if isinstance(error, ConnectionClosing):
            code, why = error.code, error.log_detail
        elif error is not None:
            log.error(
                "connection failed",
                exc_info=error,
                extra={"conn_id": session.conn_id, "close_code": int(CloseCode.INTERNAL_ERROR)},
            )
            return CloseCode.INTERNAL_ERROR
    _log_closing(session, code, why or CLOSE_REASONS[code])
    return code


async def _flush(writer: asyncio.Task[None], session: Session) -> None:
    """Let the writer write what the outbox held when the close was decided (it ends once that
    is out), for at most :data:`FLUSH_BEFORE_CLOSE_SECONDS`: a client that does not read
    delays its close frame no longer than that."""
    outbox = session.outbox
    if writer.done() or outbox.settled:
        return
    done, _ = await asyncio.wait({writer}, timeout=FLUSH_BEFORE_CLOSE_SECONDS)
    if not done:
        log.info(
            "queued frames not delivered before the close",
            extra={"conn_id": session.conn_id, "frames": outbox.depth},
        )


def _log_refused(session: Session) -> None:
    """Log the close the server's WebSocket layer sent for a frame it refused (1009, 1007,
    1002) as :func:`run_connection` logs its own: the app learns of it only as a disconnect."""
    control = session.outbox.sink
    if isinstance(control, TransportControl) and control.refused is not None:
        code, reason, why = control.refused
        _log_closing(session, code, why, reason)


def _log_closing(session: Session, code: int, why: str, reason: str | None = None) -> None:
    """The one line of every close the server decides: its code, the reason the close frame
    carries, and why (for the operator: never sent)."""
    if reason is None:
        reason = CLOSE_REASONS[CloseCode(code)]
    log.info(
        "closing connection",
        extra={
            "conn_id": session.conn_id,
            "user_id": session.user_id,
            "client": session.client,
            "close_code": int(code),
            "reason": reason,
            "why": why,
        },
    )
