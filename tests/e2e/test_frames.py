"""Every frame, in order, on a real socket: size cap, binary, UTF-8, JSON, schema, rate, close."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct

import pytest

from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.helpers import timeout

pytestmark = pytest.mark.e2e

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
    async def open(cls, gw: Gateway, sub: str = "mallory") -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=gw.client_ssl, server_hostname="localhost"
        )
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: localhost:{gw.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {gw.token(sub)}\r\n\r\n"
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
            opcode, payload = await self._read_any_frame()
            if opcode not in (PING, PONG):
                return opcode, payload

    async def _read_any_frame(self) -> tuple[int, bytes]:
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

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


async def test_message_over_the_cap_closes_1009(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_MAX_MESSAGE_BYTES="1024") as gw:
        client = await gw.user("alice")
        await client.send({"type": "chat", "room": "lobby", "message": "x" * 1100})
        assert await client.close_code() == 1009


async def test_multibyte_message_over_the_byte_cap_closes_1009(start_gateway: StartGateway) -> None:
    # 300 characters, 1,200 bytes: under a cap that counted characters, over one in bytes.
    async with start_gateway(GATEWAY_MAX_MESSAGE_BYTES="1024") as gw:
        client = await gw.user("alice")
        await client.ws.send(
            json.dumps({"type": "ping", "ref": "\U0001f600" * 300}, ensure_ascii=False)
        )
        assert await client.close_code() == 1009


async def test_message_at_the_cap_passes(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_MAX_MESSAGE_BYTES="1024") as gw:
        client = await gw.user("alice")
        await client.join("lobby")
        envelope = json.dumps({"type": "chat", "room": "lobby", "message": ""})
        text = "\u00e9" * ((1024 - len(envelope.encode())) // 2)  # 2-byte characters
        raw = json.dumps({"type": "chat", "room": "lobby", "message": text}, ensure_ascii=False)
        assert len(raw.encode()) <= 1024
        await client.ws.send(raw)
        chat = await client.recv_type("chat")
        assert chat["message"] == text
        await client.close()


async def test_fragmented_message_over_the_cap_closes_the_socket(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(GATEWAY_MAX_MESSAGE_BYTES="1024") as gw:
        raw = await RawClient.open(gw)
        # Twenty 200-byte fragments in one write: the server must not keep reading them.
        fragments = frame(TEXT, b'{"type":"ping","ref":"' + b"a" * 200, fin=False)
        fragments += b"".join(frame(CONTINUATION, b"a" * 200, fin=False) for _ in range(19))
        raw.send(fragments)
        assert await raw.read_close() == 1009
        assert await raw.eof_within(1.0), "the TCP connection stayed open after close 1009"
        raw.close()


@pytest.mark.parametrize("payload", [b"\x00\x01binary", b""])
async def test_binary_frames_close_1003(gateway: Gateway, payload: bytes) -> None:
    raw = await RawClient.open(gateway)
    raw.send(frame(BINARY, payload))
    assert await raw.read_close() == 1003
    raw.close()


async def test_invalid_utf8_closes_1007(gateway: Gateway) -> None:
    raw = await RawClient.open(gateway)
    raw.send(frame(TEXT, b'{"type":"ping","ref":"\xff\xfe"}'))
    assert await raw.read_close() == 1007
    raw.close()


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "NaN", '{"type": "ping", "ref": Infinity}', "[" * 5000 + "]" * 5000, "1" * 5000],
)
async def test_bad_json_is_an_error_not_a_close(gateway: Gateway, text: str) -> None:
    client = await gateway.user("alice")
    await client.ws.send(text)
    error = await client.recv_type("error")
    assert error["code"] == "invalid_json"
    assert (await client.request({"type": "ping", "ref": "after"}, "pong"))["ref"] == "after"
    await client.close()


async def test_schema_errors_point_at_the_field(gateway: Gateway) -> None:
    client = await gateway.user("alice")
    await client.send({"type": "join", "room": "lobby", "colour": "red", "ref": "r1"})
    error = await client.recv_type("error")
    assert (error["code"], error["pointer"], error["ref"]) == ("invalid_message", "/colour", "r1")
    await client.send({"type": "chat", "room": "lobby", "message": 42})
    error = await client.recv_type("error")
    assert (error["code"], error["pointer"]) == ("invalid_message", "/message")
    await client.send({"type": "teleport"})
    assert (await client.recv_type("error"))["code"] == "invalid_message"
    await client.close()


async def test_repeated_invalid_messages_close_1008(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_MAX_INVALID_MESSAGES="3") as gw:
        client = await gw.user("alice")
        for _ in range(3):
            await client.ws.send("not json")
            assert (await client.recv_type("error"))["code"] == "invalid_json"
        await client.ws.send("not json")
        assert await client.close_code() == 1008


async def test_rate_limit_then_4029(start_gateway: StartGateway) -> None:
    async with start_gateway(
        GATEWAY_RATE_BURST="3", GATEWAY_RATE_PER_SECOND="0.1", GATEWAY_MAX_RATE_VIOLATIONS="2"
    ) as gw:
        client = await gw.user("alice")
        for i in range(3):
            assert (await client.request({"type": "ping", "ref": str(i)}, "pong"))["ref"] == str(i)
        await client.send({"type": "ping", "ref": "too-fast"})
        error = await client.recv_type("error")
        assert (error["code"], error["ref"]) == ("rate_limited", "too-fast")
        assert 0 < error["retry_after_ms"] <= 10_000
        await client.send({"type": "ping"})
        assert (await client.recv_type("error"))["code"] == "rate_limited"
        await client.send({"type": "ping"})
        assert await client.close_code() == 4029


async def test_internal_errors_close_1011_without_detail(gateway: Gateway) -> None:
    client = await gateway.user("alice")
    await client.join("lobby")

    async def broken(room: str) -> int:
        raise RuntimeError("secret internal detail")

    gateway.services.broker.next_id = broken  # type: ignore[method-assign]
    await client.send({"type": "chat", "room": "lobby", "message": "hi"})
    assert await client.close_code() == 1011
    assert "secret" not in (client.ws.close_reason or "")


async def test_client_close_cleans_up(gateway: Gateway) -> None:
    clients: list[Client] = [await gateway.user(f"user{i}") for i in range(5)]
    for client in clients:
        await client.join("lobby")
        await client.close()
    async with asyncio.timeout(timeout(5)):
        while gateway.services.sessions or gateway.services.hub.rooms:
            await asyncio.sleep(0.02)
    assert gateway.services.slots.total == 0
    assert await gateway.services.broker.members("lobby") == []
