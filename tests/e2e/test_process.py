"""The real thing: ``python -m gateway serve`` in production mode, as a separate process.

Certificates from trustme, a strong random secret, an origin policy, a free port; tokens from
``python -m gateway token``. The process is stopped with SIGTERM, and everything it wrote is
searched for the tokens: none may appear, and every line on stderr must be a JSON object.
The process is killed in a ``finally`` whatever happens, so no test leaves one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.helpers import timeout
from tests.processes import free_port, gateway_cli

pytestmark = pytest.mark.e2e

__all__: list[str] = []


@dataclass
class Process:
    process: asyncio.subprocess.Process
    env: dict[str, str]
    port: int
    stdout_file: Path
    stderr_file: Path

    @property
    def url(self) -> str:
        return f"wss://localhost:{self.port}/ws"

    def output(self) -> tuple[str, str]:
        return self.stdout_file.read_text(), self.stderr_file.read_text()


def production_env(tmp_path: Path, ca: trustme.CA, port: int) -> dict[str, str]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_ENV="production",
        GATEWAY_JWT_SECRET=secrets.token_urlsafe(48),
        GATEWAY_TLS_CERT_FILE=str(cert_file),
        GATEWAY_TLS_KEY_FILE=str(key_file),
        GATEWAY_ALLOWED_ORIGINS="https://chat.example.com",
        GATEWAY_JWT_AUDIENCE="chat",  # production requires one; `gateway token` adds it
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        GATEWAY_LOG_LEVEL="INFO",
        GATEWAY_METRICS_PORT="0",  # tests that want the metrics listener pick a free port
        PYTHONUNBUFFERED="1",
    )
    return env


async def gateway_token(env: dict[str, str], *args: str) -> str:
    result = await gateway_cli("token", *args, env=env)
    assert result.status == 0, result.stderr
    return result.stdout.strip()


async def wait_until_serving(gateway: Process, client_ssl: ssl.SSLContext) -> None:
    """Until a TLS handshake with the process succeeds; fail at once if it exits."""
    async with asyncio.timeout(timeout(30)):
        while True:
            if gateway.process.returncode is not None:
                raise AssertionError(f"the gateway exited: {gateway.output()[1]}")
            try:
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", gateway.port, ssl=client_ssl, server_hostname="localhost"
                )
            except (OSError, ssl.SSLError):
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            return


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path,
    ca: trustme.CA,
    client_ssl: ssl.SSLContext,
    *,
    open_files: str | None = None,
    **env_overrides: str,
) -> AsyncIterator[Process]:
    """A production ``python -m gateway serve``; ``open_files`` (a number) lowers its
    descriptor limit."""
    port = free_port()
    env = {**production_env(tmp_path, ca, port), **env_overrides}
    stdout_file, stderr_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (int(open_files), int(open_files)))

    with stdout_file.open("wb") as stdout, stderr_file.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            env=env,
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=limit_files if open_files is not None else None,
        )
    gateway = Process(process, env, port, stdout_file, stderr_file)
    try:
        await wait_until_serving(gateway, client_ssl)
        yield gateway
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def connect(gateway: Process, client_ssl: ssl.SSLContext, **kwargs: Any) -> ClientConnection:
    return await websockets.connect(
        kwargs.pop("url", gateway.url), ssl=client_ssl, open_timeout=timeout(10), **kwargs
    )


async def receive(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(timeout(5)):
        raw = await ws.recv()
    assert isinstance(raw, str)
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def receive_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(timeout(5)):
        while True:
            frame = await receive(ws)
            if frame["type"] == kind:
                return frame


async def test_production_process_serves_chat_and_stops_cleanly(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    async with gateway_process(tmp_path, ca, client_ssl) as gateway:
        token = await gateway_token(
            gateway.env, "--sub", "alice", "--name", "Alice", "--rooms", "lobby", "--ttl", "600"
        )
        query_token = await gateway_token(gateway.env, "--sub", "bob", "--ttl", "600")
        forged = jwt.encode({"sub": "eve", "exp": 4_000_000_000}, "not-the-secret-" + "k" * 40)

        # A bearer token in the header: welcome, join, chat, the echo.
        alice = await connect(
            gateway,
            client_ssl,
            additional_headers={"Authorization": f"Bearer {token}"},
            origin="https://chat.example.com",
        )
        welcome = await receive(alice)
        assert welcome["type"] == "welcome"
        assert welcome["user"] == {"id": "alice", "name": "Alice"}
        await alice.send(json.dumps({"type": "join", "room": "lobby", "ref": "j1"}))
        joined = await receive_type(alice, "joined")
        assert (joined["room"], joined["ref"]) == ("lobby", "j1")
        await alice.send(
            json.dumps({"type": "chat", "room": "lobby", "message": "hi", "ref": "c1"})
        )
        echo = await receive_type(alice, "chat")
        assert echo["from"] == {"id": "alice", "name": "Alice"}
        assert (echo["message"], echo["ref"], echo["room"]) == ("hi", "c1", "lobby")

        # The token in the query string, as a browser sends it.
        bob = await connect(gateway, client_ssl, url=f"{gateway.url}?access_token={query_token}")
        assert (await receive(bob))["user"]["id"] == "bob"
        await bob.close()

        # A forged token in the query string is refused before the upgrade (and is logged).
        with pytest.raises(InvalidStatus) as refused:
            ws = await connect(gateway, client_ssl, url=f"{gateway.url}?access_token={forged}")
            await ws.close()
        assert refused.value.response.status_code == 401

        # SIGTERM with Alice still connected: she is told 1001 (going away), and it exits.
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(timeout(4)):
                while True:
                    await alice.recv()
        assert alice.close_code == 1001
        async with asyncio.timeout(timeout(15)):
            status = await gateway.process.wait()
        assert status == 0

    stdout, stderr = gateway.output()
    lines = stderr.splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries), stderr
    events = [entry["event"] for entry in entries]
    assert "connection accepted" in events  # the logs were captured: the search below means it
    assert "auth_refused" in events
    assert any(entry["logger"] == "gateway.access" for entry in entries)
    for secret_text in (token, query_token, forged):
        _header, payload, signature = secret_text.split(".")
        for part in (secret_text, payload, signature):
            assert part not in stdout
            assert part not in stderr
    assert gateway.env["GATEWAY_JWT_SECRET"] not in stdout + stderr


async def test_production_process_accepts_only_access_tokens_for_its_audience(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    # Every token below is signed with the gateway's own secret, as the issuer's other tokens
    # (a password reset, a token for another service) would be.
    async with gateway_process(tmp_path, ca, client_ssl) as gateway:
        secret = gateway.env["GATEWAY_JWT_SECRET"]
        exp = int(time.time()) + 600
        minted = await gateway_token(gateway.env, "--sub", "alice", "--ttl", "600")
        access = jwt.encode(
            {"sub": "carol", "aud": "chat", "exp": exp}, secret, headers={"typ": "at+jwt"}
        )
        refused = {
            "missing_claim": jwt.encode({"sub": "mallory", "exp": exp}, secret),  # no aud
            "invalid_audience": jwt.encode(
                {"sub": "mallory", "aud": "billing", "exp": exp}, secret
            ),
            "disallowed_type": jwt.encode(
                {"sub": "mallory", "aud": "chat", "exp": exp}, secret, headers={"typ": "reset+jwt"}
            ),
        }
        for reason, token in refused.items():
            with pytest.raises(InvalidStatus) as caught:
                ws = await connect(
                    gateway, client_ssl, additional_headers={"Authorization": f"Bearer {token}"}
                )
                await ws.close()
            response = caught.value.response
            assert response.status_code == 401, reason
            assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
            assert json.loads(response.body)["error"] == "invalid_token"
        for token, user in ((minted, "alice"), (access, "carol")):
            ws = await connect(
                gateway, client_ssl, additional_headers={"Authorization": f"Bearer {token}"}
            )
            assert (await receive(ws))["user"]["id"] == user
            await ws.close()

    _, stderr = gateway.output()
    entries = [json.loads(line) for line in stderr.splitlines()]
    reasons = [e["reason"] for e in entries if e["event"] == "auth_refused"]
    assert reasons == list(refused)
