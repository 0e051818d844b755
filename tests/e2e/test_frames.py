"""Every frame, in order, on a real socket: size cap, binary, UTF-8, JSON, schema, rate, close."""

from __future__ import annotations

import asyncio
import json
import logging
import struct

import pytest

from gateway.broker import Envelope
from gateway.errors import CloseCode
from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.e2e.rawclient import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, RawClient, frame
from tests.helpers import timeout

pytestmark = pytest.mark.e2e


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


def closing_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The fields of each "closing connection" line (gateway.connection) logged so far."""
    return [
        {key: r.__dict__.get(key) for key in ("close_code", "reason", "why", "conn_id")}
        for r in caplog.records
        if r.name == "gateway.connection" and r.msg == "closing connection"
    ]


CLOSES_BY_THE_WEBSOCKET_LAYER = {
    # What the client sends, and the close it gets: code, the reason of docs/protocol.md's
    # table (Hypercorn sent 1009 without one, and 1007 with Python's decoder message), and
    # why, for the log alone.
    "over the cap": (
        frame(TEXT, b'{"type":"ping","ref":"' + b"a" * 1100 + b'"}'),
        1009,
        "message over the size cap",
        "a message over 1024 bytes",
    ),
    "fragments over the cap": (
        frame(TEXT, b"a" * 600, fin=False) + frame(CONTINUATION, b"a" * 600),
        1009,
        "message over the size cap",
        "a message over 1024 bytes",
    ),
    "invalid UTF-8": (
        frame(TEXT, b'{"type":"ping","ref":"\xff\xfe"}'),
        1007,
        "invalid UTF-8",
        "a text frame or close reason not in UTF-8",
    ),
    "a close reason not in UTF-8": (
        frame(CLOSE, struct.pack("!H", 1000) + b"\xff"),
        1007,
        "invalid UTF-8",
        "a text frame or close reason not in UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(CLOSES_BY_THE_WEBSOCKET_LAYER))
async def test_closes_of_the_websocket_layer_carry_the_documented_reason_and_are_logged(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    sent, code, reason, why = CLOSES_BY_THE_WEBSOCKET_LAYER[case]
    async with start_gateway(GATEWAY_MAX_MESSAGE_BYTES="1024") as gw:
        raw = await RawClient.open(gw)
        [conn_id] = gw.services.sessions
        raw.send(sent)
        frames, got_code, got_reason = await frames_until_close(raw)
        assert (frames, got_code, got_reason) == ([], code, reason)
        raw.close()
        async with asyncio.timeout(timeout(5)):
            while gw.services.sessions:
                await asyncio.sleep(0.01)
    assert closing_lines(caplog) == [
        {"close_code": code, "reason": reason, "why": why, "conn_id": conn_id}
    ]
    [closed] = [r for r in caplog.records if r.msg == "connection closed"]
    assert closed.__dict__["close_code"] == code


async def test_the_server_going_away_closes_1001_with_its_reason_and_logs_it(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    raw = await RawClient.open(gateway)
    [(conn_id, session)] = gateway.services.sessions.items()
    session.request_close(CloseCode.GOING_AWAY)  # what the drain does to each connection
    frames, code, reason = await frames_until_close(raw)
    assert (frames, code, reason) == ([], 1001, "server going away, reconnect elsewhere")
    raw.close()
    assert closing_lines(caplog) == [
        {
            "close_code": 1001,
            "reason": "server going away, reconnect elsewhere",
            "why": "server going away, reconnect elsewhere",
            "conn_id": conn_id,
        }
    ]


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


async def frames_until_close(raw: RawClient) -> tuple[list[tuple[int, bytes]], int, str]:
    """Every frame the server sends before its close frame (its pings left out), and that
    close frame's code and reason."""
    frames: list[tuple[int, bytes]] = []
    while True:
        opcode, payload = await raw.read_any_frame()
        if opcode == CLOSE:
            return frames, struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        if opcode != PING:
            frames.append((opcode, payload))


async def test_eleven_invalid_frames_at_once_get_ten_errors_then_1008(gateway: Gateway) -> None:
    # GATEWAY_MAX_INVALID_MESSAGES=10 (the default): the first ten are refused with an error
    # each, all of them delivered; the eleventh crosses the line and gets the close instead.
    raw = await RawClient.open(gateway)
    raw.send(frame(TEXT, b"not json") * 11)  # one write
    frames, code, reason = await frames_until_close(raw)
    assert [(opcode, json.loads(payload)["code"]) for opcode, payload in frames] == [
        (TEXT, "invalid_json")
    ] * 10
    assert (code, reason) == (1008, "too many invalid messages")
    raw.close()


async def test_thirty_six_pings_at_once_get_fifteen_pongs_then_4029(gateway: Gateway) -> None:
    # The defaults: a bucket of GATEWAY_RATE_BURST=15 tokens (refilled at 5 a second: none in
    # the time one write takes), and GATEWAY_MAX_RATE_VIOLATIONS=20 refusals tolerated. Pings
    # 1-15 take the tokens and are answered; 16-35 are refused, unanswered (20 violations);
    # the 36th is the 21st and closes the connection. Every pong goes out before the close.
    raw = await RawClient.open(gateway)
    raw.send(b"".join(frame(PING, b"%d" % n) for n in range(36)))  # one write
    frames, code, reason = await frames_until_close(raw)
    assert frames == [(PONG, b"%d" % n) for n in range(15)]
    assert (code, reason) == (4029, "repeated rate-limit abuse")
    raw.close()


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

    async def broken(envelope: Envelope) -> int:
        raise RuntimeError("secret internal detail")

    gateway.services.broker.publish_numbered = broken  # type: ignore[method-assign]
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
