"""Tests for ``python -m gateway``: token, dev-setup, and serve's refusal in production.

Each command runs in a real subprocess (``sys.executable -m gateway``) with an environment
free of the caller's GATEWAY_* variables and a temporary working directory, so nothing in the
checkout's certs/ is read or written.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from gateway import __main__ as cli
from gateway.auth import TokenVerifier
from gateway.errors import AuthError
from gateway.settings import (
    DEV_CERT_FILE,
    DEV_KEY_FILE,
    DEV_SECRET_FILE,
    UNPARSEABLE_URL,
    Settings,
)
from tests.helpers import TEST_SECRET, make_settings
from tests.processes import Result, clean_env, free_port, gateway_cli

__all__: list[str] = []


# --- token ---------------------------------------------------------------------------------


TOKEN_ARGS = ("token", "--sub", "alice", "--name", "Alice", "--rooms", "lobby,dev", "--ttl", "60")


async def test_token_prints_a_token_the_verifier_accepts(tmp_path: Path) -> None:
    result = await gateway_cli(
        *TOKEN_ARGS, env=clean_env(GATEWAY_JWT_SECRET=TEST_SECRET), cwd=tmp_path
    )
    assert (result.status, result.stderr) == (0, "")
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    principal = await TokenVerifier(make_settings()).verify(token)
    assert principal.user_id == "alice"
    assert principal.name == "Alice"
    assert principal.rooms == frozenset({"lobby", "dev"})
    assert principal.expires_at is not None
    assert 50 <= principal.expires_at - time.time() <= 61


async def test_the_token_is_signed_with_the_configured_secret(tmp_path: Path) -> None:
    result = await gateway_cli(
        *TOKEN_ARGS, env=clean_env(GATEWAY_JWT_SECRET=TEST_SECRET), cwd=tmp_path
    )
    other = make_settings({"GATEWAY_JWT_SECRET": "another-secret-" + "y" * 40})
    with pytest.raises(AuthError) as caught:
        await TokenVerifier(other).verify(result.stdout.strip())
    assert caught.value.reason == "bad_signature"


async def test_token_from_the_secret_file_after_dev_setup(tmp_path: Path) -> None:
    assert (await gateway_cli("dev-setup", env=clean_env(), cwd=tmp_path)).status == 0
    result = await gateway_cli("token", "--sub", "bob", env=clean_env(), cwd=tmp_path)
    assert result.status == 0, result.stderr
    secret = (tmp_path / DEV_SECRET_FILE).read_text().strip()
    principal = await TokenVerifier(make_settings({"GATEWAY_JWT_SECRET": secret})).verify(
        result.stdout.strip()
    )
    assert (principal.user_id, principal.name) == ("bob", "bob")


@pytest.mark.parametrize(
    ("sub", "name"),
    [
        ("s" * 100, "s" * 64),  # a sub longer than a name: its first 64 characters
        ("\u202eecila", "user"),  # a sub that cannot be a name: the fixed default
    ],
)
async def test_token_without_a_name_is_refused_only_where_the_server_refuses_it(
    tmp_path: Path, sub: str, name: str
) -> None:
    # Both were refused ("name (the sub when no name is given) ..."), as the server refused
    # such tokens for a claim they do not carry; now the server names the user, and the
    # command makes the token.
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET)
    result = await gateway_cli("token", "--sub", sub, env=env, cwd=tmp_path)
    assert (result.status, result.stderr) == (0, ""), result.stderr
    principal = await TokenVerifier(make_settings()).verify(result.stdout.strip())
    assert (principal.user_id, principal.name) == (sub, name)


@pytest.mark.parametrize("option", ["--sub", "--name"])
async def test_token_refuses_a_claim_that_is_not_unicode_text(tmp_path: Path, option: str) -> None:
    # A byte that is not UTF-8 in the arguments reaches Python as a lone surrogate, which a
    # token could carry (JSON escapes it) but no frame could: the server refuses such a
    # token (it accepted one, then failed on the welcome), and so does the command.
    args = ("--sub", "alice", option, os.fsdecode(b"al\xffce"))
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET)
    result = await gateway_cli("token", *args, env=env, cwd=tmp_path)
    assert (result.status, result.stdout) == (2, "")
    assert result.stderr.startswith(f"gateway: the {option[2:]} claim must be a string")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--sub", "alice", "--rooms", "lobby,bad room"),
        ("--sub", "alice", "--rooms", "x" * 65),
        ("--sub", "alice", "--name", "Al\x1bice"),
        ("--sub", "alice", "--name", "x" * 65),
        ("--sub", "", "--name", "Alice"),
        ("--sub", "alice", "--ttl", "nan"),
        ("--sub", "alice", "--ttl", "inf"),
        ("--sub", "alice", "--ttl", "-5"),
        ("--sub", "alice", "--ttl", "0"),
        ("--sub", "alice", "--ttl", "1e12"),
        ("--sub", "alice", "--name", "\u202eecila"),
    ],
)
async def test_token_refuses_invalid_claims(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET)
    result = await gateway_cli("token", *args, env=env, cwd=tmp_path)
    assert result.status == 2
    assert result.stdout == ""
    assert result.stderr.startswith("gateway: ")
    assert "Traceback" not in result.stderr
    assert TEST_SECRET not in result.stderr


async def test_token_without_a_secret_says_so(tmp_path: Path) -> None:
    result = await gateway_cli("token", "--sub", "alice", env=clean_env(), cwd=tmp_path)
    assert result.status == 2
    assert "GATEWAY_JWT_SECRET" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args", [(), ("token",), ("nonsense",), ("token", "--sub")])
async def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = await gateway_cli(*args, env=clean_env(), cwd=tmp_path)
    assert result.status == 2
    assert "usage: gateway" in result.stderr


# --- serve refuses a weak production configuration -----------------------------------------


@pytest.mark.parametrize(
    ("secret", "secret_problem"),
    [
        ("Zq9-weak-Xv4", "shorter than 32 bytes"),
        ("please-change-this-secret-in-production-now", "well-known default"),
    ],
)
@pytest.mark.parametrize("command", [("serve",), ("token", "--sub", "alice")])
async def test_production_refuses_and_lists_every_problem(
    tmp_path: Path, secret: str, secret_problem: str, command: tuple[str, ...]
) -> None:
    env = clean_env(
        GATEWAY_ENV="production",
        GATEWAY_JWT_SECRET=secret,
        GATEWAY_TLS_KEY_FILE=str(tmp_path / "missing-key.pem"),  # cert not set at all
        GATEWAY_DEV_TOKEN_ENDPOINT="true",
    )
    result = await gateway_cli(*command, env=env, cwd=tmp_path)
    assert result.status == 2
    assert result.stdout == ""
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 6, result.stderr
    for expected in (
        secret_problem,
        "GATEWAY_TLS_CERT_FILE is required",
        "GATEWAY_TLS_KEY_FILE: " + str(tmp_path / "missing-key.pem") + " does not exist",
        "GATEWAY_DEV_TOKEN_ENDPOINT must be off",
        "GATEWAY_ALLOWED_ORIGINS is required",
        "GATEWAY_JWT_AUDIENCE is required",
    ):
        assert any(expected in problem for problem in problems), expected
    assert secret not in result.stderr
    assert "Traceback" not in result.stderr


def production_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A production configuration that passes every check (the TLS files are not PEM: a
    process that got past the checks would stop at once, not serve)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    env = {
        "GATEWAY_ENV": "production",
        "GATEWAY_JWT_SECRET": TEST_SECRET,
        "GATEWAY_TLS_CERT_FILE": str(cert),
        "GATEWAY_TLS_KEY_FILE": str(key),
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com",
        "GATEWAY_JWT_AUDIENCE": "chat",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_METRICS_PORT": "0",
    }
    return clean_env(**{**env, **overrides})


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        # Behind a proxy, without trusted proxies, every client would share the proxy's quota.
        (
            {"GATEWAY_TLS": "proxy"},
            "production: GATEWAY_TLS=proxy needs GATEWAY_TRUSTED_PROXIES",
        ),
        # Without an audience, a token the issuer signed for another service would log in.
        ({"GATEWAY_JWT_AUDIENCE": ""}, "production: GATEWAY_JWT_AUDIENCE is required"),
    ],
    ids=["proxy-without-trusted-proxies", "no-audience"],
)
async def test_serve_refuses_an_unsafe_production_configuration(
    tmp_path: Path, overrides: dict[str, str], problem: str
) -> None:
    result = await gateway_cli("serve", env=production_env(tmp_path, **overrides), cwd=tmp_path)
    assert (result.status, result.stdout) == (2, ""), result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith(f"  - {problem}")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("urls", "shown"),
    [
        (  # the wrong scheme: the URL is shown, without user, password, query or fragment
            {
                "GATEWAY_RATELIMIT_STORAGE_URL": "redis+sentinel://:S3cr3t@host:26379/0",
                "GATEWAY_JWT_JWKS_URL": "ftp://idp:S3cr3t@idp.example/jwks.json?password=S3cr3t",
            },
            [
                "GATEWAY_RATELIMIT_STORAGE_URL=redis+sentinel://***@host:26379/0 must be",
                "GATEWAY_JWT_JWKS_URL=ftp://***@idp.example/jwks.json must be",
            ],
        ),
        (  # urlsplit cannot parse it: a problem (not a traceback), and a placeholder
            {"GATEWAY_BROKER_URL": "redis://:S3cr3t@[::1/0"},
            [f"GATEWAY_BROKER_URL={UNPARSEABLE_URL} is not a valid URL"],
        ),
    ],
    ids=["wrong-scheme", "unparseable"],
)
async def test_serve_never_shows_the_password_of_a_url(
    tmp_path: Path, urls: dict[str, str], shown: list[str]
) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET, **urls)
    result = await gateway_cli("serve", env=env, cwd=tmp_path)
    assert (result.status, result.stdout) == (2, ""), result.stderr
    assert "S3cr3t" not in result.stderr
    for text in shown:
        assert text in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_bad_value_is_reported_not_raised(tmp_path: Path) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET, GATEWAY_PORT="http", GATEWAY_BACKLOG="7")
    result = await gateway_cli("serve", env=env, cwd=tmp_path)
    assert result.status == 2
    assert "GATEWAY_PORT" in result.stderr
    assert "GATEWAY_BACKLOG" in result.stderr
    assert "Traceback" not in result.stderr


# --- dev-setup -----------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_dev_setup_writes_the_files_once(tmp_path: Path) -> None:
    first = await gateway_cli("dev-setup", env=clean_env(), cwd=tmp_path)
    assert (first.status, first.stderr) == (0, "")
    assert first.stdout.splitlines() == [
        f"wrote {DEV_CERT_FILE}",
        f"wrote {DEV_KEY_FILE}",
        f"wrote {DEV_SECRET_FILE}",
    ]
    cert, key, secret = (
        tmp_path / DEV_CERT_FILE,
        tmp_path / DEV_KEY_FILE,
        tmp_path / DEV_SECRET_FILE,
    )
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in key.read_bytes()
    assert mode(key) == 0o600
    assert mode(secret) == 0o600
    contents = [path.read_bytes() for path in (cert, key, secret)]

    second = await gateway_cli("dev-setup", env=clean_env(), cwd=tmp_path)
    assert (second.status, second.stdout, second.stderr) == (0, "", "")
    assert [path.read_bytes() for path in (cert, key, secret)] == contents


# --- serve's start-up lines (in process, with the server itself replaced) -------------------


@pytest.mark.usefixtures("restore_root_logger")
@pytest.mark.parametrize(
    ("env", "url", "warns"),
    [
        ({}, "https://localhost:{port}/", True),
        ({"GATEWAY_HOST": "::", "GATEWAY_TLS": "proxy"}, "http://[::]:{port}/", True),
        (
            {
                "GATEWAY_ENV": "production",
                "GATEWAY_TLS": "proxy",
                "GATEWAY_TRUSTED_PROXIES": "10.0.0.1",
                "GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com",
                "GATEWAY_JWT_AUDIENCE": "chat",
            },
            "http://localhost:{port}/",
            False,
        ),
    ],
)
def test_serve_announces_itself_in_json_lines(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    env: dict[str, str],
    url: str,
    warns: bool,
) -> None:
    from gateway.devsetup import write_self_signed

    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # nothing of the checkout's certs/ is read
    write_self_signed(tmp_path / DEV_CERT_FILE, tmp_path / DEV_KEY_FILE)  # serve checks them
    monkeypatch.setenv("GATEWAY_JWT_SECRET", TEST_SECRET)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_PORT", "0")  # the log names the port the system chose
    started: list[tuple[Settings, int]] = []

    def run(settings: Settings, sock: socket.socket) -> None:
        started.append((settings, sock.getsockname()[1]))
        sock.close()

    monkeypatch.setattr("gateway.server.run", run)
    assert cli.main(["serve"]) == 0
    ((settings, port),) = started
    assert settings.port == 0 and port != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    entries = [json.loads(line) for line in captured.err.splitlines()]
    assert all(isinstance(entry, dict) for entry in entries)
    (starting,) = [e for e in entries if e["event"] == "gateway starting"]
    assert starting["env"] == env.get("GATEWAY_ENV", "development")
    assert starting["url"] == url.format(port=port)
    assert any("DEVELOPMENT MODE" in e["event"] for e in entries) is warns
    assert TEST_SECRET not in captured.err


async def test_version_prints_the_package_version(tmp_path: Path) -> None:
    from gateway import __version__

    result = await gateway_cli("--version", env=clean_env(), cwd=tmp_path)
    assert (result.status, result.stdout.strip()) == (0, f"gateway {__version__}")


# --- start-up failures: one clear line and status 2, never a traceback ----------------------


def one_clear_line(result: Result) -> str:
    assert (result.status, result.stdout) == (2, ""), result
    assert "Traceback" not in result.stderr
    assert TEST_SECRET not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("GATEWAY_CONNECT_RATE", "0/minute", "allows nothing"),
        ("GATEWAY_USER_MESSAGE_RATE", "0/second", "allows nothing"),
        ("GATEWAY_CONNECT_RATE", "20/minute;100/hour", "names several limits"),
        ("GATEWAY_USER_MESSAGE_RATE", "20/second,100/minute", "names several limits"),
        ("GATEWAY_CONNECT_RATE", "lots", "is not in limits notation"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "config"])
async def test_a_rate_the_gateway_cannot_enforce_is_a_settings_problem(
    tmp_path: Path, name: str, value: str, says: str, command: str
) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET, **{name: value})
    stderr = one_clear_line(await gateway_cli(command, env=env, cwd=tmp_path))
    assert f"{name}={value!r} {says}" in stderr, stderr


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("no-such-host.invalid", "the host name does not resolve"),
        ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: never local
    ],
)
async def test_an_address_that_cannot_be_bound_names_the_setting(
    tmp_path: Path, host: str, says: str
) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET, GATEWAY_TLS="proxy", GATEWAY_HOST=host)
    stderr = one_clear_line(await gateway_cli("serve", env=env, cwd=tmp_path))
    assert stderr.startswith(f"gateway: cannot listen on GATEWAY_HOST={host} GATEWAY_PORT="), stderr
    assert says in stderr
    assert stderr.count("\n") == 1


async def test_a_port_in_use_names_the_setting(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET, GATEWAY_TLS="proxy", GATEWAY_PORT=str(port))
        stderr = one_clear_line(await gateway_cli("serve", env=env, cwd=tmp_path))
    assert f"GATEWAY_PORT={port}: Address already in use" in stderr, stderr


async def test_a_metrics_port_in_use_names_the_setting(tmp_path: Path) -> None:
    """A second instance beside ``make run``: its public port is free, 9102 is not."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        metrics_port = taken.getsockname()[1]
        env = clean_env(
            GATEWAY_JWT_SECRET=TEST_SECRET,
            GATEWAY_TLS="proxy",
            GATEWAY_PORT="0",
            GATEWAY_METRICS_PORT=str(metrics_port),
        )
        stderr = one_clear_line(await gateway_cli("serve", env=env, cwd=tmp_path))
    (failure,) = [
        entry
        for entry in map(json.loads, stderr.splitlines())
        if entry["level"] == "error"  # the JSON lines of serve: it had started logging
    ]
    assert failure["event"] == "gateway cannot start"
    assert f"GATEWAY_METRICS_PORT={metrics_port}: Address already in use" in failure["problem"]
    assert "GATEWAY_METRICS_PORT=0 turns the listener off" in failure["problem"]


