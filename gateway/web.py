"""The transport edge: Quart routes, the upgrade checks, and the chat page.

This is the only module (with app.py and server.py) that knows Quart. The upgrade is refused
with a real HTTP response, before ``accept()``, in this order: origin (403), connection attempts
per address (429), credentials (401), capacity (503) and open connections per user (429, over
every instance sharing a Redis store). The origin comes first so that a page on another site
cannot spend a visitor's attempts; a quota store that fails refuses with 503 ``unavailable``.
Every attempt is counted by outcome, and every accepted connection by its close code.

Probes, without a token: ``GET /healthz`` answers 200 while the process lives (liveness);
``GET /readyz`` answers 200 ``ready``, or 503 ``draining`` once shutdown began, or 503
``broker_unavailable`` when the broker does not answer healthy within
:data:`READY_TIMEOUT_SECONDS` (readiness: take this instance out of the load balancer).
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from quart import Blueprint, Response, request, websocket
from quart.wrappers import Websocket
from werkzeug.datastructures import Headers

from gateway.auth import Principal, TokenVerifier, extract_token, mint_token, origin_allowed
from gateway.broker import Broker
from gateway.connection import Socket, run_connection, transport_close_code
from gateway.errors import AuthError, CloseCode, HandshakeRejected
from gateway.hub import Hub
from gateway.hypercorn_fixes import TRANSPORT_EXTENSION, TransportControl
from gateway.load import LoadMonitor
from gateway.metrics import Metrics
from gateway.protocol import BATCH_SUBPROTOCOL, encode
from gateway.quotas import ConnectAttemptLimiter, UserMessageQuota, address_key
from gateway.rooms import RoomPolicy
from gateway.session import Session
from gateway.settings import Settings
from gateway.slots import ConnectionSlots, Slot

__all__ = [
    "READY_TIMEOUT_SECONDS",
    "STATIC_DIR",
    "TOKEN_META",
    "Services",
    "client_address",
    "content_security_policy",
    "create_blueprint",
    "page_files",
    "page_token_source",
]

log = logging.getLogger("gateway.web")

#: How long /readyz waits for the broker's health check before it answers 503.
READY_TIMEOUT_SECONDS = 1.0

#: The ``gateway_connection_attempts_total`` outcome of each refusal's ``error``.
_ATTEMPT_OUTCOMES = {
    "invalid_token": "token",
    "origin_not_allowed": "origin",
    "too_many_attempts": "rate",
    "too_many_connections": "capacity",
    "server_full": "capacity",
    "shutting_down": "shutting_down",
    "unavailable": "unavailable",
}
#: The audit event (gateway.audit) of an upgrade refused with each error; the others are the
#: server's own state, not a decision about the client.
_AUDIT_EVENTS = {
    "invalid_token": "auth_refused",
    "origin_not_allowed": "origin_refused",
    "too_many_attempts": "connect_rate_limited",
    "too_many_connections": "connection_cap",
    "server_full": "connection_cap",
}
#: The audit event of a connection that ended with each close code.
_AUDIT_CLOSES: dict[int, str] = {
    CloseCode.POLICY_VIOLATION: "abuse_closed",
    CloseCode.RATE_ABUSE: "abuse_closed",
    CloseCode.MESSAGE_TOO_BIG: "frame_refused",
    CloseCode.INVALID_PAYLOAD: "frame_refused",
    CloseCode.UNSUPPORTED_DATA: "frame_refused",
}
#: RFC 6455 section 7.1.5: the code of a connection closed without a close frame (never sent).
_DROPPED = 1006
#: Close codes the server's WebSocket layer sends for a frame it refuses before the app sees it.
_TRANSPORT_REJECTS = {
    int(CloseCode.MESSAGE_TOO_BIG): "size",
    int(CloseCode.INVALID_PAYLOAD): "utf8",
}

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: The chat page's files by suffix; anything else in static/ is not served.
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: Rooms a development token grants beyond the open rooms.
DEV_TOKEN_ROOMS = ("dev", "random")
_DEV_SUB = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

#: The placeholder in static/index.html that :func:`page_files` fills with the token source.
TOKEN_META = b'<meta name="gateway-token-url" content="" data-mode="">'

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass(slots=True)
class Services:
    """Everything the routes need, built once by :func:`gateway.app.create_app`."""

    settings: Settings
    verifier: TokenVerifier
    policy: RoomPolicy
    broker: Broker
    hub: Hub
    attempts: ConnectAttemptLimiter
    slots: ConnectionSlots
    #: Messages per user over all its connections (each session hits it).
    quota: UserMessageQuota
    metrics: Metrics
    #: The event loop's lag: while it is overloaded, new chats are refused (gateway.load).
    load: LoadMonitor
    sessions: dict[str, Session] = field(default_factory=dict)
    #: Set while no connection is open (shutdown waits on it).
    no_sessions: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when shutdown begins: /readyz answers 503 and upgrades are refused from then on.
    draining: bool = False
    #: ``time.monotonic()`` when the drain began (its deadline counts from there).
    drain_started_monotonic: float | None = None
    #: The broker health check in flight, shared by concurrent /readyz requests.
    health_check: asyncio.Task[bool] | None = None


def client_address(peer: str | None, forwarded_for: str | None, settings: Settings) -> str:
    """The address to rate-limit and log: the peer, or with ``GATEWAY_TLS=proxy`` the nearest
    address in ``X-Forwarded-For`` that is not a trusted proxy (a client can prepend anything).
    """
    address = peer or "unknown"
    if settings.tls != "proxy" or not settings.trusted_proxies or not forwarded_for:
        return address
    networks = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]

    def trusted(value: str) -> bool:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d
        return any(ip in network for network in networks)

    if not trusted(address):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return address
    return address


def load_static(directory: Path) -> dict[str, tuple[bytes, str]]:
    """The chat page's files: name -> (content, content type), for the suffixes we serve."""
    return {
        path.name: (path.read_bytes(), STATIC_TYPES[path.suffix])
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix in STATIC_TYPES
    }


