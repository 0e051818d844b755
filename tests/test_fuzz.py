"""Property-based tests (hypothesis) of the frame pipeline: any bytes, any JSON, any sequence of
valid and invalid frames never raise out of it but as a planned close, never close with 1011,
every reply matches its schema, and a session that ends leaves nothing registered."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import CloseCode, ConnectionClosing, MessageRejected
from gateway.protocol import CLIENT_TYPES, decode, validate_server_frame
from tests.test_session import World

CAP = 2048
#: The closes the pipeline may end a connection with; 1011 (a bug) is not among them.
PLANNED = {
    CloseCode.UNSUPPORTED_DATA,
    CloseCode.INVALID_PAYLOAD,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
    CloseCode.RATE_ABUSE,
}

rooms = st.sampled_from(["lobby", "dev", "nope", "", "lobby\n", "x" * 65])
refs = st.one_of(st.none(), st.text(max_size=70))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def with_ref(message: dict[str, Any], ref: str | None) -> dict[str, Any]:
    return message if ref is None else {**message, "ref": ref}


messages = st.one_of(
    st.builds(lambda r, ref: with_ref({"type": "join", "room": r}, ref), rooms, refs),
    st.builds(
        lambda r, since, ref: with_ref({"type": "join", "room": r, "since": since}, ref),
        rooms,
        st.integers(min_value=-5, max_value=2**60),
        refs,
    ),
    st.builds(lambda r, ref: with_ref({"type": "leave", "room": r}, ref), rooms, refs),
    st.builds(
        lambda r, text, ref: with_ref({"type": "chat", "room": r, "message": text}, ref),
        rooms,
        st.text(max_size=50),
        refs,
    ),
    st.builds(
        lambda r, typing: {"type": "typing", "room": r, "typing": typing}, rooms, json_values
    ),
    st.builds(lambda ref: with_ref({"type": "ping"}, ref), refs),
    st.dictionaries(st.sampled_from(["type", "room", "message", "ref", "x"]), json_values),
)
frames = st.one_of(
    messages.map(lambda m: json.dumps(m)),
    json_values.map(lambda v: json.dumps(v)),
    st.text(max_size=200),
    st.binary(max_size=100),
    st.none(),
)


@given(st.one_of(st.text(max_size=3000), st.binary(max_size=300), st.none()))
@settings(max_examples=500, deadline=None)
def test_decode_returns_a_valid_message_or_refuses_cleanly(data: str | bytes | None) -> None:
    try:
        message = decode(data, CAP)
    except (MessageRejected, ConnectionClosing):
        return
    assert message["type"] in CLIENT_TYPES


@given(st.lists(frames, max_size=25))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_sequence_of_frames_never_breaks_a_session(sequence: list[str | bytes | None]) -> None:
    asyncio.run(_run(sequence))


async def _run(sequence: list[str | bytes | None]) -> None:
    world = await World(
        {"GATEWAY_OPEN_ROOMS": "lobby,dev", "GATEWAY_MAX_MESSAGE_BYTES": str(CAP)}
    ).start()
    session = await world.session("fuzzer")
    other = await world.session("witness")
    await other.handle_frame('{"type":"join","room":"lobby"}')
    try:
        for data in sequence:
            try:
                await session.handle_frame(data)
            except ConnectionClosing as closing:
                assert closing.code in PLANNED, closing
                break
            for queued in (session, other):
                while queued.outbox.depth:
                    validate_server_frame(orjson.loads((await queued.outbox.get()).text))
    finally:
        await session.close()
    # Nothing of the session is left registered: not in the hub, not in the broker's presence.
    for room in ("lobby", "dev"):
        assert world.hub.seat(room, session.conn_id) is None
        assert "fuzzer" not in [m.id for m in await world.broker.members(room)]
    await other.close()
    assert world.hub.rooms == 0
