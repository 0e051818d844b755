"""A WebSocket client written by hand, over TLS: to send what a well-behaved library never would
(control frames, fragments, floods) and to read exactly what the server put on the wire."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from pathlib import Path

from tests.e2e.conftest import Gateway
from tests.helpers import timeout

__all__ = [
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "PING",
    "PONG",
    "TEXT",
    "RawClient",
    "frame",
    "tcp_sockets",
]

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client written by hand, to send what a well-behaved library never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        gw: Gateway,
        sub: str = "mallory",
        *,
        receive_buffer_bytes: int | None = None,
        ttl: float = 3600,
    ) -> RawClient:
        """Connect as ``sub`` and read the welcome.

        Args:
            receive_buffer_bytes: a small ``SO_RCVBUF`` (set before connecting, so the TCP
                window stays small): with no reads, the server's writes back up at once.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=gw.client_ssl, server_hostname="localhost"
        )
        key = base64.b64encode(os.urandom(16)).decode()
        token = gw.token(sub, ttl=ttl)
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: localhost:{gw.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        async with asyncio.timeout(timeout(5)):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client = cls(reader, writer)
        assert json.loads(await client.read_text())["type"] == "welcome"
        return client

    async def read_frame(self) -> tuple[int, bytes]:
        """The next frame that is not a ping or pong (the server pings at once on accept)."""
        while True:
            opcode, payload = await self.read_any_frame()
            if opcode not in (PING, PONG):
                return opcode, payload

    async def read_any_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout(5)):
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(length)

    async def read_text(self) -> str:
        opcode, payload = await self.read_frame()
        assert opcode == TEXT, (opcode, payload)
        return payload.decode()

    async def read_close(self) -> int:
        """Skip data frames until the close frame; its code."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code

    async def eof_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(timeout(seconds)):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    @property
    def local_port(self) -> int:
        port: int = self.writer.get_extra_info("sockname")[1]
        return port

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


#: /proc/net/tcp's connection states (include/net/tcp_states.h), by their hex code.
_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def tcp_sockets(local_port: int, remote_port: int) -> list[tuple[str, int]]:
    """The kernel's IPv4 TCP sockets from ``local_port`` to ``remote_port`` on this machine, as
    (state, bytes in the send queue): what ``ss -tn`` shows, read from /proc/net/tcp (Linux).

    The server side of a client's connection is ``tcp_sockets(server_port, client_port)``;
    TIME_WAIT entries hold no memory nor descriptor and are left out. The file is read three
    times and the readings merged: a reading can miss an entry while other sockets come and go.
    """
    found: dict[tuple[str, str], tuple[str, int]] = {}
    for _ in range(3):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            if int(local.split(":")[1], 16) != local_port:
                continue
            if int(remote.split(":")[1], 16) != remote_port or state == "06":
                continue
            found[(local, remote)] = (_TCP_STATES.get(state, state), int(queues.split(":")[0], 16))
    return list(found.values())
