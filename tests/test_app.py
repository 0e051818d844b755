"""Tests for gateway.app and the WebSocket upgrade in gateway.web, through Quart's test client.

Every refusal is a real HTTP response before ``accept()``: the test client raises
``WebsocketResponseError`` carrying it. ``app.test_app()`` runs the serving hooks, as the real
server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import jwt
import pytest
from quart import Quart
from quart.testing import WebsocketResponseError
from quart.testing.connections import WebsocketDisconnectError
from quart.typing import TestClientProtocol as Client
from quart.typing import TestWebsocketConnectionProtocol as WebsocketConnection
from quart.wrappers import Response
from werkzeug.datastructures import Headers

import gateway.web
from gateway.app import SERVICES_KEY, close_batches, create_app, drain
from gateway.auth import Principal, TokenVerifier, mint_token
from gateway.broker import MemoryBroker
from gateway.errors import CloseCode
from gateway.protocol import validate_server_frame
from gateway.session import Session
from gateway.settings import Settings
from gateway.slots import Slot
from gateway.web import SECURITY_HEADERS, Services
from tests.helpers import TEST_SECRET, make_settings, timeout

__all__: list[str] = []

BEARER_CHALLENGE = 'Bearer error="invalid_token"'


@contextlib.asynccontextmanager
async def running(
    overrides: Mapping[str, str] | None = None,
) -> AsyncIterator[tuple[Quart, Client]]:
    app = create_app(make_settings(overrides))
    async with app.test_app() as test_app:
        yield app, test_app.test_client()


def services_of(app: Quart) -> Services:
    services = app.extensions[SERVICES_KEY]
    assert isinstance(services, Services)
    return services


def token_for(sub: str, *, rooms: tuple[str, ...] = (), ttl_seconds: float = 600) -> str:
    return mint_token(
        make_settings(), sub=sub, name=sub.title(), rooms=rooms, ttl_seconds=ttl_seconds
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def peer(address: str) -> dict[str, object]:
    """``scope_base`` for a connection from ``address`` (the ASGI ``client``)."""
    return {"client": (address, 40000)}


async def receive_json(ws: WebsocketConnection) -> dict[str, Any]:
    async with asyncio.timeout(timeout(5)):
        frame: dict[str, Any] = json.loads(await ws.receive())
    validate_server_frame(frame)
    return frame


async def rejection(
    client: Client,
    *,
    headers: dict[str, str] | Headers | None = None,
    query_string: dict[str, str] | None = None,
    scope_base: dict[str, object] | None = None,
) -> Response:
    """Attempt an upgrade that must be refused; the HTTP response it got."""
    with pytest.raises(WebsocketResponseError) as caught:
        async with asyncio.timeout(timeout(5)):
            async with client.websocket(
                "/ws", headers=headers, query_string=query_string, scope_base=scope_base
            ) as ws:
                await ws.receive()
    response = caught.value.response
    assert isinstance(response, Response)
    return response


async def error_body(response: Response) -> dict[str, str]:
    assert response.content_type == "application/json"
    body: dict[str, str] = json.loads(await response.get_data())
    assert set(body) == {"error", "detail"}
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


# --- the happy path ------------------------------------------------------------------------


async def test_a_bearer_token_is_welcomed() -> None:
    async with running() as (app, client):
        async with client.websocket(
            "/ws", headers=bearer(token_for("alice", rooms=("dev",)))
        ) as ws:
            welcome = await receive_json(ws)
            assert services_of(app).slots.total == 1
            assert len(services_of(app).sessions) == 1
        assert welcome["type"] == "welcome"
        assert welcome["user"] == {"id": "alice", "name": "Alice"}
        assert welcome["rooms"] == ["dev", "lobby"]
        assert welcome["limits"]["max_message_bytes"] == 16 * 1024
        assert isinstance(welcome["expires_at"], int)
        # The handler has finished: its slot and session are gone.
        assert services_of(app).slots.total == 0
        assert services_of(app).sessions == {}


async def test_the_access_token_query_parameter_is_welcomed() -> None:
    async with running() as (_, client):
        query = {"access_token": token_for("bob")}
        async with client.websocket("/ws", query_string=query) as ws:
            welcome = await receive_json(ws)
    assert welcome["user"]["id"] == "bob"


async def test_a_frame_round_trip_through_the_app() -> None:
    async with running() as (_, client):
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            await ws.send(json.dumps({"type": "ping", "ref": "p1"}))
            pong = await receive_json(ws)
    assert pong["type"] == "pong"
    assert pong["ref"] == "p1"


async def test_an_allowed_origin_is_welcomed() -> None:
    overrides = {"GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com"}
    async with running(overrides) as (_, client):
        headers = {**bearer(token_for("alice")), "Origin": "https://chat.example.com:443"}
        async with client.websocket("/ws", headers=headers) as ws:
            assert (await receive_json(ws))["type"] == "welcome"


# --- 401 -----------------------------------------------------------------------------------


def forged(claims: dict[str, object], key: str = "not-the-secret-" + "k" * 32) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, None),
        ({"Authorization": "Bearer not.a.jwt"}, None),
        ({}, {"access_token": ""}),
        ({}, {"access_token": "a b"}),
        (bearer(forged({"sub": "eve", "exp": time.time() + 60})), None),
        ({}, {"access_token": forged({"sub": "eve", "exp": time.time() + 60})}),
        (bearer(forged({"sub": "eve", "exp": time.time() - 3600}, TEST_SECRET)), None),
        (bearer(forged({"exp": time.time() + 60}, TEST_SECRET)), None),
        (bearer("x" * 9000), None),
    ],
    ids=[
        "missing",
        "empty-bearer",
        "basic",
        "not-a-jwt",
        "empty-query",
        "space-in-query",
        "bad-signature",
        "bad-signature-in-query",
        "expired",
        "no-sub",
        "huge",
    ],
)
async def test_bad_credentials_get_401(
    headers: dict[str, str], query: dict[str, str] | None
) -> None:
    async with running() as (app, client):
        response = await rejection(client, headers=headers, query_string=query)
        assert services_of(app).slots.total == 0  # no slot is taken by a refusal
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == BEARER_CHALLENGE
    body = await error_body(response)
    assert body["error"] == "invalid_token"
    for credential in [*headers.values(), *(query or {}).values()]:
        secret_part = credential.removeprefix("Bearer ")
        if len(secret_part) > 8:
            assert secret_part not in json.dumps(body)


async def test_the_token_once_in_the_header_and_once_in_the_query_is_401() -> None:
    token = token_for("alice")
    async with running() as (_, client):
        response = await rejection(
            client, headers=bearer(token), query_string={"access_token": token}
        )
    assert response.status_code == 401


async def test_rejections_carry_the_security_headers() -> None:
    async with running() as (_, client):
        response = await rejection(client)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


# --- 403 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "null",
        "https://chat.example.com.evil.example",
        "https://chat.example.com/",
        "http://chat.example.com",
        "https://user@chat.example.com",
        "https://chat.example.com\t",
        "",
    ],
)
async def test_an_origin_not_allowed_gets_403(origin: str) -> None:
    overrides = {"GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com"}
    async with running(overrides) as (app, client):
        headers = {**bearer(token_for("alice")), "Origin": origin}
        response = await rejection(client, headers=headers)
        assert services_of(app).slots.total == 0
    assert response.status_code == 403
    assert "WWW-Authenticate" not in response.headers
    assert (await error_body(response))["error"] == "origin_not_allowed"


async def test_development_allows_only_local_origins_by_default() -> None:
    async with running() as (_, client):
        response = await rejection(
            client, headers={**bearer(token_for("a")), "Origin": "https://evil.example.com"}
        )
        assert response.status_code == 403
        headers = {**bearer(token_for("a")), "Origin": "https://localhost:3001"}
        async with client.websocket("/ws", headers=headers) as ws:
            assert (await receive_json(ws))["type"] == "welcome"


async def test_the_origin_is_checked_before_the_token() -> None:
    # A hostile page learns nothing about tokens: it is refused for where it is, first.
    overrides = {"GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com"}
    async with running(overrides) as (_, client):
        response = await rejection(client, headers={"Origin": "https://evil.example.com"})
    assert response.status_code == 403


async def test_a_missing_origin_can_be_refused() -> None:
    async with running({"GATEWAY_ALLOW_MISSING_ORIGIN": "false"}) as (_, client):
        response = await rejection(client, headers=bearer(token_for("alice")))
    assert response.status_code == 403


# --- 429 -----------------------------------------------------------------------------------


def retry_after_seconds(response: Response) -> int:
    value = int(response.headers["Retry-After"])
    assert value >= 1
    return value


async def test_too_many_attempts_from_one_address_get_429() -> None:
    async with running({"GATEWAY_CONNECT_RATE": "2/minute"}) as (_, client):
        # Refused attempts count too: guessing tokens costs quota.
        for _ in range(2):
            assert (await rejection(client, scope_base=peer("203.0.113.5"))).status_code == 401
        token = token_for("alice")
        response = await rejection(client, headers=bearer(token), scope_base=peer("203.0.113.5"))
        assert response.status_code == 429
        assert retry_after_seconds(response) <= 60
        assert (await error_body(response))["error"] == "too_many_attempts"
        # Another address has its own quota.
        async with client.websocket(
            "/ws", headers=bearer(token), scope_base=peer("198.51.100.9")
        ) as ws:
            assert (await receive_json(ws))["type"] == "welcome"


async def test_one_ipv6_client_cannot_multiply_its_quota_across_its_64() -> None:
    async with running({"GATEWAY_CONNECT_RATE": "1/minute"}) as (_, client):
        await rejection(client, scope_base=peer("2001:db8:1:2::1"))
        response = await rejection(client, scope_base=peer("2001:db8:1:2:ffff::7"))
    assert response.status_code == 429


async def test_a_spoofed_forwarded_for_does_not_escape_the_attempt_limit() -> None:
    overrides = {
        "GATEWAY_CONNECT_RATE": "2/minute",
        "GATEWAY_TLS": "proxy",
        "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8",
    }
    async with running(overrides) as (_, client):
        statuses = []
        for n in range(4):  # a direct attacker rotating the header
            response = await rejection(
                client,
                headers={"X-Forwarded-For": f"198.51.100.{n}", "Remote-Addr": f"192.0.2.{n}"},
                scope_base=peer("203.0.113.66"),
            )
            statuses.append(response.status_code)
    assert statuses == [401, 401, 429, 429]


async def test_clients_behind_a_trusted_proxy_have_their_own_quotas() -> None:
    overrides = {
        "GATEWAY_CONNECT_RATE": "1/minute",
        "GATEWAY_TLS": "proxy",
        "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8",
    }
    async with running(overrides) as (_, client):
        proxy = peer("10.0.0.1")
        first = await rejection(
            client, headers={"X-Forwarded-For": "198.51.100.1"}, scope_base=proxy
        )
        other = await rejection(
            client, headers={"X-Forwarded-For": "198.51.100.2"}, scope_base=proxy
        )
        again = await rejection(
            client, headers={"X-Forwarded-For": "198.51.100.1"}, scope_base=proxy
        )
    assert (first.status_code, other.status_code, again.status_code) == (401, 401, 429)


async def test_a_second_forwarded_for_line_from_the_proxy_is_believed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The client sends its own X-Forwarded-For; a proxy that appends a second line rather than
    # extending the first must not let the client's line pick the address.
    overrides = {"GATEWAY_TLS": "proxy", "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8"}
    headers = Headers([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.7")])
    caplog.set_level(logging.INFO, logger="gateway.audit")
    async with running(overrides) as (_, client):
        await rejection(client, headers=headers, scope_base=peer("10.0.0.1"))
    clients = [r.__dict__.get("client") for r in caplog.records if r.msg == "auth_refused"]
    assert clients == ["198.51.100.7"]


async def test_too_many_connections_for_one_user_get_429() -> None:
    async with running({"GATEWAY_MAX_CONNECTIONS_PER_USER": "1"}) as (app, client):
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            response = await rejection(client, headers=bearer(token_for("alice")))
            assert response.status_code == 429
            retry_after_seconds(response)
            assert (await error_body(response))["error"] == "too_many_connections"
            assert services_of(app).slots.for_user("alice") == 1  # the refusal took none
            async with client.websocket("/ws", headers=bearer(token_for("bob"))) as other:
                assert (await receive_json(other))["type"] == "welcome"
        # Alice's slot came back when her connection ended.
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            assert (await receive_json(ws))["type"] == "welcome"


# --- 503 -----------------------------------------------------------------------------------


async def test_a_full_server_gets_503() -> None:
    async with running({"GATEWAY_MAX_CONNECTIONS": "1"}) as (_, client):
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            response = await rejection(client, headers=bearer(token_for("bob")))
    assert response.status_code == 503
    retry_after_seconds(response)
    assert (await error_body(response))["error"] == "server_full"


async def test_drain_closes_connections_with_1001_and_refuses_new_ones() -> None:
    async with running() as (app, client):
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            async with asyncio.timeout(timeout(5)):
                await drain(app)
                with pytest.raises(WebsocketDisconnectError) as closed:
                    while True:
                        await ws.receive()
            assert closed.value.args == (1001,)
        assert services_of(app).sessions == {}
        assert services_of(app).slots.total == 0
        response = await rejection(client, headers=bearer(token_for("bob")))
    assert response.status_code == 503
    retry_after_seconds(response)
    assert (await error_body(response))["error"] == "shutting_down"


async def test_drain_without_connections_returns_at_once() -> None:
    async with running() as (app, _):
        async with asyncio.timeout(timeout(1)):
            await drain(app)
            await drain(app)  # again: harmless
        assert services_of(app).draining


async def test_drain_leaves_an_app_it_did_not_make_alone() -> None:
    await drain(Quart(__name__))


class BlockingVerifier(TokenVerifier):
    """Verifies as usual, once the test lets it: a verification in flight during shutdown."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def verify(self, token: str) -> Principal:
        self.entered.set()
        await self.release.wait()
        return await super().verify(token)