async def test_serve_outside_the_checkout_names_the_missing_files(tmp_path: Path) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET)
    stderr = one_clear_line(await gateway_cli("serve", env=env, cwd=tmp_path))
    for name, path in (
        ("GATEWAY_TLS_CERT_FILE", DEV_CERT_FILE),
        ("GATEWAY_TLS_KEY_FILE", DEV_KEY_FILE),
    ):
        assert f"{name}: {path} does not exist in the working directory {tmp_path}" in stderr
    assert "python -m gateway dev-setup" in stderr


async def test_token_outside_the_checkout_says_the_secret_file_is_relative(tmp_path: Path) -> None:
    stderr = one_clear_line(await gateway_cli("token", "--sub", "a", env=clean_env(), cwd=tmp_path))
    assert f"{DEV_SECRET_FILE} in the working directory {tmp_path}" in stderr, stderr
    assert "python -m gateway dev-setup" in stderr


@pytest.mark.parametrize(
    ("cert", "key"),
    [("cert.pem", "cert.pem"), ("key.pem", "key.pem"), ("other-cert.pem", "key.pem")],
    ids=["cert-as-key", "key-as-cert", "key-of-another-cert"],
)
async def test_tls_files_that_do_not_fit_are_a_settings_problem(
    tmp_path: Path, cert: str, key: str
) -> None:
    from gateway.devsetup import write_self_signed

    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    write_self_signed(tmp_path / "other-cert.pem", tmp_path / "other-key.pem")
    env = clean_env(
        GATEWAY_JWT_SECRET=TEST_SECRET,
        GATEWAY_TLS_CERT_FILE=str(tmp_path / cert),
        GATEWAY_TLS_KEY_FILE=str(tmp_path / key),
    )
    stderr = one_clear_line(await gateway_cli("serve", env=env, cwd=tmp_path))
    assert "GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE cannot be used together" in stderr


