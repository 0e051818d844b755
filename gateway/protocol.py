"""The frame codec: text frame -> validated client message, server frame -> JSON text.

:func:`decode` runs the per-frame pipeline of DESIGN.md section 1, in order, and nothing skips
a step: frame kind (text only) -> size cap in UTF-8 bytes -> strict JSON parse (RFC 8259) ->
JSON Schema of the message's ``type``. A frame that cannot be a message at all closes the
connection (:class:`~gateway.errors.ConnectionClosing`); a frame that is merely wrong costs an
``error`` reply (:class:`~gateway.errors.MessageRejected`). No other exception comes out.

The schemas live in the top-level ``schemas/`` directory of the checkout and are found relative
to this package (``gateway/../schemas``), not as package data: we install in editable mode and
the container image copies the whole tree, so the files that are published to client authors
are exactly the files the server enforces. They are loaded, checked and compiled once, at
import; a missing or broken schema fails the import, so the server cannot start without them.
``$ref`` between them resolve through a :class:`referencing.Registry` holding every file, with
no retrieval function: no network access is ever attempted.

One deliberate deviation from plain ``Draft202012Validator``: the ``pattern`` keyword follows
ECMA-262 (the regex dialect JSON Schema specifies) for ``$``, which matches only at the very
end of the string. Python's ``$`` also matches before a trailing newline, which would let the
room ``"lobby\\n"`` through ``^[A-Za-z0-9_.:-]{1,64}$``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import orjson
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.errors import CloseCode, ConnectionClosing, ErrorCode, MessageRejected

__all__ = [
    "BATCH_SUBPROTOCOL",
    "CLIENT_TYPES",
    "MAX_CHAT_CHARS",
    "SCHEMA_BASE_URI",
    "SCHEMA_DIR",
    "SERVER_TYPES",
    "decode",
    "encode",
    "validate_server_frame",
]

#: Where the schemas are read from: the top-level ``schemas/`` beside this package.
SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "schemas"
#: Every schema's ``$id`` is this plus its path under :data:`SCHEMA_DIR`.
SCHEMA_BASE_URI: Final = "https://gateway.local/schemas/"

#: The WebSocket subprotocol (RFC 6455 section 1.9) a client offers for batched delivery: a
#: server frame then holds one message (a JSON object) or several (a JSON array of them, in
#: order). Client frames are the same either way (docs/protocol.md, Batched delivery).
BATCH_SUBPROTOCOL: Final = "chat.batch.v1"

#: Message types a client may send (one schema each in ``schemas/client/``).
CLIENT_TYPES: Final = frozenset({"join", "leave", "chat", "typing", "ping", "refresh"})
#: Frame types the server sends (one schema each in ``schemas/server/``).
SERVER_TYPES: Final = frozenset(
    {
        "welcome",
        "joined",
        "left",
        "chat",
        "presence",
        "room",
        "typing",
        "pong",
        "refreshed",
        "error",
    }
)

#: How much of a client-supplied string an error message may quote.
_ECHO_CHARS: Final = 40

_TYPE_NAMES: Final = {
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "object": "a JSON object",
    "array": "an array",
    "null": "null",
}


@functools.lru_cache(maxsize=32)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """Compile a JSON Schema pattern, with ``$`` meaning end of input (ECMA-262 22.2.2.6).

    Only ``$`` outside a character class is translated (to ``\\Z``); our schemas use nothing
    else where the dialects differ.
    """
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            char = r"\Z"
        out.append(char)
        i += 1
    return re.compile("".join(out))


def _pattern_keyword(
    validator: Validator, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    """The ``pattern`` keyword (JSON Schema Validation 6.3.3) with ECMA-262 anchors."""
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"does not match {pattern!r}")


#: Draft 2020-12 with the ECMA-262 ``pattern``; format checking stays off (format_checker=None).
_GatewayValidator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]  # untyped in stubs
    Draft202012Validator, {"pattern": _pattern_keyword}
)


def _load_schemas() -> dict[str, dict[str, Any]]:
    """Read every schema file, keyed by its path under :data:`SCHEMA_DIR` (``client/join``).

    Raises:
        RuntimeError: a schema is missing, unreadable, not a valid Draft 2020-12 schema, or
            carries an ``$id`` that does not match its path.
    """
    wanted = (
        ["defs"]
        + [f"client/{name}" for name in CLIENT_TYPES]
        + [f"server/{name}" for name in SERVER_TYPES]
    )
    schemas: dict[str, dict[str, Any]] = {}
    for name in sorted(wanted):
        path = SCHEMA_DIR / f"{name}.json"
        try:
            schema = orjson.loads(path.read_bytes())
            _GatewayValidator.check_schema(schema)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot load the JSON Schema {path}: {exc}") from exc
        except SchemaError as exc:
            raise RuntimeError(f"{path} is not a valid Draft 2020-12 schema: {exc}") from exc
        if schema.get("$id") != f"{SCHEMA_BASE_URI}{name}.json":
            raise RuntimeError(f"{path}: $id must be {SCHEMA_BASE_URI}{name}.json")
        schemas[name] = schema
    return schemas


def _registry(schemas: Iterable[dict[str, Any]]) -> Registry[Any]:
    """Every schema by its ``$id``; no ``retrieve``, so an unknown ``$ref`` fails, never fetches."""
    resources = [
        (schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012))
        for schema in schemas
    ]
    return Registry().with_resources(resources).crawl()


def _validators(
    schemas: Mapping[str, dict[str, Any]], registry: Registry[Any], direction: str
) -> dict[str, Validator]:
    built: dict[str, Validator] = {}
    for name, schema in schemas.items():
        folder, _, kind = name.partition("/")
        if folder != direction:
            continue
        if schema.get("properties", {}).get("type", {}).get("const") != kind:
            raise RuntimeError(f"{SCHEMA_DIR / name}.json must fix 'type' to {kind!r}")
        built[kind] = _GatewayValidator(schema, registry=registry, format_checker=None)
    return built


_SCHEMAS: Final = _load_schemas()
_REGISTRY: Final = _registry(_SCHEMAS.values())
_CLIENT_VALIDATORS: Final = _validators(_SCHEMAS, _REGISTRY, "client")
_SERVER_VALIDATORS: Final = _validators(_SCHEMAS, _REGISTRY, "server")

#: The cap on a chat message in characters (code points). The rule lives in the schema.
MAX_CHAT_CHARS: Final[int] = int(_SCHEMAS["client/chat"]["properties"]["message"]["maxLength"])


def _quote(value: str) -> str:
    """``value`` quoted for an error message, cut to :data:`_ECHO_CHARS` characters."""
    if len(value) > _ECHO_CHARS:
        return repr(value[:_ECHO_CHARS] + "…")
    return repr(value)


def _pointer(path: Iterable[str | int]) -> str:
    """The RFC 6901 JSON Pointer of ``path`` (section 3: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _describe(error: ValidationError) -> tuple[str, str]:
    """A short human message and the pointer of the offending field for one schema error."""
    path = list(error.absolute_path)
    keyword = error.validator
    expected: Any = error.validator_value
    if keyword == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = next((key for key in error.instance if key not in known), "")
        return f"unknown field {_quote(extra)}", _pointer([*path, extra])
    if keyword == "required" and isinstance(error.instance, dict):
        missing = next((key for key in expected if key not in error.instance), "")
        return f"missing field {_quote(missing)}", _pointer([*path, missing])
    field = _quote(str(path[-1])) if path else "message"
    pointer = _pointer(path)
    if keyword == "type":
        names = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_TYPE_NAMES.get(name, name) for name in names)
        return f"{field} must be {wanted}", pointer
    if keyword == "minLength":
        if expected == 1:
            return f"{field} must not be empty", pointer
        return f"{field} must be at least {expected} characters", pointer
    if keyword == "maxLength":
        return f"{field} must be at most {expected} characters", pointer
    if keyword == "pattern":
        return f"{field} must match {expected}", pointer
    if keyword == "const":
        return f"{field} must be {_quote(str(expected))}", pointer
    if keyword == "enum":
        return f"{field} must be one of: {', '.join(map(str, expected))}", pointer
    return f"{field} is invalid ({keyword})", pointer