async def test_an_upgrade_verified_during_drain_is_refused() -> None:
    async with running() as (app, client):
        services = services_of(app)
        verifier = BlockingVerifier(services.settings)
        services.verifier = verifier
        attempt = asyncio.create_task(rejection(client, headers=bearer(token_for("alice"))))
        async with asyncio.timeout(timeout(5)):
            await verifier.entered.wait()
            await drain(app)
            verifier.release.set()
            response = await attempt
        assert response.status_code == 503
        assert services.slots.total == 0
        assert services.sessions == {}


async def test_an_upgrade_whose_slot_is_taken_while_the_drain_begins_is_refused() -> None:
    async with running() as (app, client):
        services = services_of(app)
        taken, go_on = asyncio.Event(), asyncio.Event()
        acquire = services.slots.acquire

        async def slow_acquire(user_id: str) -> Slot:  # as over a slow Redis
            slot = await acquire(user_id)
            taken.set()
            await go_on.wait()
            return slot

        services.slots.acquire = slow_acquire  # type: ignore[method-assign]
        attempt = asyncio.create_task(rejection(client, headers=bearer(token_for("alice"))))
        async with asyncio.timeout(timeout(5)):
            await taken.wait()
            await drain(app)
            go_on.set()
            response = await attempt
        assert response.status_code == 503
        assert (await error_body(response))["error"] == "shutting_down"
        assert services.slots.total == 0  # given back
        assert services.sessions == {}