# --- help and the effective configuration ---------------------------------------------------


async def test_serve_help_points_at_the_settings(tmp_path: Path) -> None:
    result = await gateway_cli("serve", "--help", env=clean_env(), cwd=tmp_path)
    assert result.status == 0
    text = " ".join(result.stdout.split())
    assert "GATEWAY_* environment variables" in text
    assert "docs/configuration.md" in text
    assert "gateway config" in text


async def test_config_prints_every_setting_with_secrets_masked(tmp_path: Path) -> None:
    from gateway.settings import load_settings

    env = clean_env(
        GATEWAY_JWT_SECRET=TEST_SECRET,
        GATEWAY_TLS="proxy",
        GATEWAY_PORT="4444",
        GATEWAY_BROKER_URL="redis://user:S3cr3t@redis.internal:6379/0",
        GATEWAY_RATELIMIT_STORAGE_URL="redis://:S3cr3t@redis.internal:6379/1",
        GATEWAY_BROKER_SECRET="b" * 40,
    )
    result = await gateway_cli("config", env=env, cwd=tmp_path)
    assert (result.status, result.stderr) == (0, "")
    assert TEST_SECRET not in result.stdout and "S3cr3t" not in result.stdout
    assert "b" * 40 not in result.stdout
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    gateway_env = {k: v for k, v in env.items() if k.startswith("GATEWAY_")}
    assert set(lines) == {f"GATEWAY_{field.upper()}" for field in Settings.__dataclass_fields__}, (
        "one line per setting"
    )
    assert lines["GATEWAY_PORT"] == "4444"
    assert lines["GATEWAY_TLS"] == "proxy"
    assert lines["GATEWAY_JWT_SECRET"] == "***"
    assert lines["GATEWAY_BROKER_SECRET"] == "***"
    assert lines["GATEWAY_BROKER_URL"] == "redis://***@redis.internal:6379/0"
    assert lines["GATEWAY_HOST"] == "127.0.0.1  # default"
    assert lines["GATEWAY_MAX_MESSAGE_BYTES"] == "16384  # default"
    # What it prints is what serve runs with: every value fed back gives the same settings.
    printed = {name: value.removesuffix("  # default") for name, value in lines.items()}
    printed = {n: v for n, v in printed.items() if v and "***" not in v}
    assert len(printed) > 40
    assert load_settings({**gateway_env, **printed}) == load_settings(gateway_env)