def page_token_source(settings: Settings) -> tuple[str, str] | None:
    """Where the chat page gets its tokens, and how: ``(url, "session")`` for the operator's
    GATEWAY_PAGE_TOKEN_URL (called with the user's cookies), ``("/dev/token", "dev")`` for the
    development endpoint (called with a display name); None when neither: then no page is
    served, since nobody could sign in on it."""
    if settings.page_token_url is not None:
        return settings.page_token_url, "session"
    if settings.dev_token_endpoint:
        return "/dev/token", "dev"
    return None


def page_files(settings: Settings, directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The chat page's files as served: index.html names its token source in
    :data:`TOKEN_META` (nothing at all without a source)."""
    source = page_token_source(settings)
    if source is None:
        return {}
    files = load_static(directory)
    page, content_type = files["index.html"]
    url, mode = source
    filled = TOKEN_META.replace(b'content=""', f'content="{html.escape(url)}"'.encode(), 1)
    filled = filled.replace(b'data-mode=""', f'data-mode="{mode}"'.encode(), 1)
    if page.count(TOKEN_META) != 1:
        raise RuntimeError(f"static/index.html must hold {TOKEN_META.decode()} once")
    files["index.html"] = (page.replace(TOKEN_META, filled), content_type)
    return files


def content_security_policy(settings: Settings) -> str:
    """The page's policy: itself only, plus the origin of an absolute GATEWAY_PAGE_TOKEN_URL
    (settings.py allows a plain host name and port there, nothing that could end a directive)."""
    policy = SECURITY_HEADERS["Content-Security-Policy"]
    url = settings.page_token_url
    if url is None or url.startswith("/"):
        return policy
    parts = urlsplit(url)
    return policy.replace(
        "connect-src 'self'", f"connect-src 'self' {parts.scheme}://{parts.netloc}"
    )


def _json_response(status: int, body: dict[str, object], headers: dict[str, str]) -> Response:
    response = Response(encode(body), status=status, content_type="application/json")
    response.headers.update(SECURITY_HEADERS)
    response.headers.update(headers)
    return response


def _rejection(error: HandshakeRejected) -> Response:
    return _json_response(
        error.status, {"error": error.error, "detail": error.detail}, error.headers
    )


def create_blueprint(services: Services) -> Blueprint:
    settings = services.settings
    bp = Blueprint("gateway", __name__)

    policy = content_security_policy(settings)

    @bp.after_app_request
    async def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["Content-Security-Policy"] = policy
        if settings.is_production:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    # The page is a handful of small files: read once, served from memory (no file handles
    # per request, nothing outside static/ reachable, no directory listing).
    static_files = page_files(settings)

    def static_response(name: str) -> Response:
        found = static_files.get(name)
        if found is None:
            detail = "no such file" if static_files else "this gateway serves no chat page"
            return _json_response(404, {"error": "not_found", "detail": detail}, {})
        body, content_type = found
        response = Response(body, status=200, content_type=content_type)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @bp.route("/")
    async def index() -> Response:
        return static_response("index.html")

    @bp.route("/static/<name>")
    async def static(name: str) -> Response:
        return static_response(name)

    @bp.route("/healthz")
    async def healthz() -> Response:
        return _json_response(200, {"status": "ok"}, {})

    @bp.route("/readyz")
    async def readyz() -> Response:
        if services.draining:
            return _json_response(503, {"status": "draining"}, {})
        if not await _broker_healthy(services):
            return _json_response(503, {"status": "broker_unavailable"}, {})
        return _json_response(200, {"status": "ready"}, {})

    if settings.dev_token_endpoint:

        @bp.route("/dev/token", methods=["POST"])
        async def dev_token() -> Response:
            try:  # orjson: invalid UTF-8, lone surrogates and deep nesting are errors, not 500s
                body = orjson.loads(await request.get_data(cache=False))
            except orjson.JSONDecodeError:
                body = None
            name = body.get("name") if isinstance(body, dict) else None
            sub = body.get("sub") if isinstance(body, dict) else None
            default_ttl = settings.dev_token_ttl_seconds
            ttl = body.get("ttl_seconds", default_ttl) if isinstance(body, dict) else default_ttl
            if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64:
                return _json_response(
                    400, {"error": "invalid_request", "detail": "name: 1 to 64 characters"}, {}
                )
            if sub is None:
                sub = "u-" + secrets.token_hex(6)
            if not isinstance(sub, str) or not _DEV_SUB.fullmatch(sub):
                return _json_response(
                    400,
                    {"error": "invalid_request", "detail": "sub: 1 to 128 of A-Z a-z 0-9 _.:@-"},
                    {},
                )
            if isinstance(ttl, bool) or not isinstance(ttl, int) or not 5 <= ttl <= 86400:
                return _json_response(
                    400, {"error": "invalid_request", "detail": "ttl_seconds: 5 to 86400"}, {}
                )
            now = int(time.time())
            try:
                token = mint_token(
                    settings,
                    sub=sub,
                    name=name.strip(),
                    rooms=DEV_TOKEN_ROOMS,
                    ttl_seconds=ttl,
                    now=now,
                )
            except ValueError as error:
                return _json_response(400, {"error": "invalid_request", "detail": str(error)}, {})
            rooms = sorted(services.policy.allowed_rooms(DEV_TOKEN_ROOMS))
            user = {"id": sub, "name": name.strip()}
            body_out = {
                "token": token,
                "user": user,
                "rooms": rooms,
                "expires_at": (now + ttl) * 1000,
            }
            return _json_response(200, body_out, {})

    @bp.websocket("/ws")
    async def ws() -> Response | None:
        peer = websocket.remote_addr
        address = client_address(
            peer, _joined(websocket.headers.getlist("X-Forwarded-For")), settings
        )
        metrics = services.metrics
        try:
            principal, slot = await _check_upgrade(services, address)
        except HandshakeRejected as rejection:
            reason = rejection.reason if isinstance(rejection, AuthError) else rejection.error
            metrics.attempt(_ATTEMPT_OUTCOMES.get(rejection.error, "unavailable"))
            event = _AUDIT_EVENTS.get(rejection.error)
            if event is not None:  # a security decision: the audit trail has it
                metrics.audit.record(event, client=address, status=rejection.status, reason=reason)
            else:  # the server's own state (draining, its stores down)
                log.info(
                    "upgrade rejected",
                    extra={"client": address, "status": rejection.status, "reason": reason},
                )
            return _rejection(rejection)
        conn_id = secrets.token_urlsafe(9)
        session = Session(
            conn_id=conn_id,
            principal=principal,
            client=address,
            settings=settings,
            policy=services.policy,
            hub=services.hub,
            broker=services.broker,
            verifier=services.verifier,
            metrics=metrics,
            quota=services.quota,
            load=services.load,
        )
        started = time.monotonic()
        code: int | None = None
        accepted = False
        try:
            services.sessions[conn_id] = session
            services.no_sessions.clear()
            control = (websocket.scope.get("extensions") or {}).get(TRANSPORT_EXTENSION)
            fast = isinstance(control, TransportControl) and control.can_write
            # Batched delivery needs the fast path's writes: without them, it is not offered.
            batched = fast and BATCH_SUBPROTOCOL in websocket.requested_subprotocols
            await websocket.accept(subprotocol=BATCH_SUBPROTOCOL if batched else None)
            accepted = True
            _forget_request(cast(Any, websocket)._get_current_object())
            if isinstance(control, TransportControl):  # pings, pongs, fragments: metered too
                control.frame_meter = session.meter_frame
                if fast:  # frames straight to the transport
                    if batched:
                        control.batch(settings.batch_window_ms / 1000)
                    session.outbox.attach(control)
            metrics.attempt("accepted")
            metrics.connection_opened()
            log.info(
                "connection accepted",
                extra={"conn_id": conn_id, "user_id": principal.user_id, "client": address},
            )
            socket = Socket(websocket.receive, websocket.send, websocket.close)
            code = await run_connection(socket, session)
        finally:
            services.sessions.pop(conn_id, None)
            if not services.sessions:
                services.no_sessions.set()
            if code is None:  # the client (or the WebSocket layer) closed first, or it dropped
                code = transport_close_code(websocket.scope)
                code = _DROPPED if code is None else code
                if accepted and code in _TRANSPORT_REJECTS:
                    metrics.rejected(_TRANSPORT_REJECTS[code])
            if accepted:
                metrics.connection_closed(code)
                closed_for = _AUDIT_CLOSES.get(code)
                if closed_for is not None:
                    metrics.audit.record(
                        closed_for,
                        client=address,
                        conn_id=conn_id,
                        user_id=principal.user_id,
                        close_code=int(code),
                    )
            # Logged before leaving the rooms: that awaits, and Quart may cancel it.
            log.info(
                "connection closed",
                extra={
                    "conn_id": conn_id,
                    "user_id": principal.user_id,
                    "client": address,
                    "close_code": int(code),
                    "duration_seconds": round(time.monotonic() - started, 3),
                },
            )
            # Shielded: a cancelled handler still gives its slot back and leaves its rooms.
            await asyncio.shield(_end(services, session, slot))
        return None

    return bp


def _joined(values: Iterable[str]) -> str | None:
    """Header lines of one name as one list (RFC 9110 section 5.3): a proxy may append its own
    ``X-Forwarded-For`` line after the client's instead of extending it."""
    return ", ".join(values) or None


def _forget_request(ws: Websocket) -> None:
    """Once accepted, a connection keeps no copy of its request's headers or query string: the
    token is in one of them, and nothing reads them again (the access log line was written at
    the accept; the handler read what it needed). The ASGI scope is Hypercorn's stream's too.
    About 2 KiB an idle connection, and no token in a heap dump."""
    ws.headers = Headers()
    ws.query_string = b""
    ws.__dict__.pop("args", None)  # werkzeug's cached parse of the query string
    scope = cast(dict[str, Any], ws.scope)
    scope["headers"] = []
    scope["query_string"] = b""


async def _broker_healthy(services: Services) -> bool:
    """Whether the broker answers healthy within :data:`READY_TIMEOUT_SECONDS`.

    Concurrent probes share one check, so unauthenticated requests to /readyz cannot make
    more than one broker round trip at a time.
    """
    check = services.health_check
    if check is None or check.done():
        check = services.health_check = asyncio.ensure_future(_check_broker(services.broker))
    # Shielded: a probe that gives up (its client left) does not cancel the others' check.
    return await asyncio.shield(check)


async def _check_broker(broker: Broker) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            return await broker.healthy()
    except TimeoutError:
        log.warning("broker health check timed out", extra={"timeout": READY_TIMEOUT_SECONDS})
    except Exception as error:
        log.warning("broker health check failed", extra={"error": type(error).__name__})
    return False


async def _end(services: Services, session: Session, slot: Slot) -> None:
    """Give the connection's slot back, then leave its rooms; neither raises."""
    await services.slots.release(slot)
    await _leave_all(session)


async def _leave_all(session: Session) -> None:
    try:
        await session.close()
    except Exception:
        log.exception("leaving rooms failed", extra={"conn_id": session.conn_id})


def _shutting_down() -> HandshakeRejected:
    return HandshakeRejected(
        503, "shutting_down", "the server is shutting down", {"Retry-After": "5"}
    )


async def _check_upgrade(services: Services, address: str) -> tuple[Principal, Slot]:
    """Every check before the upgrade, cheapest first; raises :class:`HandshakeRejected`.

    Returns:
        Who connects, and the slot taken for the connection (the caller gives it back).
    """
    settings = services.settings
    if services.draining:
        raise _shutting_down()
    if not origin_allowed(websocket.headers.get("Origin"), settings):
        raise HandshakeRejected(403, "origin_not_allowed", "this origin may not connect")
    wait_seconds = await services.attempts.hit(address_key(address))
    if wait_seconds is not None:
        raise HandshakeRejected(
            429,
            "too_many_attempts",
            "too many connection attempts from this address",
            {"Retry-After": str(max(1, int(wait_seconds + 0.999)))},
        )
    token = extract_token(websocket.headers.get("Authorization"), websocket.query_string)
    principal = await services.verifier.verify(token)
    if services.draining:  # shutdown began while the token was verified
        raise _shutting_down()
    slot = await services.slots.acquire(principal.user_id)
    if services.draining:  # or while the slot was taken (a Redis round trip): give it back
        await asyncio.shield(services.slots.release(slot))
        raise _shutting_down()
    return principal, slot