# --- logs ----------------------------------------------------------------------------------


async def test_no_token_reaches_a_log_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = token_for("alice")
    bad = forged({"sub": "eve", "exp": time.time() + 60})
    async with running() as (_, client):
        async with client.websocket("/ws", query_string={"access_token": good}) as ws:
            await receive_json(ws)
        await rejection(client, query_string={"access_token": bad})
        await rejection(client, headers=bearer(bad))
    messages = [r.msg for r in caplog.records]
    assert "connection accepted" in messages
    assert "auth_refused" in messages
    for record in caplog.records:
        text = json.dumps(record.__dict__, default=repr) + record.getMessage()
        for token in (good, bad):
            assert token.rsplit(".", 1)[1] not in text
            assert token.split(".")[1] not in text


async def test_a_rejection_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    expired = forged({"sub": "eve", "exp": time.time() - 3600}, TEST_SECRET)
    async with running() as (_, client):
        await rejection(client, headers=bearer(expired), scope_base=peer("203.0.113.5"))
    (record,) = [r for r in caplog.records if r.msg == "auth_refused"]
    assert record.__dict__["status"] == 401
    assert record.__dict__["reason"] == "expired"
    assert record.__dict__["client"] == "203.0.113.5"


async def test_a_connection_close_is_logged_with_its_user(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.web")
    async with running() as (app, client):
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            await drain(app)
    (record,) = [r for r in caplog.records if r.msg == "connection closed"]
    assert record.__dict__["user_id"] == "alice"
    assert record.__dict__["close_code"] == 1001
    assert record.__dict__["duration_seconds"] >= 0


# --- wiring ----------------------------------------------------------------------------------


async def test_create_app_wires_the_settings_through() -> None:
    settings = make_settings({"GATEWAY_MAX_MESSAGE_BYTES": "1000", "GATEWAY_OPEN_ROOMS": "hall"})
    app = create_app(settings)
    services = services_of(app)
    assert services.settings is settings
    assert app.config["MAX_CONTENT_LENGTH"] <= 64 * 1024
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            welcome = await receive_json(ws)
    assert welcome["rooms"] == ["hall"]
    assert welcome["limits"]["max_message_bytes"] == 1000


# --- readiness -------------------------------------------------------------------------------


async def probe(client: Client, path: str) -> tuple[int, dict[str, str]]:
    response = await client.get(path)
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, str] = json.loads(await response.get_data())
    return response.status_code, body


