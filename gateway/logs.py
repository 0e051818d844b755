"""Logging: one JSON object per line on stderr.

Records carry structured fields through ``extra=`` (conn_id, user_id, client, close_code, ...).
Nothing in the gateway passes a token or a message body to a log call; the access log format
(server.py) leaves the query string out, so a browser's ``access_token`` never reaches a line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
#: The fields every line has; an ``extra`` of the same name is kept as ``extra.<name>``.
_OWN = frozenset({"ts", "level", "logger", "event", "exception"})


class JsonFormatter(logging.Formatter):
    """Formats a record as one compact JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                # An extra field never replaces the record's own (``level``, ``event``...): a
                # value a client chose cannot forge what a line says it is.
                entry[f"extra.{key}" if key in _OWN else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            # orjson refuses an int beyond 64 bits, a lone surrogate, some keys: a formatter
            # that raises loses the record and prints a traceback instead. Values as text,
            # surrogates escaped by the standard library: always one valid JSON line.
            text = {
                key: value if isinstance(value, str) else str(value) for key, value in entry.items()
            }
            return json.dumps(text)


def configure_logging(level: str) -> None:
    """Send every gateway, Hypercorn and Quart record to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
