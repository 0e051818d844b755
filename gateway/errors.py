"""Close codes, error codes, and the one exception tree of the gateway.

The tree::

    GatewayError
    ├── HandshakeRejected       the upgrade is refused with a real HTTP response
    │   └── AuthError           401 invalid_token, with the reason (never the token)
    ├── MessageRejected         a frame costs an ``error`` reply; the connection stays
    ├── ConnectionClosing       the connection must close with a close code
    └── BrokerUnavailable       the shared broker (Redis) cannot be reached: retry later

Only the transport edge (web.py) turns these into HTTP responses or close frames; everything
below it raises them. Anything else that escapes becomes close 1011 with no detail.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = [
    "CLOSE_REASONS",
    "AuthError",
    "BrokerUnavailable",
    "CloseCode",
    "ConnectionClosing",
    "ErrorCode",
    "GatewayError",
    "HandshakeRejected",
    "MessageRejected",
]


class CloseCode(IntEnum):
    """WebSocket close codes the gateway sends (RFC 6455 section 7.4, and 4000-4999 private)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # binary frame
    INVALID_PAYLOAD = 1007  # invalid UTF-8
    POLICY_VIOLATION = 1008  # repeated invalid messages
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    TOKEN_EXPIRED = 4001
    TOO_SLOW = 4008
    RATE_ABUSE = 4029


#: The reason sent in the close frame (short: a close reason is at most 123 bytes).
CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "bye",
    CloseCode.GOING_AWAY: "server going away, reconnect elsewhere",
    CloseCode.UNSUPPORTED_DATA: "binary frames are not accepted",
    CloseCode.INVALID_PAYLOAD: "invalid UTF-8",
    CloseCode.POLICY_VIOLATION: "too many invalid messages",
    CloseCode.MESSAGE_TOO_BIG: "message over the size cap",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.TRY_AGAIN_LATER: "overloaded, try later",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.TOO_SLOW: "too slow to keep up",
    CloseCode.RATE_ABUSE: "repeated rate-limit abuse",
}


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame (docs/protocol.md)."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    FORBIDDEN_ROOM = "forbidden_room"
    NOT_JOINED = "not_joined"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    #: A join's ``since`` is above the room's last id: the room's ids restarted (the server or
    #: its Redis lost its state). Not held against the client.
    SINCE_AHEAD = "since_ahead"


#: The codes that blame the client's frame: repeated, they close the connection with 1008.
#: rate_limited has its own window (4029); unavailable and overloaded are the server's state,
#: never held against the client.
CLIENT_FAULTS = frozenset(
    {
        ErrorCode.INVALID_JSON,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.FORBIDDEN_ROOM,
        ErrorCode.NOT_JOINED,
    }
)


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class HandshakeRejected(GatewayError):
    """Refuse the upgrade with a real HTTP response ``{"error": code, "detail": detail}``."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})


class AuthError(HandshakeRejected):
    """The credentials do not authenticate (RFC 6750 section 3.1, ``invalid_token``).

    ``reason`` is a short machine word (``missing``, ``malformed``, ``expired``, ...) for logs
    and metrics; ``detail`` is for people. Neither ever contains the token.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(
            401,
            "invalid_token",
            detail,
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
        self.reason = reason


class MessageRejected(GatewayError):
    """A frame is refused with an ``error`` reply; the connection stays open."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        ref: str | None = None,
        pointer: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref
        self.pointer = pointer
        self.retry_after_ms = retry_after_ms

    def to_frame(self) -> dict[str, object]:
        """The ``error`` frame for this rejection (schemas/server/error.json)."""
        frame: dict[str, object] = {
            "type": "error",
            "code": str(self.code),
            "message": self.message,
        }
        if self.ref is not None:
            frame["ref"] = self.ref
        if self.pointer is not None:
            frame["pointer"] = self.pointer
        if self.retry_after_ms is not None:
            frame["retry_after_ms"] = self.retry_after_ms
        return frame


class ConnectionClosing(GatewayError):
    """The connection must close with ``code``; the reason comes from :data:`CLOSE_REASONS`."""

    def __init__(self, code: CloseCode, log_detail: str = "") -> None:
        super().__init__(f"close {int(code)}: {log_detail or CLOSE_REASONS[code]}")
        self.code = code
        self.reason = CLOSE_REASONS[code]
        self.log_detail = log_detail


class BrokerUnavailable(GatewayError):
    """The broker cannot do what was asked now (Redis unreachable or too slow): nothing was
    published or recorded. The message that needed it is refused with a retryable
    ``unavailable`` error; the connection stays."""