async def test_readyz_is_ready_without_a_token_until_the_drain_begins() -> None:
    async with running() as (app, client):
        assert await probe(client, "/readyz") == (200, {"status": "ready"})
        await drain(app)
        assert await probe(client, "/readyz") == (503, {"status": "draining"})
        assert await probe(client, "/healthz") == (200, {"status": "ok"})  # still alive


class SickBroker(MemoryBroker):
    """A broker whose health check answers ``answer``: a bool, an exception, or never."""

    def __init__(self, answer: bool | Exception | None) -> None:
        super().__init__()
        self.answer = answer
        self.checks = 0
        self.release = asyncio.Event()

    async def healthy(self) -> bool:
        self.checks += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer is None:
            await asyncio.Event().wait()
        await self.release.wait()
        return bool(self.answer)


@pytest.mark.parametrize(
    "answer", [False, None, ConnectionError("redis://:hunter2@redis:6379 down")]
)
async def test_readyz_is_503_when_the_broker_is_down_slow_or_failing(
    answer: bool | Exception | None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(gateway.web, "READY_TIMEOUT_SECONDS", 0.01)
    async with running() as (app, client):
        broker = SickBroker(answer)
        broker.release.set()
        services_of(app).broker = broker
        async with asyncio.timeout(timeout(5)):
            assert await probe(client, "/readyz") == (503, {"status": "broker_unavailable"})
        broker.answer = True
        assert await probe(client, "/readyz") == (200, {"status": "ready"})  # it recovers
    assert "hunter2" not in caplog.text


async def test_concurrent_readiness_probes_share_one_broker_check() -> None:
    async with running() as (app, client):
        broker = SickBroker(True)
        services_of(app).broker = broker
        probes = [asyncio.create_task(probe(client, "/readyz")) for _ in range(50)]
        async with asyncio.timeout(timeout(5)):
            while broker.checks == 0:
                await asyncio.sleep(0)
            for _ in range(20):
                await asyncio.sleep(0)  # every probe has arrived and found the check in flight
            broker.release.set()
            results = await asyncio.gather(*probes)
    assert results == [(200, {"status": "ready"})] * 50
    assert broker.checks == 1


# --- graceful drain --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "spread_seconds", "batches", "interval_seconds"),
    [
        (20, 2.0, 20, 0.1),
        (10_000, 10.0, 200, 0.05),  # at most 20 wake-ups a second
        (3, 10.0, 3, 10 / 3),
        (7, 0.0, 1, 0.0),  # all at once
        (1, 10.0, 1, 10.0),
        (1001, 1.0, 20, 0.05),
    ],
)
def test_close_batches_are_even_and_cover_every_item_once(
    count: int, spread_seconds: float, batches: int, interval_seconds: float
) -> None:
    items = list(range(count))
    schedule = close_batches(items, spread_seconds)
    assert len(schedule) == batches
    offsets = [offset for offset, _ in schedule]
    assert offsets == pytest.approx([k * interval_seconds for k in range(batches)])
    assert offsets[0] == 0 and offsets[-1] < max(spread_seconds, 1e-9)
    assert [item for _, batch in schedule for item in batch] == items  # in order, each once
    sizes = {len(batch) for _, batch in schedule}
    assert max(sizes) - min(sizes) <= 1


