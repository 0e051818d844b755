"""The JWKS key set (gateway.jwks) against a local https server these tests start, whose CA the
gateway trusts through the standard ``SSL_CERT_FILE``: stale keys through an outage, the host
allow-list and https-only redirects, the size cap, and fetches bounded for unknown kids."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.auth import TokenVerifier
from gateway.errors import AuthError
from gateway.jwks import MAX_BYTES, REFETCH_INTERVAL_SECONDS, JwksCache, JwksError
from gateway.settings import load_settings


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Site(HTTPServer):
    routes: dict[str, Route]
    hits: dict[str, int]

    def url(self, path: str, host: str = "localhost", scheme: str = "https") -> str:
        return f"{scheme}://{host}:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    server: Site

    def do_GET(self) -> None:
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        route = self.server.routes.get(self.path, Route(404, b"{}"))
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        self.wfile.write(route.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(tls: ssl.SSLContext | None) -> Iterator[Site]:
    site = Site(("127.0.0.1", 0), Handler)
    site.routes, site.hits = {}, {}
    if tls is not None:
        site.socket = tls.wrap_socket(site.socket, server_side=True)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.shutdown()
        site.server_close()
        thread.join()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway trusts the test CA the standard way: SSL_CERT_FILE."""
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))


@pytest.fixture
def site(ca: trustme.CA) -> Iterator[Site]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(tls)
    yield from serve(tls)


@pytest.fixture
def plain_site() -> Iterator[Site]:
    yield from serve(None)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_set(key: rsa.RSAPrivateKey, *kids: str) -> bytes:
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return json.dumps({"keys": [{**public, "kid": kid, "use": "sig"} for kid in kids]}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(url: str, clock: Clock | None = None, **kwargs: Any) -> JwksCache:
    options: dict[str, Any] = {"fresh_seconds": 300.0, "max_stale_seconds": 3600.0, **kwargs}
    if clock is not None:
        options["clock"] = clock
    return JwksCache(url, **options)


async def test_keys_come_over_https_trusted_through_ssl_cert_file(
    site: Site, key: rsa.RSAPrivateKey, trusted: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.routes["/jwks"] = Route(body=key_set(key, "k1"))
    assert (await cache(site.url("/jwks")).key("k1")).key_id == "k1"
    monkeypatch.delenv("SSL_CERT_FILE")  # a CA nobody trusts: no keys
    with pytest.raises(JwksError):
        await cache(site.url("/jwks")).key("k1")


async def test_the_last_good_keys_verify_through_an_outage_until_they_are_too_old(
    site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    clock = Clock()
    site.routes["/jwks"] = Route(body=key_set(key, "k1"))
    keys = cache(site.url("/jwks"), clock, fresh_seconds=300.0, max_stale_seconds=3600.0)
    await keys.key("k1")
    site.routes["/jwks"] = Route(500, b"{}")  # the endpoint goes down
    clock.now += 301  # stale: used still, refreshed in the background (which fails)
    assert (await keys.key("k1")).key_id == "k1"
    for _ in range(50):  # let the background refresh run and fail
        if site.hits["/jwks"] >= 2 and keys._running is None:
            break
        await asyncio.sleep(0.02)
    assert site.hits["/jwks"] == 2
    clock.now += 3000  # 3301 s old: still within the maximum age
    assert (await keys.key("k1")).key_id == "k1"
    clock.now += 400  # past it: a fetch must succeed now, and it does not
    with pytest.raises(JwksError):
        await keys.key("k1")
    site.routes["/jwks"] = Route(body=key_set(key, "k1", "k2"))  # back
    assert (await keys.key("k2")).key_id == "k2"


async def test_a_background_refresh_brings_a_rotated_key(
    site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    clock = Clock()
    site.routes["/jwks"] = Route(body=key_set(key, "old"))
    keys = cache(site.url("/jwks"), clock)
    await keys.key("old")
    site.routes["/jwks"] = Route(body=key_set(key, "old", "new"))
    clock.now += 301
    assert (await keys.key("old")).key_id == "old"  # at once, from the stale set
    for _ in range(50):
        if keys.fetched_at == clock.now:
            break
        await asyncio.sleep(0.02)
    assert (await keys.key("new")).key_id == "new"
    assert site.hits["/jwks"] == 2


async def test_unknown_kids_set_off_one_fetch_per_interval(
    site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    clock = Clock()
    site.routes["/jwks"] = Route(body=key_set(key, "k1"))
    keys = cache(site.url("/jwks"), clock)
    for n in range(20):
        with pytest.raises(KeyError):
            await keys.key(f"forged-{n}")
    assert site.hits["/jwks"] == 1
    clock.now += REFETCH_INTERVAL_SECONDS
    site.routes["/jwks"] = Route(body=key_set(key, "k1", "rotated"))
    assert (await keys.key("rotated")).key_id == "rotated"  # a rotation is picked up
    assert site.hits["/jwks"] == 2


async def test_a_redirect_is_followed_only_to_an_allowed_host(
    site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    site.routes["/jwks"] = Route(body=key_set(key, "k1"))
    elsewhere = site.url("/jwks", host="127.0.0.1")  # another host name, same server
    site.routes["/moved"] = Route(302, b"", {"Location": elsewhere})
    with pytest.raises(JwksError, match="not an allowed host"):
        await cache(site.url("/moved")).key("k1")
    assert "/jwks" not in site.hits
    allowed = cache(site.url("/moved"), allowed_hosts=("localhost", "127.0.0.1"))
    assert (await allowed.key("k1")).key_id == "k1"


async def test_a_redirect_from_https_to_http_is_not_followed(
    site: Site, plain_site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    plain_site.routes["/jwks"] = Route(body=key_set(key, "k1"))
    downgrade = plain_site.url("/jwks", scheme="http")
    site.routes["/down"] = Route(301, b"", {"Location": downgrade})
    with pytest.raises(JwksError, match="from https to http"):
        await cache(site.url("/down"), allowed_hosts=("localhost",)).key("k1")
    assert plain_site.hits == {}


async def test_a_key_set_larger_than_the_cap_is_refused(
    site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    real = json.loads(key_set(key, "k1"))
    site.routes["/big"] = Route(body=json.dumps({**real, "pad": "x" * MAX_BYTES}).encode())
    with pytest.raises(JwksError, match="larger than"):
        await cache(site.url("/big")).key("k1")


async def test_the_verifier_keeps_accepting_valid_tokens_while_the_endpoint_is_down(
    site: Site, key: rsa.RSAPrivateKey, trusted: None
) -> None:
    site.routes["/jwks"] = Route(body=key_set(key, "k1"))
    settings = load_settings(
        {
            "GATEWAY_JWT_JWKS_URL": site.url("/jwks"),
            "GATEWAY_JWT_JWKS_CACHE_SECONDS": "1",
            "GATEWAY_JWT_JWKS_MAX_STALE_SECONDS": "3600",
        }
    )
    verifier = TokenVerifier(settings)

    token = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 600},
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    assert (await verifier.verify(token)).user_id == "alice"
    site.routes["/jwks"] = Route(503, b"{}")
    await asyncio.sleep(1.2)  # the cached set is past its cache time
    assert (await verifier.verify(token)).user_id == "alice"  # the last good keys
    forged = jwt.encode({"sub": "x", "exp": 2**31}, key, algorithm="RS256", headers={"kid": "zz"})
    with pytest.raises(AuthError) as info:
        await verifier.verify(forged)
    assert info.value.reason == "unknown_key"
