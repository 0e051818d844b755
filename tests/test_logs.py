"""Tests for gateway.logs: one JSON object per line, whatever a record carries."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.logs import JsonFormatter, configure_logging

__all__: list[str] = []


def record(
    msg: str = "connection closed",
    *args: object,
    level: int = logging.INFO,
    exc_info: Any = None,
    **extra: object,
) -> logging.LogRecord:
    logger = logging.getLogger("gateway.test")
    return logger.makeRecord(
        "gateway.test", level, __file__, 1, msg, args, exc_info, extra=extra or None
    )


def formatted(log_record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(log_record)
    assert "\n" not in line
    assert "\r" not in line
    entry: dict[str, Any] = json.loads(line)
    return entry


def test_a_record_is_one_json_object() -> None:
    entry = formatted(record("hello %s", "world", level=logging.WARNING))
    assert entry["event"] == "hello world"
    assert entry["level"] == "warning"
    assert entry["logger"] == "gateway.test"
    assert entry["ts"].endswith("Z")
    assert len(entry["ts"]) == len("2024-01-01T00:00:00.000Z")
    for standard in ("args", "msg", "levelno", "pathname", "lineno", "exc_info", "thread"):
        assert standard not in entry


def test_extras_are_fields() -> None:
    entry = formatted(record(conn_id="c-1", user_id="alice", close_code=1001, client=None))
    assert entry["conn_id"] == "c-1"
    assert entry["user_id"] == "alice"
    assert entry["close_code"] == 1001
    assert entry["client"] is None


def test_an_extra_never_overwrites_the_records_own_fields() -> None:
    entry = formatted(record("upgrade rejected", level=logging.WARNING, event="forged", logger="x"))
    assert (entry["level"], entry["event"], entry["logger"]) == (
        "warning",
        "upgrade rejected",
        "gateway.test",
    )
    assert (entry["extra.event"], entry["extra.logger"]) == ("forged", "x")
    entry = formatted(record("hello", ts="1970", exception="none"))
    assert entry["ts"].endswith("Z") and "exception" not in entry
    assert (entry["extra.ts"], entry["extra.exception"]) == ("1970", "none")


def test_an_extra_named_level_is_kept_apart() -> None:
    logger = logging.getLogger("gateway.test")
    made = logger.makeRecord(
        "gateway.test", logging.ERROR, __file__, 1, "m", (), None, extra={"level": "info"}
    )
    entry = formatted(made)
    assert (entry["level"], entry["extra.level"]) == ("error", "info")


def test_a_multi_line_message_stays_on_one_line() -> None:
    entry = formatted(record('line one\nline two\r\n{"forged": true}'))
    assert entry["event"] == 'line one\nline two\r\n{"forged": true}'
    assert "forged" not in entry


def test_the_exception_text_is_included() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        entry = formatted(record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom\nsecond line" in entry["exception"]


class Opaque:
    def __str__(self) -> str:
        return "<opaque thing>"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Opaque(), "<opaque thing>"),
        (Path("/srv/gateway/x"), "/srv/gateway/x"),
        ({1, 2} - {2}, "{1}"),
        (b"\xff", "b'\\xff'"),
        (10**30, str(10**30)),  # orjson stops at 64 bits
        ("lone \ud800 surrogate", "lone \ud800 surrogate"),  # not UTF-8 encodable
    ],
    ids=["object", "path", "set", "bytes", "huge-int", "lone-surrogate"],
)
def test_values_json_cannot_hold_are_stringified(value: object, expected: str) -> None:
    entry = formatted(record(conn_id="c-1", detail=value))
    assert entry["detail"] == expected
    assert entry["event"] == "connection closed"


def test_nested_values_json_cannot_hold() -> None:
    entry = formatted(record(counts={1: 2, "a": Opaque()}))
    assert entry["counts"] == {"1": 2, "a": "<opaque thing>"}
    weird = formatted(record(counts={(1, 2): "tuple key"}))
    assert "tuple key" in weird["counts"]


def test_a_surrogate_in_the_message_is_still_one_json_line() -> None:
    entry = formatted(record("name \udcff here", user_id=10**20))
    assert entry["event"] == "name \udcff here"
    assert entry["user_id"] == str(10**20)


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_writes_json_lines_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    logging.getLogger("gateway.x").info("hidden")
    logging.getLogger("hypercorn.error").warning("shown", extra={"conn_id": "c-9"})
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert (entry["event"], entry["level"], entry["conn_id"]) == ("shown", "warning", "c-9")
    assert len(logging.getLogger().handlers) == 1