def test_no_items_no_batches() -> None:
    assert close_batches([], 10.0) == []


class FakeTime:
    """A monotonic clock that only moves when the drain sleeps."""

    def __init__(self) -> None:
        self.now_seconds = 1000.0

    def clock(self) -> float:
        return self.now_seconds

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now_seconds += seconds
        await asyncio.sleep(0)


async def test_drain_spreads_the_closes_over_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime()
    requested: list[tuple[float, str, CloseCode]] = []
    request_close = Session.request_close

    def recording(session: Session, code: CloseCode) -> None:
        if session.close_code is None:  # the drain's request, not the connection's own echo
            requested.append((fake.now_seconds - 1000.0, session.conn_id, code))
        request_close(session, code)

    monkeypatch.setattr(Session, "request_close", recording)
    overrides = {"GATEWAY_SHUTDOWN_SPREAD_SECONDS": "2", "GATEWAY_MAX_CONNECTIONS_PER_USER": "20"}
    async with running(overrides) as (app, client), contextlib.AsyncExitStack() as stack:
        sockets = []
        for _ in range(10):
            opening = client.websocket("/ws", headers=bearer(token_for("alice")))
            ws = await stack.enter_async_context(
                cast(contextlib.AbstractAsyncContextManager[WebsocketConnection], opening)
            )
            await receive_json(ws)
            sockets.append(ws)
        conn_ids = sorted(services_of(app).sessions)
        async with asyncio.timeout(timeout(5)):
            await drain(app, clock=fake.clock, sleep=fake.sleep)
            for ws in sockets:
                with pytest.raises(WebsocketDisconnectError) as closed:
                    while True:
                        await ws.receive()
                assert closed.value.args == (1001,)
        assert services_of(app).sessions == {}
    # One connection per batch, 0.2 s apart, in the order of their (random) ids.
    assert [offset for offset, _, _ in requested] == pytest.approx([k * 0.2 for k in range(10)])
    assert [conn_id for _, conn_id, _ in requested] == conn_ids
    assert {code for _, _, code in requested} == {CloseCode.GOING_AWAY}


