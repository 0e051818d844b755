"""schemas/: well-formed Draft 2020-12, one per message type, and the server frames they allow."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from gateway.errors import ErrorCode, MessageRejected
from gateway.protocol import (
    CLIENT_TYPES,
    MAX_CHAT_CHARS,
    SCHEMA_BASE_URI,
    SCHEMA_DIR,
    SERVER_TYPES,
    validate_server_frame,
)
from gateway.settings import ROOM_NAME

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILES = sorted(SCHEMA_DIR.rglob("*.json"))


def load(path: Path) -> dict[str, Any]:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def walk(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema (every dict) of ``node``, with where it is."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{where}/{index}")


def schema_id(path: Path) -> str:
    return SCHEMA_BASE_URI + path.relative_to(SCHEMA_DIR).as_posix()


# --- the files ---------------------------------------------------------------------------------


def test_the_package_reads_the_top_level_schemas_directory() -> None:
    assert REPO / "schemas" == SCHEMA_DIR
    assert len(SCHEMA_FILES) == 1 + len(CLIENT_TYPES) + len(SERVER_TYPES)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.relative_to(SCHEMA_DIR).as_posix())
def test_every_file_is_a_documented_draft_2020_12_schema(path: Path) -> None:
    schema = load(path)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == schema_id(path)
    assert schema["title"]
    assert schema["description"]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.relative_to(SCHEMA_DIR).as_posix())
def test_every_object_schema_forbids_unknown_fields(path: Path) -> None:
    objects = [(where, node) for where, node in walk(load(path)) if node.get("type") == "object"]
    for where, node in objects:
        assert node.get("additionalProperties") is False, f"{path}#{where}"


def test_ids_are_unique() -> None:
    ids = [load(path)["$id"] for path in SCHEMA_FILES]
    assert len(ids) == len(set(ids))


def test_exactly_one_client_schema_per_client_type() -> None:
    names = {path.stem for path in (SCHEMA_DIR / "client").glob("*.json")}
    assert names == CLIENT_TYPES
    for name in names:
        schema = load(SCHEMA_DIR / "client" / f"{name}.json")
        assert schema["properties"]["type"] == {"const": name, "description": f'Always "{name}".'}
        assert "type" in schema["required"]
        assert "ref" in schema["properties"]
        assert "ref" not in schema["required"]


def test_exactly_one_server_schema_per_server_type() -> None:
    names = {path.stem for path in (SCHEMA_DIR / "server").glob("*.json")}
    assert names == SERVER_TYPES
    for name in names:
        assert load(SCHEMA_DIR / "server" / f"{name}.json")["properties"]["type"]["const"] == name


def test_every_ref_resolves_locally_without_network() -> None:
    schemas = [load(path) for path in SCHEMA_FILES]
    registry: Registry[Any] = Registry().with_resources(
        (s["$id"], Resource.from_contents(s, default_specification=DRAFT202012)) for s in schemas
    )
    refs = 0
    for schema in schemas:
        resolver = registry.resolver(base_uri=schema["$id"])
        for where, node in walk(schema):
            if "$ref" in node:
                refs += 1
                resolved = resolver.lookup(node["$ref"]).contents
                assert isinstance(resolved, dict), f"{schema['$id']}#{where}"
    assert refs > 20
    with pytest.raises(Unresolvable):  # a registry without retrieve never fetches
        registry.resolver(base_uri=SCHEMA_BASE_URI).lookup("https://example.com/x.json")


def test_max_chat_chars_is_read_from_the_schema() -> None:
    chat = load(SCHEMA_DIR / "client" / "chat.json")
    assert chat["properties"]["message"]["maxLength"] == MAX_CHAT_CHARS == 2000


def test_error_codes_match_the_error_code_enum() -> None:
    error = load(SCHEMA_DIR / "server" / "error.json")
    assert error["properties"]["code"]["enum"] == [code.value for code in ErrorCode]


# --- server frames --------------------------------------------------------------------------

ALICE = {"id": "u-1", "name": "Alice"}
BOB = {"id": "u-2", "name": "Bob"}

VALID_SERVER: dict[str, list[dict[str, Any]]] = {
    "welcome": [
        {
            "type": "welcome",
            "connection_id": "c-9f2",
            "user": ALICE,
            "rooms": ["lobby", "team:a"],
            "limits": {
                "max_message_bytes": 16384,
                "max_chat_chars": 2000,
                "rate_per_second": 5.0,
                "rate_burst": 15,
            },
            "expires_at": 1_700_000_000_000,
        },
        {
            "type": "welcome",
            "connection_id": "c",
            "user": {"id": "u" * 128, "name": "n" * 64},
            "rooms": [],
            "limits": {
                "max_message_bytes": 256,
                "max_chat_chars": 1,
                "rate_per_second": 0.01,
                "rate_burst": 1,
            },
            "expires_at": None,
        },
    ],
    "joined": [
        {"type": "joined", "room": "lobby", "members": [ALICE, BOB], "ref": "j1"},
        {"type": "joined", "room": "lobby", "members": []},
        {"type": "joined", "room": "lobby", "unchanged": True, "ref": "j2"},
        {
            "type": "joined",
            "room": "lobby",
            "members": [ALICE, BOB],
            "member_count": 12_345,
            "members_truncated": True,
            "ref": "j3",
        },
    ],
    "left": [{"type": "left", "room": "lobby", "ref": "l1"}, {"type": "left", "room": "lobby"}],
    "chat": [
        {
            "type": "chat",
            "id": 1,
            "room": "lobby",
            "from": ALICE,
            "message": "hi",
            "ts": 1_700_000_000_000,
            "ref": "c1",
        },
        {"type": "chat", "id": 2**53, "room": "a", "from": BOB, "message": "😀" * 2000, "ts": 0},
    ],
    "presence": [
        {"type": "presence", "event": "join", "room": "lobby", "user": ALICE},
        {"type": "presence", "event": "leave", "room": "lobby", "user": ALICE},
    ],
    "room": [
        {"type": "room", "room": "lobby", "member_count": 12_345},
        {"type": "room", "room": "lobby", "member_count": 2, "members": [ALICE, BOB]},
        {"type": "room", "room": "lobby", "member_count": 0, "members": []},
    ],
    "typing": [
        {"type": "typing", "room": "lobby", "user": BOB, "typing": True},
        {"type": "typing", "room": "lobby", "user": BOB, "typing": False},
    ],
    "pong": [{"type": "pong", "ts": 1_700_000_000_000, "ref": "p"}, {"type": "pong", "ts": 0}],
    "refreshed": [
        {"type": "refreshed", "expires_at": 1_700_000_000_000, "ref": "r"},
        {"type": "refreshed", "expires_at": None},
    ],
    "error": [
        {"type": "error", "code": "invalid_json", "message": "message is not valid JSON"},
        {
            "type": "error",
            "code": "rate_limited",
            "message": "slow down",
            "ref": "x",
            "retry_after_ms": 250,
        },
        {
            "type": "error",
            "code": "invalid_message",
            "message": "unknown field 'a/b'",
            "pointer": "/a~1b",
        },
        {"type": "error", "code": "invalid_message", "message": "not an object", "pointer": ""},
    ],
}


def _with(frame: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**frame, **changes}


def _without(frame: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != field}


W, J, C = VALID_SERVER["welcome"][0], VALID_SERVER["joined"][0], VALID_SERVER["chat"][0]
P, T, E = VALID_SERVER["presence"][0], VALID_SERVER["typing"][0], VALID_SERVER["error"][0]
G, R, L = VALID_SERVER["pong"][0], VALID_SERVER["refreshed"][0], VALID_SERVER["left"][0]
J_BIG, ROOM = VALID_SERVER["joined"][3], VALID_SERVER["room"][0]

INVALID_SERVER: dict[str, list[dict[str, Any]]] = {
    "welcome": [
        _without(W, "limits"),
        _without(W, "expires_at"),
        _with(W, ref="w"),
        _with(W, connection_id=""),
        _with(W, user={"id": "u-1"}),
        _with(W, user={**ALICE, "admin": True}),
        _with(W, user={"id": "u", "name": ""}),
        _with(W, user={"id": "u" * 129, "name": "n"}),
        _with(W, user={"id": "u", "name": "n" * 65}),
        _with(W, rooms=["lobby", "lobby"]),
        _with(W, rooms=["bad room"]),
        _with(W, limits={**W["limits"], "extra": 1}),
        _with(W, limits={**W["limits"], "rate_per_second": 0}),
        _with(W, limits=_without(W["limits"], "rate_burst")),
        _with(W, expires_at=1.5),
        _with(W, expires_at="soon"),
    ],
    "joined": [
        _without(J, "members"),
        _with(J, unchanged=True),  # one or the other, never both
        _with(_without(J, "members"), unchanged=False),
        _with(J, members=[ALICE, ALICE]),
        _with(J, members=[{"id": "", "name": "x"}]),
        _with(J, room="lobby\n"),
        _with(J, ref=""),
        _without(J_BIG, "member_count"),  # the sample and the count go together
        _without(J_BIG, "members_truncated"),
        _with(J_BIG, members_truncated=False),
        _with(J_BIG, member_count=0),
        _with(J_BIG, member_count=1.5),
        _with(_without(J_BIG, "members"), unchanged=True),
        _with(_without(J, "members"), unchanged=True, member_count=3),
    ],
    "left": [_without(L, "room"), _with(L, room=""), _with(L, ref="r" * 65), _with(L, members=[])],
    "chat": [
        _with(C, id=0),
        _with(C, id="1"),
        _with(C, id=True),
        _with(C, message=""),
        _with(C, message="m" * 2001),
        _with(C, ts=-1),
        _with(C, ts=1.5),
        _without(C, "from"),
        _with(C, **{"from": {"id": "u", "name": "n", "admin": True}}),
        _with(C, user=ALICE),
    ],
    "presence": [
        _with(P, event="joined"),
        _without(P, "user"),
        _with(P, ref="p"),
        _with(P, room="a b"),
    ],
    "room": [
        _without(ROOM, "member_count"),
        _with(ROOM, member_count=-1),
        _with(ROOM, member_count="12"),
        _with(ROOM, members=[ALICE, ALICE]),
        _with(ROOM, members=[{"id": "u-1"}]),
        _with(ROOM, members_truncated=True),
        _with(ROOM, ref="r"),
        _without(ROOM, "room"),
    ],
    "typing": [_with(T, typing=1), _without(T, "user"), _with(T, ref="t"), _with(T, typing=None)],
    "pong": [_without(G, "ts"), _with(G, ts="now"), _with(G, extra=1)],
    "refreshed": [_without(R, "expires_at"), _with(R, expires_at=-5), _with(R, token="x")],
    "error": [
        _with(E, code="invalid_token"),
        _without(E, "message"),
        _with(E, message=""),
        _with(E, message="m" * 501),
        _with(E, pointer="type"),
        _with(E, pointer="/a~2"),
        _with(E, pointer="/~"),
        _with(E, retry_after_ms=-1),
        _with(E, retry_after_ms=1.5),
        _with(E, detail="x"),
    ],
}


def test_every_server_type_has_examples() -> None:
    assert set(VALID_SERVER) == set(INVALID_SERVER) == SERVER_TYPES


@pytest.mark.parametrize(
    "frame",
    [frame for frames in VALID_SERVER.values() for frame in frames],
    ids=lambda f: f["type"],
)
def test_valid_server_frames(frame: dict[str, Any]) -> None:
    validate_server_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [frame for frames in INVALID_SERVER.values() for frame in frames],
    ids=lambda f: f["type"],
)
def test_invalid_server_frames(frame: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate_server_frame(frame)


@pytest.mark.parametrize(
    "frame", [{}, {"type": "nope"}, {"type": "join", "room": "a"}, {"type": 1}]
)
def test_server_frame_of_unknown_type(frame: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate_server_frame(frame)


def test_unencodable_server_frame_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        validate_server_frame({"type": "pong", "ts": object()})


def test_server_frames_are_judged_in_their_json_form() -> None:
    # A tuple is a JSON array on the wire, and an ErrorCode a JSON string.
    validate_server_frame(_with(W, rooms=("lobby", "team:a")))
    validate_server_frame(_with(E, code=ErrorCode.RATE_LIMITED))


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_makes_a_valid_error_frame(code: ErrorCode) -> None:
    rejection = MessageRejected(code, "m", ref="r", pointer="/room", retry_after_ms=10)
    validate_server_frame(rejection.to_frame())


def test_validation_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for frames in VALID_SERVER.values():
        for frame in frames:
            validate_server_frame(frame)


def test_the_schema_room_pattern_is_the_code_rule() -> None:
    """schemas/defs.json and gateway.settings.ROOM_NAME state one rule; keep them one."""
    defs = json.loads((SCHEMA_DIR / "defs.json").read_text(encoding="utf-8"))
    assert defs["$defs"]["room"]["pattern"] == f"^{ROOM_NAME.pattern}$"
