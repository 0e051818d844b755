"""WebSocket framing as an attacker writes it, against the real TLS server: every violation of
RFC 6455 gets its close code (1002 protocol error, 1007 invalid UTF-8) and the connection ends;
random frames never hang it."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Gateway, StartGateway
from tests.e2e.rawclient import CLOSE, CONTINUATION, PING, PONG, TEXT, RawClient, frame

pytestmark = pytest.mark.e2e


def raw(first: int, payload: bytes, *, masked: bool = True) -> bytes:
    """A frame with any first byte (FIN, RSV1-3, opcode), masked or not."""
    length = len(payload)
    second = (0x80 if masked else 0) | (length if length < 126 else 126)
    head = bytes([first, second]) + (struct.pack("!H", length) if length >= 126 else b"")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


VIOLATIONS = {
    "rsv1 without an extension": (raw(0x80 | 0x40 | TEXT, b'{"type":"ping"}'), 1002),
    "rsv2": (raw(0x80 | 0x20 | TEXT, b"{}"), 1002),
    "rsv3": (raw(0x80 | 0x10 | TEXT, b"{}"), 1002),
    "reserved data opcode 0x3": (raw(0x80 | 0x3, b"x"), 1002),
    "reserved control opcode 0xB": (raw(0x80 | 0xB, b"x"), 1002),
    "a fragmented ping": (raw(PING, b"x"), 1002),
    "a ping over 125 bytes": (raw(0x80 | PING, b"p" * 126), 1002),
    "an unmasked client frame": (raw(0x80 | TEXT, b'{"type":"ping"}', masked=False), 1002),
    "a continuation with nothing to continue": (raw(0x80 | CONTINUATION, b"x"), 1002),
    "a new message inside a fragmented one": (
        frame(TEXT, b'{"type":', fin=False) + frame(TEXT, b'"ping"}'),
        1002,
    ),
    "invalid UTF-8 in one frame": (frame(TEXT, b'{"type":"\xff"}'), 1007),
    "invalid UTF-8 split across fragments": (
        frame(TEXT, b'{"type":"\xe2\x82', fin=False) + frame(CONTINUATION, b'("}'),
        1007,
    ),
    "a close frame of one byte": (frame(CLOSE, b"\x03"), 1002),
    "a close with a reserved code": (frame(CLOSE, struct.pack("!H", 1005)), 1002),
    "a close with a code below 1000": (frame(CLOSE, struct.pack("!H", 999)), 1002),
    "a close reason that is not UTF-8": (frame(CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_each_framing_violation_gets_its_close_code(gateway: Gateway, name: str) -> None:
    data, code = VIOLATIONS[name]
    client = await RawClient.open(gateway, f"fuzz{abs(hash(name)) % 1000}")
    client.send(data)
    assert await client.read_close() == code, name
    assert await client.eof_within(5), "the connection must end after the close"
    client.close()


async def test_a_ping_between_fragments_is_legal(gateway: Gateway) -> None:
    client = await RawClient.open(gateway, "legal")
    client.send(frame(TEXT, b'{"type":', fin=False) + frame(PING, b"hi"))
    opcode, payload = await client.read_any_frame()
    while opcode == PING:  # the server's own keepalive
        opcode, payload = await client.read_any_frame()
    assert (opcode, payload) == (PONG, b"hi")
    client.send(frame(CONTINUATION, b'"ping","ref":"r"}'))
    assert '"pong"' in await client.read_text()
    client.close()


@given(
    st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=140), st.booleans()),
        min_size=1,
        max_size=4,
    )
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_random_frames_never_hang_the_connection(
    start_gateway: StartGateway, frames: list[tuple[int, bytes, bool]]
) -> None:
    async with start_gateway() as gw:
        client = await RawClient.open(gw, "random")
        for first, payload, masked in frames:
            client.send(raw(first, payload, masked=masked))
        client.send(frame(PING, b"still there?"))
        # Within the bound: either the server still answers, or it closed the connection.
        while True:
            try:
                opcode, payload = await client.read_any_frame()
            except TimeoutError:  # (an OSError too: first)
                raise AssertionError(f"the server hung after {frames!r}") from None
            except (ConnectionError, asyncio.IncompleteReadError):
                break  # it ended the connection
            if opcode == CLOSE or (opcode == PONG and payload == b"still there?"):
                break
        client.close()