async def test_drain_abandons_a_connection_that_outlives_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    overrides = {"GATEWAY_SHUTDOWN_SPREAD_SECONDS": "0", "GATEWAY_SHUTDOWN_GRACE_SECONDS": "3"}
    caplog.set_level(logging.INFO, logger="gateway.app")
    async with running(overrides) as (app, client):
        services = services_of(app)
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            [session] = services.sessions.values()
            session.request_close = lambda code, why="": None  # type: ignore[method-assign]
            async with asyncio.timeout(timeout(5)):
                await drain(app, clock=fake.clock, sleep=fake.sleep)  # returns: not stuck
            assert services.draining
            session.close_requested.set()  # let the test's connection end
    [record] = [r for r in caplog.records if r.msg == "shutdown grace ran out"]
    assert record.__dict__["abandoned"] == 1


# --- metrics and logs of a connection's life -------------------------------------------------


def attempts(app: Quart, outcome: str) -> float:
    found = services_of(app).metrics.registry.get_sample_value(
        "gateway_connection_attempts_total", {"outcome": outcome}
    )
    assert found is not None
    return found


async def test_every_upgrade_attempt_is_counted_by_outcome() -> None:
    overrides = {
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com",
        "GATEWAY_MAX_CONNECTIONS_PER_USER": "1",
    }
    async with running(overrides) as (app, client):
        await rejection(client)  # no token
        await rejection(client, headers={**bearer(token_for("bob")), "Origin": "https://evil"})
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            await receive_json(ws)
            await rejection(client, headers=bearer(token_for("alice")))  # one per user
        await drain(app)
        await rejection(client, headers=bearer(token_for("alice")))
        counted = {o: attempts(app, o) for o in ("accepted", "token", "origin", "capacity")}
        assert counted == {"accepted": 1, "token": 1, "origin": 1, "capacity": 1}
        assert attempts(app, "shutting_down") == 1
        assert attempts(app, "rate") == 0


async def test_a_client_close_is_logged_and_counted_with_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.web")
    async with running() as (app, client):
        async with client.websocket(
            "/ws", headers=bearer(token_for("alice")), scope_base=peer("198.51.100.4")
        ) as ws:
            await receive_json(ws)
            assert (
                services_of(app).metrics.registry.get_sample_value("gateway_connections_open") == 1
            )
        # Quart's test client disconnects without a code: ASGI's "none", 1005.
        registry = services_of(app).metrics.registry
        assert registry.get_sample_value("gateway_disconnects_total", {"code": "1005"}) == 1
        assert registry.get_sample_value("gateway_connections_open") == 0
    (record,) = [r for r in caplog.records if r.msg == "connection closed"]
    fields = record.__dict__
    assert (fields["user_id"], fields["client"], fields["close_code"]) == (
        "alice",
        "198.51.100.4",
        1005,
    )
    assert isinstance(fields["conn_id"], str) and fields["conn_id"]