def _check_size(text: str, max_message_bytes: int) -> None:
    """RFC 6455 section 10.4: refuse a frame over the cap before doing any work on it."""
    chars = len(text)
    if chars * 4 <= max_message_bytes:  # a code point is at most 4 bytes in UTF-8
        return
    if chars > max_message_bytes:  # at least one byte per code point
        size_bytes = chars
    else:
        # surrogatepass: a lone surrogate (never from the wire, but possible from a caller)
        # is sized here and refused by the parser, instead of raising UnicodeEncodeError.
        size_bytes = len(text.encode("utf-8", "surrogatepass"))
    if size_bytes > max_message_bytes:
        raise ConnectionClosing(
            CloseCode.MESSAGE_TOO_BIG,
            f"frame of at least {size_bytes} bytes, cap {max_message_bytes}",
        )


def _parse(text: str) -> Any:
    """Strict RFC 8259 parse: no NaN/Infinity, no BOM, no trailing data, valid Unicode only.

    Duplicate names (section 4 says they SHOULD be unique) keep the last value; what is
    validated is exactly what is returned, and only re-encoded frames ever leave the server.
    """
    try:
        return orjson.loads(text)
    except ValueError as exc:  # orjson.JSONDecodeError, with the position
        reason = str(getattr(exc, "msg", "")) or "malformed"
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        where = f" (line {line}, column {column})" if line and column else ""
        raise MessageRejected(
            ErrorCode.INVALID_JSON, f"message is not valid JSON: {reason[:80]}{where}"
        ) from None
    except RecursionError:
        raise MessageRejected(
            ErrorCode.INVALID_JSON, "message is not valid JSON: nested too deeply"
        ) from None