async def test_config_refuses_what_serve_refuses(tmp_path: Path) -> None:
    env = clean_env(GATEWAY_JWT_SECRET=TEST_SECRET, GATEWAY_PORT="http")
    stderr = one_clear_line(await gateway_cli("config", env=env, cwd=tmp_path))
    assert "GATEWAY_PORT='http'" in stderr


def two_taken_ports() -> list[socket.socket]:
    """Two listening sockets on consecutive ports (the workers' metrics take port + index)."""
    for _ in range(50):
        first = socket.create_server(("127.0.0.1", 0))
        try:
            second = socket.create_server(("127.0.0.1", first.getsockname()[1] + 1))
        except OSError:
            first.close()
            continue
        return [first, second]
    raise AssertionError("no two consecutive free ports")


async def test_a_worker_that_cannot_serve_metrics_says_so_and_the_supervisor_exits_2(
    tmp_path: Path,
) -> None:
    taken = two_taken_ports()
    metrics_port = taken[0].getsockname()[1]
    try:
        env = clean_env(
            GATEWAY_JWT_SECRET=TEST_SECRET,
            GATEWAY_TLS="proxy",
            GATEWAY_PORT="0",
            GATEWAY_WORKERS="2",
            GATEWAY_METRICS_PORT=str(metrics_port),
            # Never reached: the metrics listener comes before the broker's connection.
            GATEWAY_BROKER_URL="redis://127.0.0.1:1/0",
            GATEWAY_RATELIMIT_STORAGE_URL="redis://127.0.0.1:1/1",
        )
        stderr = one_clear_line(await gateway_cli("serve", env=env, cwd=tmp_path))
    finally:
        for sock in taken:
            sock.close()
    entries = [json.loads(line) for line in stderr.splitlines()]
    # The first worker to fail stops the other (SIGTERM), which may not have got as far.
    failures = {e["worker"]: e["problem"] for e in entries if e["event"] == "gateway cannot start"}
    assert failures and set(failures) <= {0, 1}
    for index, problem in failures.items():
        assert f"GATEWAY_METRICS_PORT={metrics_port + index}: Address already in use" in problem
    exits = [e["status"] for e in entries if e["event"] == "worker exited"]
    assert exits[0] == 2, entries
