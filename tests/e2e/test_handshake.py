"""The upgrade, on a real TLS socket: every rejection is a real HTTP response before it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from tests.e2e.conftest import Gateway, StartGateway
from tests.helpers import TEST_SECRET, timeout

pytestmark = pytest.mark.e2e


async def rejected(gw: Gateway, **kwargs: object) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        ws = await gw.connect(**kwargs)  # type: ignore[arg-type]
        await ws.close()
    return caught.value


def body(error: InvalidStatus) -> dict[str, str]:
    parsed: dict[str, str] = json.loads(error.response.body or b"{}")
    return parsed


async def test_accepts_a_bearer_token_and_welcomes(gateway: Gateway) -> None:
    client = await gateway.user("alice", rooms=["dev"])
    assert client.welcome["user"] == {"id": "alice", "name": "Alice"}
    assert client.welcome["rooms"] == ["dev", "lobby"]
    assert client.welcome["limits"]["max_message_bytes"] == 16 * 1024
    await client.close()


async def test_accepts_the_access_token_query_parameter(gateway: Gateway) -> None:
    token = gateway.token("bob")
    ws = await gateway.connect(url=f"{gateway.url}?access_token={token}")
    welcome = json.loads(await ws.recv())
    assert welcome["user"]["id"] == "bob"
    await ws.close()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer not.a.jwt",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer " + jwt.encode({"sub": "eve", "exp": time.time() + 60}, "wrong-" + "k" * 40),
        "Bearer " + jwt.encode({"sub": "eve", "exp": time.time() - 3600}, TEST_SECRET),
        "Bearer " + jwt.encode({"sub": "eve", "exp": time.time() + 60}, None, algorithm="none"),  # type: ignore[arg-type]
        "Bearer " + jwt.encode({"exp": time.time() + 60}, TEST_SECRET),
    ],
)
async def test_bad_credentials_get_401(gateway: Gateway, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    error = await rejected(gateway, additional_headers=headers)
    assert error.response.status_code == 401
    assert error.response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert error.response.headers["Content-Type"] == "application/json"
    reply = body(error)
    assert reply["error"] == "invalid_token"
    assert reply["detail"]
    if authorization is not None and "." in authorization:
        assert authorization.split()[-1] not in json.dumps(reply)


async def test_expired_token_says_expired(gateway: Gateway) -> None:
    token = jwt.encode({"sub": "eve", "exp": time.time() - 3600}, TEST_SECRET)
    error = await rejected(gateway, token=token)
    assert "expired" in body(error)["detail"]


async def test_origin_allow_list(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_ALLOWED_ORIGINS="https://chat.example.com") as gw:
        token = gw.token("alice")
        error = await rejected(gw, token=token, origin="https://evil.example.com")
        assert error.response.status_code == 403
        assert body(error)["error"] == "origin_not_allowed"
        ws = await gw.connect(token, origin="https://chat.example.com")
        await ws.close()
        ws = await gw.connect(token)  # no Origin: a non-browser client, allowed by default
        await ws.close()


async def test_missing_origin_can_be_refused(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_ALLOW_MISSING_ORIGIN="false") as gw:
        error = await rejected(gw, token=gw.token("alice"))
        assert error.response.status_code == 403


async def test_connection_attempts_per_address(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_CONNECT_RATE="3/minute") as gw:
        for _ in range(3):
            ws = await gw.connect(gw.token("alice"))
            await ws.close()
        error = await rejected(gw, token=gw.token("alice"))
        assert error.response.status_code == 429
        assert int(error.response.headers["Retry-After"]) >= 1
        assert body(error)["error"] == "too_many_attempts"


async def test_cross_origin_attempts_do_not_spend_the_addresss_quota(
    start_gateway: StartGateway,
) -> None:
    # A page on another site makes the visitor's browser try again and again: each is refused
    # for its origin, and the visitor's own page can still connect afterwards.
    async with start_gateway(
        GATEWAY_CONNECT_RATE="3/minute", GATEWAY_ALLOWED_ORIGINS="https://chat.example.com"
    ) as gw:
        for _ in range(25):
            error = await rejected(gw, origin="https://evil.example.com")
            assert error.response.status_code == 403
        ws = await gw.connect(gw.token("alice"), origin="https://chat.example.com")
        await ws.close()


async def test_open_connections_per_user(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_MAX_CONNECTIONS_PER_USER="2") as gw:
        first = await gw.user("alice")
        second = await gw.user("alice")
        error = await rejected(gw, token=gw.token("alice"))
        assert error.response.status_code == 429
        assert "Retry-After" in error.response.headers
        other = await gw.user("bob")  # another user is not affected
        await first.close()
        await first.ws.wait_closed()
        third = await gw.user("alice")  # the slot came back
        for client in (second, other, third):
            await client.close()


async def test_total_connections_cap(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_MAX_CONNECTIONS="2") as gw:
        clients = [await gw.user("alice"), await gw.user("bob")]
        error = await rejected(gw, token=gw.token("carol"))
        assert error.response.status_code == 503
        assert "Retry-After" in error.response.headers
        for client in clients:
            await client.close()


async def test_permessage_deflate_is_refused_by_default(gateway: Gateway) -> None:
    ws = await gateway.connect(gateway.token("alice"), compression="deflate")
    assert ws.response is not None
    assert "Sec-WebSocket-Extensions" not in ws.response.headers
    await ws.close()


async def test_permessage_deflate_when_enabled(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_PERMESSAGE_DEFLATE="true") as gw:
        ws = await gw.connect(gw.token("alice"), compression="deflate")
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        await ws.close()


async def test_no_token_reaches_any_log(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = gateway.token("alice")
    ws = await gateway.connect(url=f"{gateway.url}?access_token={token}")
    await ws.recv()
    await ws.close()
    bad = token[:-4] + "AAAA"
    with pytest.raises(InvalidStatus):
        await gateway.connect(url=f"{gateway.url}?access_token={bad}")
    await ws.wait_closed()
    # Every record of the server side (the websockets client's own debug log is the test's).
    server = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in server)
    assert "connection accepted" in text and "auth_refused" in text
    signature = token.rsplit(".", 1)[1]
    assert signature not in text and bad.rsplit(".", 1)[1] not in text


def fetch(gw: Gateway, path: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        gw.base_url + path, data=data, method="POST" if data else "GET"
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, context=gw.client_ssl, timeout=10) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


async def test_chat_page_health_and_security_headers(gateway: Gateway) -> None:
    status, headers, page = await asyncio.to_thread(fetch, gateway, "/")
    assert status == 200
    assert b"<html" in page.lower()
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    status, _, health = await asyncio.to_thread(fetch, gateway, "/healthz")
    assert (status, json.loads(health)) == (200, {"status": "ok"})


async def test_dev_token_endpoint_mints_working_tokens(gateway: Gateway) -> None:
    payload = json.dumps({"name": "Dora", "sub": "dora"}).encode()
    status, _, raw = await asyncio.to_thread(fetch, gateway, "/dev/token", payload)
    assert status == 200
    minted = json.loads(raw)
    assert minted["user"] == {"id": "dora", "name": "Dora"}
    client_ws = await gateway.connect(minted["token"])
    welcome = json.loads(await client_ws.recv())
    assert welcome["user"] == {"id": "dora", "name": "Dora"}
    await client_ws.close()
    for bad in (b"{}", b"not json", json.dumps({"name": "x" * 65}).encode()):
        status, _, raw = await asyncio.to_thread(fetch, gateway, "/dev/token", bad)
        assert status == 400, raw


async def test_dev_token_endpoint_is_absent_when_disabled(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_DEV_TOKEN_ENDPOINT="false") as gw:
        status, _, _ = await asyncio.to_thread(fetch, gw, "/dev/token", b'{"name": "x"}')
        assert status == 404


async def raw_exchange(gw: Gateway, request: bytes) -> bytes:
    """Send ``request`` on a fresh TLS connection; all the server answers until it closes."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.client_ssl, server_hostname="localhost"
    )
    writer.write(request)
    answer = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout(5)):
            while chunk := await reader.read(65536):
                answer += chunk
    writer.close()
    return answer


#: The HTTP/2 connection preface (RFC 9113 section 3.4) and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def test_http2_with_prior_knowledge_is_refused(gateway: Gateway) -> None:
    # ALPN offers only http/1.1; a client that starts HTTP/2 anyway gets an HTTP/1.1 refusal
    # and the connection ends: never a SETTINGS frame, never streams (nor WebSockets over them).
    answer = await raw_exchange(gateway, H2_PREFACE)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:80]
    assert b"\x00\x00" not in answer.split(b"\r\n\r\n")[0]


async def test_an_h2c_upgrade_is_answered_as_http_1_1(gateway: Gateway) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nConnection: close\r\n\r\n"
    )
    answer = await raw_exchange(gateway, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert b"101" not in answer.split(b"\r\n")[0]
    assert answer.endswith(b'{"status":"ok"}')
