"""gateway.protocol: every step of the per-frame pipeline, worst cases first."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.errors import CloseCode, ConnectionClosing, ErrorCode, MessageRejected
from gateway.protocol import (
    CLIENT_TYPES,
    MAX_CHAT_CHARS,
    decode,
    encode,
    validate_server_frame,
)

CAP_BYTES = 16 * 1024
SMALL_CAP_BYTES = 256

#: One valid message of every client type, with every field it can carry.
VALID: dict[str, dict[str, Any]] = {
    "join": {"type": "join", "room": "lobby", "ref": "j1"},
    "leave": {"type": "leave", "room": "team:a.b_c-d", "ref": "l1"},
    "chat": {"type": "chat", "room": "lobby", "message": "hello", "ref": "c1"},
    "typing": {"type": "typing", "room": "lobby", "typing": True, "ref": "t1"},
    "ping": {"type": "ping", "ref": "p1"},
    "refresh": {"type": "refresh", "token": "a.b.c", "ref": "r1"},
}

#: The fields of each type besides ``type`` and ``ref``, all required.
FIELDS: dict[str, tuple[str, ...]] = {
    "join": ("room",),
    "leave": ("room",),
    "chat": ("room", "message"),
    "typing": ("room", "typing"),
    "ping": (),
    "refresh": ("token",),
}

NOT_A_STRING: list[Any] = [1, 1.5, True, False, None, [], {}, ["lobby"], {"room": "lobby"}]
NOT_A_BOOL: list[Any] = [1, 0, 1.0, "true", "false", None, [], {}, [True]]


def text(message: Any) -> str:
    return orjson.dumps(message).decode()


def rejected(data: str | bytes | None, cap_bytes: int = CAP_BYTES) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        decode(data, cap_bytes)
    error = info.value
    validate_server_frame(error.to_frame())  # every error we produce is a valid error frame
    return error


def closing(data: str | bytes | None, cap_bytes: int = CAP_BYTES) -> CloseCode:
    with pytest.raises(ConnectionClosing) as info:
        decode(data, cap_bytes)
    return info.value.code


def chat_frame_of_bytes(size_bytes: int, char: str = "é") -> str:
    """A valid chat frame of exactly ``size_bytes`` UTF-8 bytes, its message made of ``char``."""
    empty = text({"type": "chat", "room": "lobby", "message": ""})
    room_bytes = size_bytes - len(empty.encode())
    width = len(char.encode())
    count, rest = divmod(room_bytes, width)
    frame = text({"type": "chat", "room": "lobby", "message": char * count + "x" * rest})
    assert len(frame.encode()) == size_bytes
    return frame


# --- the happy path ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(VALID))
def test_every_valid_message_round_trips(kind: str) -> None:
    message = VALID[kind]
    assert decode(text(message), CAP_BYTES) == message


@pytest.mark.parametrize("kind", sorted(VALID))
def test_ref_is_optional(kind: str) -> None:
    message = {k: v for k, v in VALID[kind].items() if k != "ref"}
    assert decode(text(message), CAP_BYTES) == message


def test_client_types_are_the_contract() -> None:
    assert frozenset({"join", "leave", "chat", "typing", "ping", "refresh"}) == CLIENT_TYPES


def test_insignificant_whitespace_is_allowed() -> None:
    assert decode(' \n\t{ "type" : "ping" }\r\n ', CAP_BYTES) == {"type": "ping"}


# --- step 1: binary frames close with 1003 -------------------------------------------------


@pytest.mark.parametrize("data", [None, b"", b'{"type":"ping"}', b"\xff\xfe", bytearray(b"{}")])
def test_binary_frames_close_with_1003(data: Any) -> None:
    assert closing(data) == CloseCode.UNSUPPORTED_DATA


def test_binary_is_checked_before_size() -> None:
    assert closing(b"x" * (CAP_BYTES + 1)) == CloseCode.UNSUPPORTED_DATA


# --- step 2: the size cap is in UTF-8 bytes, inclusive ---------------------------------------


def test_frame_exactly_at_the_cap_is_accepted() -> None:
    frame = chat_frame_of_bytes(SMALL_CAP_BYTES, "x")
    assert decode(frame, SMALL_CAP_BYTES)["type"] == "chat"


def test_frame_one_byte_over_the_cap_closes_with_1009() -> None:
    frame = chat_frame_of_bytes(SMALL_CAP_BYTES + 1, "x")
    assert closing(frame, SMALL_CAP_BYTES) == CloseCode.MESSAGE_TOO_BIG


def test_multibyte_frame_exactly_at_the_cap_is_accepted() -> None:
    frame = chat_frame_of_bytes(SMALL_CAP_BYTES, "😀")
    assert len(frame) < SMALL_CAP_BYTES < len(frame) * 4  # the slow (encoding) path
    assert decode(frame, SMALL_CAP_BYTES)["type"] == "chat"


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_under_the_char_cap_but_over_the_byte_cap_closes(char: str) -> None:
    frame = chat_frame_of_bytes(SMALL_CAP_BYTES + 1, char)
    assert len(frame) <= SMALL_CAP_BYTES  # counting characters would have let it through
    assert closing(frame, SMALL_CAP_BYTES) == CloseCode.MESSAGE_TOO_BIG


def test_a_2000_character_emoji_chat_fits_the_default_cap() -> None:
    message = "😀" * MAX_CHAT_CHARS  # 8000 bytes
    assert decode(text({"type": "chat", "room": "a", "message": message}), CAP_BYTES)


def test_long_text_is_refused_before_parsing() -> None:
    # Invalid JSON, but over the cap: the size wins, nothing is parsed.
    assert closing("[" * (SMALL_CAP_BYTES + 1), SMALL_CAP_BYTES) == CloseCode.MESSAGE_TOO_BIG


def test_lone_surrogates_are_sized_not_crashed_on() -> None:
    over = "\ud800" * (SMALL_CAP_BYTES // 3 + 1)  # 3 bytes each with surrogatepass
    assert closing(over, SMALL_CAP_BYTES) == CloseCode.MESSAGE_TOO_BIG
    under = '{"type":"chat","room":"a","message":"' + "\ud800" * 60 + '"}'
    assert rejected(under, SMALL_CAP_BYTES).code == ErrorCode.INVALID_JSON


# --- step 3: strict RFC 8259 parsing ---------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "",
        " ",
        "\n\t\r ",
        "{",
        '{"type":"ping"',
        '{"type":"ping"} {"type":"ping"}',
        '{"type":"ping"}x',
        "{'type':'ping'}",
        '{type:"ping"}',
        '{"type":"ping",}',
        '{"type":"typing","room":"a","typing":NaN}',
        '{"type":"typing","room":"a","typing":Infinity}',
        '{"type":"typing","room":"a","typing":-Infinity}',
        '{"type":"ping","ref":' + "9" * 5000 + "}",
        '{"type":"ping","ref":-' + "9" * 5000 + "}",
        '{"type":"ping","ref":1e999}',
        "\ufeff" + '{"type":"ping"}',
        '{"type":"ping","ref":"\\ud800"}',
        '{"type":"ping","ref":"\\udc00"}',
        '{"type":"ping","ref":"\\ud800\\u0041"}',
        '{"type":"ping","ref":"\\x41"}',
        '{"type":"ping","ref":"a\x01b"}',
        '{"type":"ping","ref":"\ud800"}',
        "[" * 1025 + "]" * 1025,
        "[" * 5000,
        '{"a":' * 2000 + "1" + "}" * 2000,
        "/* comment */ {}",
        "0x10",
        "01",
        "True",
    ],
)
def test_not_json_is_invalid_json(data: str) -> None:
    error = rejected(data)
    assert error.code == ErrorCode.INVALID_JSON
    assert error.message.startswith("message is not valid JSON")
    assert error.ref is None
    assert len(error.message) < 200


def test_invalid_json_message_does_not_echo_input() -> None:
    error = rejected('{"type":"ping","ref":"' + "A" * 5000 + "\x00")
    assert "AAAA" not in error.message


def test_duplicate_keys_keep_the_last_value_and_that_value_is_validated() -> None:
    ok = decode('{"type":"chat","room":"lobby","message":"","message":"hi"}', CAP_BYTES)
    assert ok == {"type": "chat", "room": "lobby", "message": "hi"}
    error = rejected('{"type":"chat","room":"lobby","message":"hi","message":""}')
    assert error.pointer == "/message"
    switched = decode('{"type":"ping","type":"join","room":"a"}', CAP_BYTES)
    assert switched == {"type": "join", "room": "a"}


# --- step 4a: an object with a known string type -------------------------------------------


@pytest.mark.parametrize("data", ["null", "[]", "[{}]", '"ping"', "42", "true", "-0", "1.5"])
def test_json_that_is_not_an_object(data: str) -> None:
    error = rejected(data)
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert error.message == "message must be a JSON object"
    assert error.pointer == ""


def test_missing_type() -> None:
    error = rejected('{"room":"lobby","ref":"x1"}')
    assert (error.code, error.message, error.pointer, error.ref) == (
        ErrorCode.INVALID_MESSAGE,
        "missing field 'type'",
        "/type",
        "x1",
    )


@pytest.mark.parametrize("value", NOT_A_STRING)
def test_type_that_is_not_a_string(value: Any) -> None:
    error = rejected(text({"type": value, "ref": "x2"}))
    assert (error.message, error.pointer, error.ref) == ("'type' must be a string", "/type", "x2")


@pytest.mark.parametrize("kind", ["", "JOIN", "join ", "welcome", "error", "__proto__", "x" * 9000])
def test_unknown_type(kind: str) -> None:
    error = rejected(text({"type": kind, "room": "lobby", "ref": "x3"}))
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert error.pointer == "/type"
    assert error.ref == "x3"
    assert error.message.startswith("unknown type")
    assert len(error.message) < 200  # a huge type is not echoed


# --- step 4b: the type's schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (kind, field, value)
        for kind, fields in FIELDS.items()
        for field in (*fields, "ref")
        for value in (NOT_A_BOOL if field == "typing" else NOT_A_STRING)
    ],
)
def test_wrong_type_for_every_field(kind: str, field: str, value: Any) -> None:
    message = dict(VALID[kind], **{field: value})
    error = rejected(text(message))
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert error.pointer == f"/{field}"
    assert error.message.startswith(f"'{field}' must be")
    if field != "ref":
        assert error.ref == VALID[kind]["ref"]


@pytest.mark.parametrize(
    ("kind", "field"), [(kind, field) for kind, fields in FIELDS.items() for field in fields]
)
def test_missing_field(kind: str, field: str) -> None:
    message = {k: v for k, v in VALID[kind].items() if k != field}
    error = rejected(text(message))
    assert (error.message, error.pointer, error.ref) == (
        f"missing field '{field}'",
        f"/{field}",
        VALID[kind]["ref"],
    )


@pytest.mark.parametrize("kind", sorted(VALID))
def test_unknown_field_is_named(kind: str) -> None:
    error = rejected(text(dict(VALID[kind], colour="red")))
    assert (error.message, error.pointer, error.ref) == (
        "unknown field 'colour'",
        "/colour",
        VALID[kind]["ref"],
    )


@pytest.mark.parametrize(
    ("field", "pointer"), [("a/b", "/a~1b"), ("a~b", "/a~0b"), ("~/", "/~0~1"), ("", "/")]
)
def test_unknown_field_pointer_is_escaped_per_rfc_6901(field: str, pointer: str) -> None:
    assert rejected(text({"type": "ping", field: 1})).pointer == pointer


@pytest.mark.parametrize("field", ["from", "user", "id", "ts", "members", "Type", "REF"])
def test_server_side_and_case_variant_fields_are_unknown(field: str) -> None:
    message = dict(VALID["chat"], **{field: {"id": "admin", "name": "Admin"}})
    assert rejected(text(message)).pointer == f"/{field}"


def test_unknown_field_with_a_huge_name_is_not_echoed_in_full() -> None:
    name = "k" * 5000
    error = rejected(text({"type": "ping", name: 1}))
    assert len(error.message) < 100
    assert error.pointer == "/" + name  # the pointer stays exact


def test_unknown_field_wins_over_field_errors() -> None:
    error = rejected(text({"type": "join", "room": 5, "colour": "red"}))
    assert error.pointer == "/colour"


def test_error_choice_is_deterministic() -> None:
    message = text({"type": "chat", "room": 1, "message": 2, "ref": "d"})
    seen = {(e.message, e.pointer) for e in (rejected(message) for _ in range(5))}
    assert len(seen) == 1


@pytest.mark.parametrize(
    "room",
    [
        "",
        "x" * 65,
        "lobby\n",
        "\nlobby",
        "lob by",
        "lobby/1",
        "lobbý",
        "lobby\x00",
        "lobby\u2028",
        "\uff4c\uff4f\uff42\uff42\uff59",  # fullwidth "lobby"
        "../etc",
    ],
)
def test_bad_room_names(room: str) -> None:
    error = rejected(text({"type": "join", "room": room, "ref": "rm"}))
    assert (error.message, error.pointer, error.ref) == (
        "'room' must match ^[A-Za-z0-9_.:-]{1,64}$",
        "/room",
        "rm",
    )


@pytest.mark.parametrize("room", ["a", "x" * 64, "A-Z_0.9:z", "...", "-", ":"])
def test_good_room_names(room: str) -> None:
    assert decode(text({"type": "join", "room": room}), CAP_BYTES)["room"] == room


def test_huge_room_is_not_echoed() -> None:
    error = rejected(text({"type": "join", "room": "y" * 10_000}))
    assert "yyyy" not in error.message


def test_chat_message_of_2000_characters_is_accepted_2001_is_not() -> None:
    assert MAX_CHAT_CHARS == 2000
    ok = {"type": "chat", "room": "a", "message": "m" * MAX_CHAT_CHARS}
    assert decode(text(ok), CAP_BYTES) == ok
    error = rejected(text(dict(ok, message="m" * (MAX_CHAT_CHARS + 1))))
    assert (error.message, error.pointer) == (
        "'message' must be at most 2000 characters",
        "/message",
    )


def test_chat_length_counts_code_points_not_bytes_or_utf16_units() -> None:
    ok = {"type": "chat", "room": "a", "message": "😀" * MAX_CHAT_CHARS}
    assert decode(text(ok), CAP_BYTES) == ok
    assert rejected(text(dict(ok, message="😀" * (MAX_CHAT_CHARS + 1)))).pointer == "/message"


def test_empty_chat_message() -> None:
    error = rejected(text({"type": "chat", "room": "a", "message": ""}))
    assert (error.message, error.pointer) == ("'message' must not be empty", "/message")


def test_typing_is_a_real_boolean() -> None:
    for value in (True, False):
        assert decode(text({"type": "typing", "room": "a", "typing": value}), CAP_BYTES)
    for raw in ("1", "0", "1.0", '"true"'):
        error = rejected('{"type":"typing","room":"a","typing":' + raw + "}")
        assert (error.message, error.pointer) == ("'typing' must be true or false", "/typing")


@pytest.mark.parametrize(("length", "ok"), [(0, False), (1, True), (8192, True), (8193, False)])
def test_refresh_token_length(length: int, ok: bool) -> None:
    message = {"type": "refresh", "token": "t" * length}
    if ok:
        assert decode(text(message), CAP_BYTES) == message
    else:
        assert rejected(text(message)).pointer == "/token"


def test_deeply_nested_value_where_a_string_belongs() -> None:
    nested = "[" * 1020 + "]" * 1020
    error = rejected('{"type":"join","ref":"deep","room":' + nested + "}")
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert error.ref == "deep"


def test_deeply_nested_unknown_field() -> None:
    nested = '{"a":' * 1000 + "1" + "}" * 1000
    error = rejected('{"type":"ping","x":' + nested + "}")
    assert (error.code, error.pointer) == (ErrorCode.INVALID_MESSAGE, "/x")


# --- ref --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["a", "r" * 64, "🙂" * 64, " ", "0"])
def test_valid_ref_is_echoed_on_errors(ref: str) -> None:
    error = rejected(text({"type": "join", "room": "bad room", "ref": ref}))
    assert error.ref == ref
    assert error.to_frame()["ref"] == ref


@pytest.mark.parametrize("ref", ["", "r" * 65, 1, None, ["a"], {"a": 1}, True])
def test_invalid_ref_is_itself_the_error_and_not_echoed(ref: Any) -> None:
    error = rejected(text({"type": "ping", "ref": ref}))
    assert (error.pointer, error.ref) == ("/ref", None)
    assert "ref" not in error.to_frame()


def test_invalid_ref_is_not_echoed_when_something_else_is_wrong() -> None:
    error = rejected(text({"type": "nope", "ref": "r" * 65}))
    assert (error.pointer, error.ref) == ("/type", None)


def test_no_ref_before_parsing_succeeds() -> None:
    assert rejected('{"type":"nope","ref":"abc"').ref is None


# --- encode and server frames -------------------------------------------------------------


def test_encode_is_compact_json_text() -> None:
    frame = {"type": "pong", "ts": 1, "ref": "é"}
    encoded = encode(frame)
    assert encoded == '{"type":"pong","ts":1,"ref":"é"}'
    assert orjson.loads(encoded) == frame


def test_encode_accepts_any_mapping_and_enums() -> None:
    from types import MappingProxyType

    frame = MappingProxyType({"type": "error", "code": ErrorCode.NOT_JOINED, "message": "m"})
    assert encode(frame) == '{"type":"error","code":"not_joined","message":"m"}'


def test_encode_refuses_what_json_cannot_represent() -> None:
    with pytest.raises(TypeError):
        encode({"type": "pong", "ts": object()})


def test_decode_of_an_encoded_client_message_is_identity() -> None:
    for message in VALID.values():
        assert decode(encode(message), CAP_BYTES) == message


# --- fuzz: only MessageRejected or ConnectionClosing ever come out ----------------------------

_TOKENS = [
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    '"',
    "\\",
    "\\u",
    "d800",
    "true",
    "false",
    "null",
    "-",
    "0",
    "1e",
    "9" * 30,
    "NaN",
    " ",
    '"type"',
    '"join"',
    '"chat"',
    '"room"',
    '"lobby"',
    '"message"',
    '"typing"',
    '"ref"',
    '"token"',
    "\ufeff",
    "\x00",
    "é",
    "😀",
    "\ud800",
]


def _random_value(rng: random.Random, depth: int) -> Any:
    choice = rng.randrange(9 if depth < 4 else 6)
    if choice == 0:
        return rng.choice(["", "lobby", "x" * rng.randrange(70), "😀" * rng.randrange(3)])
    if choice == 1:
        return rng.randrange(-(2**63), 2**63)
    if choice == 2:
        return rng.random() * 10 ** rng.randrange(-300, 300)
    if choice == 3:
        return rng.choice([True, False, None])
    if choice == 4:
        return rng.choice([*sorted(CLIENT_TYPES), "welcome", "", "JOIN"])
    if choice == 5:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(5)))
    if choice in (6, 7):
        keys = ["type", "room", "message", "typing", "token", "ref", "colour", ""]
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(6))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _random_inputs(rng: random.Random) -> Any:
    kind = rng.randrange(6)
    if kind == 5:  # a valid message with random valid values
        message = dict(rng.choice(list(VALID.values())))
        room_chars = "azAZ09_.:-"
        if "room" in message:
            message["room"] = "".join(rng.choice(room_chars) for _ in range(rng.randint(1, 64)))
        message["ref"] = "".join(chr(rng.randrange(0x20, 0xD800)) for _ in range(64))
        return orjson.dumps(message).decode()
    if kind == 0:
        return rng.randbytes(rng.randrange(40))
    if kind == 1:
        return "".join(rng.choice(_TOKENS) for _ in range(rng.randrange(30)))
    if kind == 2:  # a valid message, mutated
        chars = list(text(rng.choice(list(VALID.values()))))
        for _ in range(rng.randrange(1, 4)):
            position = rng.randrange(len(chars))
            operation = rng.randrange(3)
            if operation == 0:
                del chars[position]
            elif operation == 1:
                chars.insert(position, rng.choice(_TOKENS))
            else:
                chars[position] = chr(rng.randrange(0x110000))
        return "".join(chars)
    if kind == 3:  # a structured message with random fields and values
        message = _random_value(rng, 0)
        if isinstance(message, dict) and rng.random() < 0.7:
            message["type"] = rng.choice(sorted(CLIENT_TYPES))
        return orjson.dumps(message).decode()
    return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(20)))


def test_fuzz_only_gateway_errors_come_out() -> None:
    rng = random.Random(20240611)
    outcomes = {"accepted": 0, "rejected": 0, "closed": 0}
    for _ in range(4000):
        data = _random_inputs(rng)
        cap_bytes = rng.choice([SMALL_CAP_BYTES, CAP_BYTES])
        try:
            message = decode(data, cap_bytes)
        except MessageRejected as error:
            outcomes["rejected"] += 1
            validate_server_frame(error.to_frame())
        except ConnectionClosing as closing_error:
            outcomes["closed"] += 1
            assert closing_error.code in (CloseCode.UNSUPPORTED_DATA, CloseCode.MESSAGE_TOO_BIG)
        else:
            outcomes["accepted"] += 1
            assert message["type"] in CLIENT_TYPES
            assert decode(encode(message), CAP_BYTES) == message
    # The generator reaches every outcome, so the loop tests something.
    assert all(count > 200 for count in outcomes.values()), outcomes
