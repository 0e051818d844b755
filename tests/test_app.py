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
from typing import Any

import jwt
import pytest
from quart import Quart
from quart.testing import WebsocketResponseError
from quart.testing.connections import WebsocketDisconnectError
from quart.typing import TestClientProtocol as Client
from quart.typing import TestWebsocketConnectionProtocol as WebsocketConnection
from quart.wrappers import Response
from werkzeug.datastructures import Headers

from gateway.app import SERVICES_KEY, create_app, drain
from gateway.auth import Principal, TokenVerifier, mint_token
from gateway.protocol import validate_server_frame
from gateway.settings import Settings
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
    caplog.set_level(logging.INFO, logger="gateway.web")
    async with running(overrides) as (_, client):
        await rejection(client, headers=headers, scope_base=peer("10.0.0.1"))
    clients = [r.__dict__.get("client") for r in caplog.records if r.msg == "upgrade rejected"]
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
    assert "upgrade rejected" in messages
    for record in caplog.records:
        text = json.dumps(record.__dict__, default=repr) + record.getMessage()
        for token in (good, bad):
            assert token.rsplit(".", 1)[1] not in text
            assert token.split(".")[1] not in text


async def test_a_rejection_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.web")
    expired = forged({"sub": "eve", "exp": time.time() - 3600}, TEST_SECRET)
    async with running() as (_, client):
        await rejection(client, headers=bearer(expired), scope_base=peer("203.0.113.5"))
    (record,) = [r for r in caplog.records if r.msg == "upgrade rejected"]
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
