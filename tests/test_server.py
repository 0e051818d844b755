"""Tests for gateway.server (the Hypercorn configuration, serve()) and the access-log fix.

Hypercorn's Config is checked field by field; the access logger is given the worst request
there is (a bearer header, a query-string token, a secret in the environment) and must pass
none of it to a log record. The last test serves plain HTTP (GATEWAY_TLS=proxy) on a real
socket to prove a shutdown closes open connections with 1001 at once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import socket
import time
from typing import Any

import pytest
import websockets
from hypercorn.config import Config
from hypercorn.typing import ResponseSummary, WWWScope

from gateway.auth import mint_token
from gateway.hypercorn_fixes import SAFE_ACCESS_ATOMS, SafeAccessLogger
from gateway.server import (
    ACCESS_LOG_FORMAT,
    AFTER_SERVING_SECONDS,
    GC_YOUNG_THRESHOLD,
    SERVER_STOP_SECONDS,
    StartupError,
    build_config,
    serve,
    tune_gc,
)
from gateway.settings import SHUTDOWN_RESERVE_SECONDS
from tests.helpers import make_settings, timeout

__all__: list[str] = []

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1sZWFr"
SIGNATURE = TOKEN.rsplit(".", 1)[1]
QUERY_ATOMS = {"R", "Uq", "q"}


def test_backlog_is_large_and_configurable() -> None:
    assert build_config(make_settings()).backlog >= 1024
    assert build_config(make_settings({"GATEWAY_BACKLOG": "4096"})).backlog == 4096


def test_the_message_cap_is_the_settings_cap() -> None:
    config = build_config(make_settings({"GATEWAY_MAX_MESSAGE_BYTES": "1000"}))
    assert config.websocket_max_message_size == 1000
    assert build_config(make_settings()).websocket_max_message_size == 16 * 1024


def test_only_http_1_1_is_offered() -> None:
    assert build_config(make_settings()).alpn_protocols == ["http/1.1"]


def test_tls_on_uses_the_certificate_files() -> None:
    settings = make_settings(
        {"GATEWAY_TLS_CERT_FILE": "/etc/gw/cert.pem", "GATEWAY_TLS_KEY_FILE": "/etc/gw/key.pem"}
    )
    config = build_config(settings)
    assert config.certfile == "/etc/gw/cert.pem"
    assert config.keyfile == "/etc/gw/key.pem"
    assert config.ssl_enabled


def test_tls_at_a_proxy_serves_plain_http() -> None:
    config = build_config(make_settings({"GATEWAY_TLS": "proxy"}))
    assert config.certfile is None
    assert config.keyfile is None
    assert not config.ssl_enabled


@pytest.mark.parametrize(
    ("host", "bind"),
    [
        ("127.0.0.1", "127.0.0.1:4443"),
        ("0.0.0.0", "0.0.0.0:4443"),
        ("::1", "[::1]:4443"),
        ("::", "[::]:4443"),
        ("[::]", "[::]:4443"),
        ("2001:db8::1", "[2001:db8::1]:4443"),
        ("localhost", "localhost:4443"),
    ],
)
def test_bind_address(host: str, bind: str) -> None:
    config = build_config(make_settings({"GATEWAY_HOST": host, "GATEWAY_PORT": "4443"}))
    assert config.bind == [bind]


def test_an_inherited_socket_is_bound_by_descriptor() -> None:
    assert build_config(make_settings(), fd=7).bind == ["fd://7"]


def test_ping_interval() -> None:
    assert build_config(make_settings()).websocket_ping_interval == 20.0
    config = build_config(make_settings({"GATEWAY_PING_INTERVAL_SECONDS": "0"}))
    assert config.websocket_ping_interval is None


def test_no_server_header_and_bounded_timeouts() -> None:
    config = build_config(make_settings())
    assert config.include_server_header is False
    assert 0 < config.ssl_handshake_timeout <= 30
    assert 0 < config.keep_alive_timeout <= 30
    assert 0 < config.graceful_timeout <= 30
    assert config.h11_max_incomplete_size <= 64 * 1024


def test_the_access_log_format_names_no_query_or_header() -> None:
    atoms = set(re.findall(r"%\(([^)]*)\)s", ACCESS_LOG_FORMAT))
    assert atoms  # the pattern found the atoms: this test can fail
    assert atoms <= set(SAFE_ACCESS_ATOMS)
    assert not atoms & QUERY_ATOMS
    assert not any(atom.startswith("{") for atom in atoms)  # {header}i, {var}e, {header}o
    config = build_config(make_settings())
    assert config.access_log_format == ACCESS_LOG_FORMAT
    assert config.logger_class is SafeAccessLogger


def test_safe_atoms_exclude_every_query_atom() -> None:
    assert not set(SAFE_ACCESS_ATOMS) & QUERY_ATOMS
    assert not any(atom.startswith("{") for atom in SAFE_ACCESS_ATOMS)


def hostile_scope() -> WWWScope:
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "wss",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": f"access_token={TOKEN}&x=1".encode(),
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"authorization", f"Bearer {TOKEN}".encode()),
            (b"cookie", f"session={TOKEN}".encode()),
            (b"referer", f"https://chat.example.com/?access_token={TOKEN}".encode()),
            (b"user-agent", f"agent {TOKEN}".encode()),
        ],
        "client": ("203.0.113.5", 40000),
        "server": ("127.0.0.1", 3001),
        "subprotocols": [],
        "extensions": {},
    }
    return scope  # type: ignore[return-value]


def hostile_response() -> ResponseSummary:
    response: dict[str, Any] = {
        "status": 101,
        "headers": [(b"set-cookie", f"session={TOKEN}".encode()), (b"content-length", b"0")],
    }
    return response  # type: ignore[return-value]


def test_safe_access_logger_atoms_hold_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_JWT_SECRET", f"env-{SIGNATURE}")
    logger = SafeAccessLogger(build_config(make_settings()))
    atoms = logger.atoms(hostile_scope(), hostile_response(), 0.25)
    assert set(atoms) == set(SAFE_ACCESS_ATOMS)
    values = " ".join(str(value) for value in atoms.values())
    assert SIGNATURE not in values
    assert "Bearer" not in values
    assert "access_token" not in values
    assert atoms["r"] == "GET /ws 1.1"
    assert atoms["h"] == "203.0.113.5:40000"
    assert atoms["s"] == "101"
    assert str(atoms["D"]) == "250000"


async def test_the_access_log_record_holds_no_credential(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GATEWAY_JWT_SECRET", f"env-{SIGNATURE}")
    caplog.set_level(logging.INFO, logger="gateway.access")
    config = build_config(make_settings())
    await config.log.access(hostile_scope(), hostile_response(), 0.01)
    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.getMessage().startswith('203.0.113.5:40000 "GET /ws 1.1" 101')
    everything = json.dumps(record.__dict__, default=repr)
    assert SIGNATURE not in everything
    assert "access_token" not in everything
    assert "Bearer" not in everything


def test_hypercorn_atoms_would_leak_without_the_fix() -> None:
    # The reason SafeAccessLogger exists: Hypercorn's own atoms carry all of it.
    from hypercorn.logging import Logger

    atoms = Logger(Config()).atoms(hostile_scope(), hostile_response(), 0.01)
    assert SIGNATURE in " ".join(str(v) for v in atoms.values())


async def test_shutdown_closes_open_connections_with_1001_at_once() -> None:
    settings = make_settings({"GATEWAY_TLS": "proxy", "GATEWAY_CONNECT_RATE": "1000/minute"})
    token = mint_token(settings, sub="alice", ttl_seconds=600)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, fd=sock.detach(), shutdown_trigger=stop.wait))
    try:
        async with asyncio.timeout(timeout(10)):
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {token}"}
            )
            assert json.loads(await ws.recv())["type"] == "welcome"
            started = time.monotonic()
            stop.set()
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            closed_after_seconds = time.monotonic() - started
            assert ws.close_code == 1001
            # Hypercorn's graceful timeout (5 s) would have cancelled it as 1011 instead.
            assert closed_after_seconds < 4
            await server
    finally:
        if not server.done():
            server.cancel()
            with pytest.raises(asyncio.CancelledError):
                await server


def test_the_servers_own_stop_fits_the_shutdown_reserve() -> None:
    # After the drain every WebSocket is closed or abandoned: Hypercorn's graceful timeout and
    # the after-serving hooks share what the grace keeps back, so the process exits in time.
    config = build_config(make_settings())
    assert config.graceful_timeout == SERVER_STOP_SECONDS
    assert config.shutdown_timeout == AFTER_SERVING_SECONDS
    assert config.graceful_timeout + config.shutdown_timeout == SHUTDOWN_RESERVE_SECONDS
    assert 0 < config.graceful_timeout < SHUTDOWN_RESERVE_SECONDS


async def test_serve_refuses_to_start_when_the_metrics_port_is_taken() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    settings = make_settings(
        {"GATEWAY_TLS": "proxy", "GATEWAY_METRICS_PORT": str(taken.getsockname()[1])}
    )
    fd = socket.create_server(("127.0.0.1", 0)).detach()
    try:
        with pytest.raises(StartupError, match="GATEWAY_METRICS_PORT"):
            async with asyncio.timeout(timeout(5)):
                await serve(settings, fd=fd, shutdown_trigger=asyncio.Event().wait)
    finally:
        taken.close()
        os.close(fd)  # serve() failed before Hypercorn took it over


def test_the_served_process_collects_garbage_for_many_long_lived_connections() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0  # start-up's objects are out of every collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