def _ref_of(message: Any) -> str | None:
    """The message's ``ref`` when it is a valid one (defs.json#/$defs/ref), else None."""
    if isinstance(message, dict):
        ref = message.get("ref")
        if isinstance(ref, str) and 1 <= len(ref) <= 64:
            return ref
    return None


def _validate(message: Any, ref: str | None) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise MessageRejected(
            ErrorCode.INVALID_MESSAGE, "message must be a JSON object", pointer=""
        )
    if "type" not in message:
        raise MessageRejected(
            ErrorCode.INVALID_MESSAGE, "missing field 'type'", ref=ref, pointer="/type"
        )
    kind = message["type"]
    if not isinstance(kind, str):
        raise MessageRejected(
            ErrorCode.INVALID_MESSAGE, "'type' must be a string", ref=ref, pointer="/type"
        )
    validator = _CLIENT_VALIDATORS.get(kind)
    if validator is None:
        raise MessageRejected(
            ErrorCode.INVALID_MESSAGE,
            f"unknown type {_quote(kind)}; expected one of: {', '.join(sorted(CLIENT_TYPES))}",
            ref=ref,
            pointer="/type",
        )
    if validator.is_valid(message):
        return message
    error = best_match(validator.iter_errors(message))
    if error is None:  # is_valid and iter_errors disagree: cannot happen, refuse anyway
        raise MessageRejected(ErrorCode.INVALID_MESSAGE, "message is invalid", ref=ref)
    text, pointer = _describe(error)
    raise MessageRejected(ErrorCode.INVALID_MESSAGE, text, ref=ref, pointer=pointer)


def decode(data: str | bytes | None, max_message_bytes: int) -> dict[str, Any]:
    """Turn one received frame into a validated client message.

    Args:
        data: the frame as Quart delivers it: ``str`` for a text frame, ``bytes`` for a binary
            one, ``None`` for an empty binary one.
        max_message_bytes: the cap on the frame's size in UTF-8 bytes (inclusive).

    Returns:
        The message, a dict whose ``type`` is in :data:`CLIENT_TYPES` and which matches that
        type's schema in ``schemas/client/``.

    Raises:
        ConnectionClosing: 1003 for a binary frame (RFC 6455 section 7.4.1: data it cannot
            accept), 1009 for a frame over ``max_message_bytes``.
        MessageRejected: ``invalid_json`` when the text is not strict RFC 8259 JSON,
            ``invalid_message`` when it is not a known, well-formed message; with the
            message's ``ref`` when it had a valid one, and an RFC 6901 ``pointer`` to the
            offending field.
    """
    if not isinstance(data, str):
        raise ConnectionClosing(CloseCode.UNSUPPORTED_DATA, "binary frame")
    _check_size(data, max_message_bytes)
    message = _parse(data)
    ref = _ref_of(message)
    try:
        return _validate(message, ref)
    except RecursionError:  # a 1000-deep value where a string belongs: repr() gives up
        raise MessageRejected(
            ErrorCode.INVALID_MESSAGE, "message is nested too deeply", ref=ref
        ) from None


def encode(frame: Mapping[str, Any]) -> str:
    """One server frame as compact JSON text (RFC 8259), serialized once.

    Args:
        frame: a mapping of JSON-compatible values (dicts, lists, tuples, str, int, float,
            bool, None, enums of those).

    Raises:
        TypeError: a value cannot be represented in JSON (a bug in the caller).
    """
    payload = frame if isinstance(frame, dict) else dict(frame)
    return orjson.dumps(payload).decode("utf-8")


def validate_server_frame(frame: Mapping[str, Any]) -> None:
    """Check a server frame, as the client will see it on the wire, against its schema.

    The frame goes through :func:`encode` and back first, so tuples, enums and the like are
    judged by their JSON form.

    Raises:
        jsonschema.ValidationError: the frame cannot be encoded, has no known ``type``, or does
            not match ``schemas/server/<type>.json`` (the most relevant error is raised).
    """
    try:
        instance = orjson.loads(encode(frame))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"frame cannot be encoded as JSON: {exc}") from exc
    kind = instance.get("type")
    validator = _SERVER_VALIDATORS.get(kind) if isinstance(kind, str) else None
    if validator is None:
        raise ValidationError(f"unknown server frame type {kind!r}")
    error = best_match(validator.iter_errors(instance))
    if error is not None:
        raise error
