"""Tests for gateway.web's HTTP side: client_address(), the development token endpoint, and the
security headers, through Quart's test client (``app.test_app()`` runs the serving hooks).

The WebSocket upgrade itself (every rejection, a welcome) is in tests/test_app.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client
from quart.wrappers import Response

from gateway.app import create_app
from gateway.auth import TokenVerifier
from gateway.settings import Settings
from gateway.web import SECURITY_HEADERS, client_address, content_security_policy, page_files
from tests.helpers import make_settings

__all__: list[str] = []


@contextlib.asynccontextmanager
async def running(overrides: Mapping[str, str] | None = None) -> AsyncIterator[Client]:
    """A test client of an app built from ``make_settings(overrides)``, serving hooks run."""
    app = create_app(make_settings(overrides))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def json_body(response: Response) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(await response.get_data())
    return body


def production_settings(**overrides: str) -> Mapping[str, str]:
    """Production, made valid without files: TLS ends at a trusted proxy, a strong secret, an
    origin and an audience."""
    return {
        "GATEWAY_ENV": "production",
        "GATEWAY_TLS": "proxy",
        "GATEWAY_TRUSTED_PROXIES": "10.0.0.1",
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com",
        "GATEWAY_JWT_AUDIENCE": "chat",
        **overrides,
    }


# --- client_address ------------------------------------------------------------------------


def proxied(trusted: str = "10.0.0.0/8,192.0.2.1") -> Settings:
    return make_settings({"GATEWAY_TLS": "proxy", "GATEWAY_TRUSTED_PROXIES": trusted})


def test_without_proxy_mode_forwarded_for_is_ignored() -> None:
    settings = make_settings({"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8"})  # TLS on
    assert client_address("10.0.0.1", "198.51.100.7", settings) == "10.0.0.1"


def test_proxy_mode_without_trusted_proxies_ignores_forwarded_for() -> None:
    settings = make_settings({"GATEWAY_TLS": "proxy"})
    assert client_address("10.0.0.1", "198.51.100.7", settings) == "10.0.0.1"


def test_a_trusted_proxy_forwards_the_client_address() -> None:
    assert client_address("10.0.0.1", "198.51.100.7", proxied()) == "198.51.100.7"


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    # The attacker talks to the gateway directly and claims to be someone else.
    assert client_address("203.0.113.66", "198.51.100.7", proxied()) == "203.0.113.66"
    assert client_address("203.0.113.66", "10.0.0.1", proxied()) == "203.0.113.66"


def test_the_nearest_untrusted_hop_is_chosen() -> None:
    # Prepended by the client, then the real client, then two trusted proxies appended.
    chain = "1.1.1.1, 6.6.6.6, 198.51.100.7, 192.0.2.1, 10.1.2.3"
    assert client_address("10.0.0.1", chain, proxied()) == "198.51.100.7"


def test_every_hop_trusted_falls_back_to_the_peer() -> None:
    assert client_address("10.0.0.1", "10.0.0.2, 192.0.2.1", proxied()) == "10.0.0.1"


@pytest.mark.parametrize(
    "forwarded_for",
    [
        "garbage",
        "198.51.100.7, garbage",  # garbage nearer than the real client
        "198.51.100.7,",  # an empty hop
        "001.002.003.004",  # leading zeros are ambiguous (octal?), so not an address
        "198.51.100.7:5555",  # a port is not part of an address
        "198.51.100.7\x00",
        "[2001:db8::1]",
        "999.1.1.1",
        "x" * 10_000,
    ],
)
def test_garbage_hops_never_become_the_address(forwarded_for: str) -> None:
    assert client_address("10.0.0.1", forwarded_for, proxied()) == "10.0.0.1"


def test_garbage_beyond_the_nearest_client_does_not_matter() -> None:
    assert client_address("10.0.0.1", "garbage, 198.51.100.7", proxied()) == "198.51.100.7"


def test_the_forwarded_address_is_normalised() -> None:
    assert client_address("10.0.0.1", " 2001:DB8:0::1 ", proxied()) == "2001:db8::1"


def test_an_ipv4_mapped_proxy_peer_is_trusted() -> None:
    # A dual-stack listener (GATEWAY_HOST=::) sees an IPv4 proxy as ::ffff:a.b.c.d.
    assert client_address("::ffff:10.0.0.1", "198.51.100.7", proxied()) == "198.51.100.7"


def test_a_trusted_ipv6_network() -> None:
    settings = proxied("2001:db8:ffff::/48")
    assert client_address("2001:db8:ffff::9", "198.51.100.7", settings) == "198.51.100.7"
    assert client_address("2001:db8:eeee::9", "198.51.100.7", settings) == "2001:db8:eeee::9"


def test_no_peer_and_no_header() -> None:
    assert client_address(None, None, proxied()) == "unknown"
    assert client_address("10.0.0.1", None, proxied()) == "10.0.0.1"
    assert client_address("10.0.0.1", "", proxied()) == "10.0.0.1"


# --- POST /dev/token -----------------------------------------------------------------------


async def test_dev_token_mints_a_token_the_verifier_accepts() -> None:
    settings = make_settings()
    async with running() as client:
        before_ms = int(time.time()) * 1000
        response = await client.post("/dev/token", json={"name": "  Alice  ", "sub": "alice"})
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store"  # a credential is never cached
        body = await json_body(response)
    assert set(body) == {"token", "user", "rooms", "expires_at"}
    assert body["user"] == {"id": "alice", "name": "Alice"}
    assert body["rooms"] == ["dev", "lobby", "random"]
    ttl_ms = settings.dev_token_ttl_seconds * 1000
    assert before_ms + ttl_ms <= body["expires_at"] <= before_ms + ttl_ms + 2000
    principal = await TokenVerifier(settings).verify(body["token"])
    assert principal.user_id == "alice"
    assert principal.name == "Alice"
    assert principal.rooms == frozenset({"dev", "random"})
    assert principal.expires_at is not None
    assert principal.expires_at * 1000 == body["expires_at"]


async def test_dev_token_without_sub_makes_one_up() -> None:
    async with running() as client:
        first = await json_body(await client.post("/dev/token", json={"name": "Alice"}))
        second = await json_body(await client.post("/dev/token", json={"name": "Alice"}))
    assert first["user"]["id"].startswith("u-")
    assert first["user"]["id"] != second["user"]["id"]  # same name, different people


async def test_dev_token_honours_a_requested_lifetime() -> None:
    async with running() as client:
        response = await client.post("/dev/token", json={"name": "Al", "ttl_seconds": 60})
        body = await json_body(response)
    principal = await TokenVerifier(make_settings()).verify(body["token"])
    assert principal.expires_at is not None
    assert 55 <= principal.expires_at - time.time() <= 61


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 65},
        {"name": 42},
        {"name": None},
        {"name": ["Alice"]},
        {"name": "Alice", "sub": ""},
        {"name": "Alice", "sub": "alice\n"},
        {"name": "Alice", "sub": "al ice"},
        {"name": "Alice", "sub": "x" * 129},
        {"name": "Alice", "sub": 7},
        {"name": "Alice", "sub": "../../etc/passwd"},
        {"name": "Alice", "ttl_seconds": 0},
        {"name": "Alice", "ttl_seconds": 4},
        {"name": "Alice", "ttl_seconds": 86401},
        {"name": "Alice", "ttl_seconds": -60},
        {"name": "Alice", "ttl_seconds": 60.5},
        {"name": "Alice", "ttl_seconds": True},
        {"name": "Alice", "ttl_seconds": "60"},
        {"name": "Alice", "ttl_seconds": 10**400},
    ],
)
async def test_dev_token_rejects_invalid_requests(payload: dict[str, object]) -> None:
    async with running() as client:
        response = await client.post("/dev/token", json=payload)
        assert response.status_code == 400
        body = await json_body(response)
    assert body["error"] == "invalid_request"
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert "token" not in body


@pytest.mark.parametrize(
    "name", ["Al\x00ice", "Alice\r\nX-Injected: 1", "\x1b[31mAlice", "Al\x7fice", "Al\u0085ice"]
)
async def test_dev_token_control_characters_in_the_name_are_a_400(name: str) -> None:
    async with running() as client:
        response = await client.post("/dev/token", json={"name": name})
        assert response.status_code == 400
        assert (await json_body(response))["error"] == "invalid_request"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b"\xff\xfe{}",  # not UTF-8
        b'{"name": "\\ud800"}',  # a lone surrogate: no UTF-8 encoding exists for it
        b"[" * 10_000,  # nesting deep enough to exhaust a recursive parser
        b"[]",
        b'"Alice"',
        b"null",
        b'{"name": "A"' * 10,
    ],
)
async def test_dev_token_rejects_a_body_that_is_not_a_json_object(data: bytes) -> None:
    async with running() as client:
        response = await client.post(
            "/dev/token", data=data, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert (await json_body(response))["error"] == "invalid_request"


async def test_dev_token_refuses_a_large_body() -> None:
    payload = json.dumps({"name": "Alice", "padding": "x" * 64 * 1024}).encode()
    async with running() as client:
        response = await client.post(
            "/dev/token", data=payload, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413


async def test_dev_token_is_post_only() -> None:
    async with running() as client:
        response = await client.get("/dev/token")
    assert response.status_code == 405


@pytest.mark.parametrize(
    "overrides",
    [{"GATEWAY_DEV_TOKEN_ENDPOINT": "false"}, production_settings()],
    ids=["turned-off", "production"],
)
async def test_dev_token_endpoint_is_absent_when_off(overrides: Mapping[str, str]) -> None:
    async with running(overrides) as client:
        response = await client.post("/dev/token", json={"name": "Alice"})
        assert response.status_code == 404
        assert b"token" not in await response.get_data()


# --- security headers ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/healthz", "/static/app.js", "/nope"])
async def test_security_headers_on_every_response(path: str) -> None:
    async with running() as client:
        response = await client.get(path)
    for name, value in SECURITY_HEADERS.items():
        if name != "Cache-Control":  # the page and static files may be cached
            assert response.headers.get(name) == value, name
    assert "Strict-Transport-Security" not in response.headers  # development
    assert "Server" not in response.headers


@pytest.mark.parametrize("path", ["/healthz", "/nope"])
async def test_json_and_errors_are_never_cached(path: str) -> None:
    async with running() as client:
        response = await client.get(path)
    assert response.headers["Cache-Control"] == "no-store"


async def test_security_headers_are_not_duplicated() -> None:
    async with running() as client:
        response = await client.get("/healthz")
    for name in SECURITY_HEADERS:
        assert len(response.headers.getlist(name)) == 1, name


async def test_the_content_security_policy_allows_no_inline_script_or_framing() -> None:
    async with running() as client:
        response = await client.get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy


async def test_production_adds_strict_transport_security() -> None:
    async with running(production_settings()) as client:
        response = await client.get("/healthz")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    max_age = int(response.headers["Strict-Transport-Security"].split("=")[1].split(";")[0])
    assert max_age >= 180 * 86400


async def test_index_serves_the_chat_page() -> None:
    async with running() as client:
        response = await client.get("/")
        text = await response.get_data(as_text=True)
    assert response.status_code == 200
    assert response.content_type.startswith("text/html")
    assert "<html" in text.lower()


async def test_healthz() -> None:
    async with running() as client:
        response = await client.get("/healthz")
        assert response.status_code == 200
        assert response.content_type == "application/json"
        assert await json_body(response) == {"status": "ok"}


async def test_static_files_cannot_escape_the_static_folder() -> None:
    async with running() as client:
        for path in ("/static/../gateway/settings.py", "/static/..%2fpyproject.toml"):
            response = await client.get(path)
            assert response.status_code == 404, path


# --- the chat page's files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/index.html", "text/html"),
    ],
)
async def test_the_page_files_are_served(path: str, content_type: str) -> None:
    async with running() as client:
        response = await client.get(path)
        assert response.status_code == 200
        assert response.content_type.startswith(content_type)
        assert await response.get_data()


@pytest.mark.parametrize(
    "path",
    [
        "/static/../gateway/settings.py",
        "/static/..%2fgateway%2fsettings.py",
        "/static/%2e%2e/pyproject.toml",
        "/static/",
        "/static/nope.js",
        "/static/app.js.map",
        "/static/.hidden",
    ],
)
async def test_nothing_outside_the_page_is_served(path: str) -> None:
    async with running() as client:
        response = await client.get(path)
        assert response.status_code == 404
        assert b"import" not in await response.get_data()


# --- the chat page and where it gets tokens -------------------------------------------------


def token_meta(page: bytes) -> tuple[str, str]:
    found = re.search(
        rb'<meta name="gateway-token-url" content="([^"]*)" data-mode="([^"]*)">', page
    )
    assert found is not None, "index.html names its token source"
    return found[1].decode(), found[2].decode()


async def test_development_serves_the_page_with_the_dev_token_endpoint() -> None:
    async with running() as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert token_meta(await response.get_data(as_text=False)) == ("/dev/token", "dev")


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/index.html", "/static/style.css"])
async def test_production_without_a_token_url_serves_no_page(path: str) -> None:
    """Nobody could sign in on it: production has no /dev/token."""
    async with running(production_settings()) as client:
        response = await client.get(path)
        assert response.status_code == 404
        assert (await json_body(response))["detail"] == "this gateway serves no chat page"


@pytest.mark.parametrize("url", ["/auth/chat-token", "https://auth.example.com/chat/token"])
async def test_production_with_a_token_url_serves_the_page_that_calls_it(url: str) -> None:
    async with running(production_settings(GATEWAY_PAGE_TOKEN_URL=url)) as client:
        for path in ("/", "/static/index.html"):
            response = await client.get(path)
            assert response.status_code == 200
            assert token_meta(await response.get_data(as_text=False)) == (url, "session")
        assert (await client.get("/static/app.js")).status_code == 200
        assert (await client.post("/dev/token", json={"name": "Alice"})).status_code == 404


async def test_the_token_url_wins_over_the_dev_endpoint_in_development() -> None:
    async with running({"GATEWAY_PAGE_TOKEN_URL": "/login/token"}) as client:
        page = await (await client.get("/")).get_data(as_text=False)
    assert token_meta(page) == ("/login/token", "session")


async def test_the_token_url_is_escaped_into_the_page() -> None:
    url = "/auth/a&b'c"
    files = page_files(make_settings({"GATEWAY_PAGE_TOKEN_URL": url}))
    page = files["index.html"][0]
    assert b'content="/auth/a&amp;b&#x27;c"' in page
    assert page.count(b'name="gateway-token-url"') == 1


@pytest.mark.parametrize(
    ("url", "connect_src"),
    [
        (None, "connect-src 'self';"),
        ("/auth/chat-token", "connect-src 'self';"),
        (
            "https://auth.example.com:8443/chat/token",
            "connect-src 'self' https://auth.example.com:8443;",
        ),
    ],
)
async def test_the_page_may_connect_to_the_token_urls_origin_only(
    url: str | None, connect_src: str
) -> None:
    env = {"GATEWAY_PAGE_TOKEN_URL": url} if url else {}
    async with running(env) as client:
        for path in ("/", "/healthz"):
            response = await client.get(path)
            policy = response.headers["Content-Security-Policy"]
            assert connect_src in policy
            assert response.headers.getlist("Content-Security-Policy") == [policy]
    assert content_security_policy(make_settings(env)) == policy
