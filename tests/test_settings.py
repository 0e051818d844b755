from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import UNPARSEABLE_URL, Secret, SettingsError, load_settings, redact_url
from tests.helpers import make_settings

STRONG = "s" * 48


def prod_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    env = {
        "GATEWAY_ENV": "production",
        "GATEWAY_JWT_SECRET": STRONG,
        "GATEWAY_TLS_CERT_FILE": str(cert),
        "GATEWAY_TLS_KEY_FILE": str(key),
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com",
        "GATEWAY_JWT_AUDIENCE": "chat",
    }
    env.update(extra)
    return env


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    return caught.value.problems


def test_development_defaults(tmp_path: Path) -> None:
    settings = load_settings({"GATEWAY_JWT_SECRET": "dev"})
    assert settings.env == "development"
    assert (settings.host, settings.port) == ("127.0.0.1", 3001)
    assert settings.tls == "on"
    assert settings.open_rooms == ("lobby",)
    assert settings.max_message_bytes == 16 * 1024
    assert settings.broker_url == "memory://"
    assert settings.dev_token_endpoint is True
    assert settings.permessage_deflate is False
    assert settings.backlog >= 1024
    assert settings.jwt_algorithms == ("HS256",)


def test_secret_is_masked_everywhere() -> None:
    settings = load_settings({"GATEWAY_JWT_SECRET": "hunter2-hunter2"})
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.jwt_secret)
    assert settings.jwt_secret == Secret("hunter2-hunter2")
    assert settings.jwt_secret is not None and settings.jwt_secret.get() == "hunter2-hunter2"


def test_development_reads_the_dev_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "dev-jwt-secret").write_text("from-the-file\n")
    settings = load_settings({})
    assert settings.jwt_secret == Secret("from-the-file")


def test_production_accepts_a_complete_configuration(tmp_path: Path) -> None:
    settings = load_settings(prod_env(tmp_path))
    assert settings.is_production
    assert settings.dev_token_endpoint is False
    assert settings.allowed_origins == ("https://chat.example.com",)


@pytest.mark.parametrize(
    ("secret", "needle"),
    [("short-secret", "shorter than 32 bytes"), ("your-256-bit-secret", "well-known default")],
)
def test_production_refuses_weak_secrets(tmp_path: Path, secret: str, needle: str) -> None:
    found = problems(prod_env(tmp_path, GATEWAY_JWT_SECRET=secret))
    assert any(needle in p for p in found), found


def test_production_reports_every_problem_at_once(tmp_path: Path) -> None:
    env = {
        "GATEWAY_ENV": "production",
        "GATEWAY_JWT_SECRET": "changeme",
        "GATEWAY_DEV_TOKEN_ENDPOINT": "true",
        "GATEWAY_PORT": "http",
    }
    found = problems(env)
    text = "\n".join(found)
    for needle in (
        "shorter than 32",
        "well-known default",
        "GATEWAY_TLS_CERT_FILE is required",
        "GATEWAY_TLS_KEY_FILE is required",
        "GATEWAY_DEV_TOKEN_ENDPOINT must be off",
        "GATEWAY_ALLOWED_ORIGINS is required",
        "GATEWAY_JWT_AUDIENCE is required",
        "GATEWAY_PORT='http'",
    ):
        assert needle in text, text
    assert "changeme" not in text  # a secret never appears in an error


def test_production_with_missing_tls_files(tmp_path: Path) -> None:
    env = prod_env(tmp_path, GATEWAY_TLS_CERT_FILE=str(tmp_path / "nope.pem"))
    assert any("does not exist" in p for p in problems(env))


def test_production_behind_a_tls_proxy_needs_no_certificate(tmp_path: Path) -> None:
    env = prod_env(tmp_path, GATEWAY_TLS="proxy", GATEWAY_TRUSTED_PROXIES="10.0.0.0/8")
    del env["GATEWAY_TLS_CERT_FILE"], env["GATEWAY_TLS_KEY_FILE"]
    settings = load_settings(env)
    assert settings.tls == "proxy"
    assert settings.trusted_proxies == ("10.0.0.0/8",)


@pytest.mark.parametrize("proxies", [None, "", " , "])
def test_production_behind_a_tls_proxy_needs_trusted_proxies(
    tmp_path: Path, proxies: str | None
) -> None:
    # Without them every client is keyed by the proxy's address: one client spends the quota.
    env = prod_env(tmp_path, GATEWAY_TLS="proxy")
    if proxies is not None:
        env["GATEWAY_TRUSTED_PROXIES"] = proxies
    [problem] = problems(env)
    assert problem.startswith("production: GATEWAY_TLS=proxy needs GATEWAY_TRUSTED_PROXIES")
    assert "GATEWAY_CONNECT_RATE" in problem  # says why


def test_development_behind_a_tls_proxy_needs_no_trusted_proxies() -> None:
    settings = load_settings({"GATEWAY_JWT_SECRET": "dev", "GATEWAY_TLS": "proxy"})
    assert (settings.tls, settings.trusted_proxies) == ("proxy", ())


@pytest.mark.parametrize("audience", [None, "", "  "])
def test_production_requires_an_audience(tmp_path: Path, audience: str | None) -> None:
    env = prod_env(tmp_path)
    del env["GATEWAY_JWT_AUDIENCE"]
    if audience is not None:
        env["GATEWAY_JWT_AUDIENCE"] = audience
    [problem] = problems(env)
    assert problem.startswith("production: GATEWAY_JWT_AUDIENCE is required")
    assert "other service" in problem  # says why
    # Development keeps accepting tokens without aud when none is configured.
    assert load_settings({"GATEWAY_JWT_SECRET": "dev"}).jwt_audience is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_PORT", "70000"),
        ("GATEWAY_MAX_MESSAGE_BYTES", "-1"),
        ("GATEWAY_RATE_PER_SECOND", "nan"),
        ("GATEWAY_RATE_BURST", "0"),
        ("GATEWAY_BACKLOG", "100"),
        ("GATEWAY_ENV", "staging"),
        ("GATEWAY_TLS", "off"),
        ("GATEWAY_CONNECT_RATE", "lots"),
        ("GATEWAY_BROKER_URL", "amqp://x"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://ok.example,chat.example.com"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://chat.example.com/path"),
        ("GATEWAY_ALLOWED_ORIGINS", "https://[bad"),  # urlsplit raises: not a traceback
        ("GATEWAY_ALLOWED_ORIGINS", "https://u:p@chat.example.com"),  # matches no browser
        ("GATEWAY_OPEN_ROOMS", "lobby,has space"),
        ("GATEWAY_JWT_ALGORITHMS", "none"),
        ("GATEWAY_JWT_ALGORITHMS", "HS256,RS256"),
        ("GATEWAY_TRUSTED_PROXIES", "not-an-ip"),
        ("GATEWAY_LOG_LEVEL", "LOUD"),
        ("GATEWAY_PERMESSAGE_DEFLATE", "maybe"),
        ("GATEWAY_METRICS_PORT", "65536"),
        ("GATEWAY_METRICS_PORT", "-1"),
        ("GATEWAY_METRICS_PORT", "3001"),  # the public port
        ("GATEWAY_SHUTDOWN_SPREAD_SECONDS", "-1"),
        ("GATEWAY_SHUTDOWN_SPREAD_SECONDS", "nan"),
        ("GATEWAY_SHUTDOWN_SPREAD_SECONDS", "28"),  # leaves the default grace too little
        ("GATEWAY_SHUTDOWN_GRACE_SECONDS", "0"),
        ("GATEWAY_SHUTDOWN_GRACE_SECONDS", "inf"),
        ("GATEWAY_SHUTDOWN_GRACE_SECONDS", "10"),  # less than the default spread
    ],
)
def test_bad_values_are_reported_by_name(name: str, value: str) -> None:
    found = problems({"GATEWAY_JWT_SECRET": "dev", name: value})
    assert any(name in p or "GATEWAY_JWT" in p for p in found), found


def test_public_key_algorithms_need_a_key(tmp_path: Path) -> None:
    found = problems({"GATEWAY_JWT_ALGORITHMS": "RS256", "GATEWAY_JWT_SECRET_FILE": ""})
    assert any("GATEWAY_JWT_PUBLIC_KEY_FILE or GATEWAY_JWT_JWKS_URL" in p for p in found)
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    settings = load_settings({"GATEWAY_JWT_PUBLIC_KEY_FILE": str(key)})
    assert settings.jwt_algorithms == ("RS256", "ES256", "EdDSA")
    assert settings.public_key_algorithms == ("RS256", "ES256", "EdDSA")
    assert settings.secret_algorithms == ()


def test_production_jwks_must_be_https(tmp_path: Path) -> None:
    env = prod_env(tmp_path, GATEWAY_JWT_JWKS_URL="http://idp.example/jwks.json")
    del env["GATEWAY_JWT_SECRET"]
    assert any("https" in p for p in problems(env))


def test_lists_are_trimmed() -> None:
    settings = load_settings(
        {
            "GATEWAY_JWT_SECRET": "dev",
            "GATEWAY_OPEN_ROOMS": " lobby , general ,,",
            "GATEWAY_ALLOWED_ORIGINS": "https://a.example, https://b.example:8443",
        }
    )
    assert settings.open_rooms == ("lobby", "general")
    assert settings.allowed_origins == ("https://a.example", "https://b.example:8443")


def test_operations_defaults() -> None:
    settings = load_settings({"GATEWAY_JWT_SECRET": "dev"})
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9102)
    assert (settings.shutdown_spread_seconds, settings.shutdown_grace_seconds) == (10.0, 30.0)


@pytest.mark.parametrize(
    ("spread", "grace", "valid"),
    [
        ("0", "3", True),  # all at once; the reserve alone
        ("0", "2.9", False),
        ("2", "5", True),
        ("2", "4.99", False),
        ("20", "20", False),  # equal: nothing left for the last closes to finish
        ("20", "45", True),
    ],
)
def test_the_grace_must_exceed_the_spread_by_the_reserve(
    spread: str, grace: str, valid: bool
) -> None:
    env = {
        "GATEWAY_JWT_SECRET": "dev",
        "GATEWAY_SHUTDOWN_SPREAD_SECONDS": spread,
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": grace,
    }
    if valid:
        settings = load_settings(env)
        assert settings.shutdown_grace_seconds - settings.shutdown_spread_seconds >= 3
    else:
        [problem] = problems(env)
        assert "GATEWAY_SHUTDOWN_GRACE_SECONDS" in problem
        assert "GATEWAY_SHUTDOWN_SPREAD_SECONDS" in problem


def test_metrics_can_be_turned_off_and_moved() -> None:
    env = {"GATEWAY_JWT_SECRET": "dev", "GATEWAY_METRICS_PORT": "0"}
    assert load_settings(env).metrics_port == 0
    env.update(GATEWAY_METRICS_HOST="0.0.0.0", GATEWAY_METRICS_PORT="9200")
    assert (load_settings(env).metrics_host, load_settings(env).metrics_port) == ("0.0.0.0", 9200)


# --- URLs in messages: never a password ----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:S3cr3t@redis:6379/0", "redis://***@redis:6379/0"),  # password only
        ("rediss://alice:S3cr3t@redis.example:6380/1", "rediss://***@redis.example:6380/1"),
        ("redis://alice@redis/2", "redis://***@redis/2"),  # user only
        ("redis+sentinel://:S3cr3t@host:26379/0", "redis+sentinel://***@host:26379/0"),
        ("redis://redis:6379/0?password=S3cr3t", "redis://redis:6379/0"),  # redis-py reads it
        ("redis://redis:6379/0#S3cr3t", "redis://redis:6379/0"),
        ("redis://u:S3cr3t@[2001:db8::1]:6379/0?x=1", "redis://***@[2001:db8::1]:6379/0"),
        ("redis://[::1]/0", "redis://[::1]/0"),
        (
            "https://idp.example.com/.well-known/jwks.json",
            "https://idp.example.com/.well-known/jwks.json",
        ),
        ("memory://", "memory://"),
        ("unix:///run/redis.sock?password=S3cr3t", "unix:///run/redis.sock"),
        ("redis://:p@ss:S3cr3t@host/0", "redis://***@host/0"),  # an unescaped @ in it
    ],
)
def test_redact_url_keeps_where_and_drops_who(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://:S3cr3t@[::1/0",  # urlsplit: invalid IPv6 URL
        "redis://:S3cr3t@host:port/0",  # not a port
        "redis://:S3cr3t@host:99999/0",  # out of range
        "redis://:S3/cr3t@host/0",  # an unescaped / cuts the userinfo: the rest is a "path"
        "redis://u:1234?S3cr3t@host/0",  # ... or a ? (netloc "u:1234" would show 1234)
        "redis://u:S3#cr3t@host/0",
        "redis://:S3cr3t @host/0",  # whitespace
        "redis://:S3cr3t\t@host/0",  # urlsplit drops tabs silently
        "S3cr3t",  # not a URL at all
        ":S3cr3t@host:6379",
        "",
    ],
)
def test_redact_url_shows_a_placeholder_for_what_it_cannot_take_apart(url: str) -> None:
    assert redact_url(url) == UNPARSEABLE_URL


@pytest.mark.parametrize(
    ("name", "url", "shown"),
    [
        (
            "GATEWAY_RATELIMIT_STORAGE_URL",
            "redis+sentinel://:S3cr3t@host:26379/0",
            "redis+sentinel://***@host:26379/0",
        ),
        (
            "GATEWAY_BROKER_URL",
            "amqp://guest:S3cr3t@mq:5672/?password=S3cr3t",
            "amqp://***@mq:5672/",
        ),
        ("GATEWAY_BROKER_URL", "redis://:S3cr3t@[::1/0", UNPARSEABLE_URL),
        ("GATEWAY_RATELIMIT_STORAGE_URL", "redis://:S3cr3t@redis:99999/0", UNPARSEABLE_URL),
        (
            "GATEWAY_JWT_JWKS_URL",
            "ftp://idp:S3cr3t@idp.example/jwks.json",
            "ftp://***@idp.example/jwks.json",
        ),
        ("GATEWAY_JWT_JWKS_URL", "https://idp:S3cr3t@idp.example:x/jwks", UNPARSEABLE_URL),
    ],
)
def test_url_settings_are_reported_without_their_password(name: str, url: str, shown: str) -> None:
    found = problems({"GATEWAY_JWT_SECRET": "dev", name: url})
    text = "\n".join(found)
    assert "S3cr3t" not in text
    [problem] = [p for p in found if p.startswith(f"{name}=")]
    assert problem.startswith(f"{name}={shown} ")


def test_production_jwks_url_is_reported_without_its_password(tmp_path: Path) -> None:
    env = prod_env(tmp_path, GATEWAY_JWT_JWKS_URL="http://idp:S3cr3t@idp.example/jwks.json")
    del env["GATEWAY_JWT_SECRET"]
    found = problems(env)
    assert found == ["production: GATEWAY_JWT_JWKS_URL must use https://"]


def test_several_workers_need_a_shared_redis() -> None:
    with pytest.raises(SettingsError) as error:
        make_settings({"GATEWAY_WORKERS": "2"})
    problems = error.value.problems
    assert any("GATEWAY_BROKER_URL=redis://" in p for p in problems)
    assert any("GATEWAY_RATELIMIT_STORAGE_URL=redis://" in p for p in problems)
    settings = make_settings(
        {
            "GATEWAY_WORKERS": "3",
            "GATEWAY_BROKER_URL": "redis://127.0.0.1:6379/0",
            "GATEWAY_RATELIMIT_STORAGE_URL": "redis://127.0.0.1:6379/1",
            "GATEWAY_METRICS_PORT": "9102",
        }
    )
    assert settings.workers == 3


@pytest.mark.parametrize(("metrics_port", "port"), [("65535", "3001"), ("3000", "3001")])
def test_the_workers_metrics_ports_must_fit(metrics_port: str, port: str) -> None:
    with pytest.raises(SettingsError, match="workers' metrics take ports"):
        make_settings(
            {
                "GATEWAY_WORKERS": "2",
                "GATEWAY_BROKER_URL": "redis://127.0.0.1:6379/0",
                "GATEWAY_RATELIMIT_STORAGE_URL": "redis://127.0.0.1:6379/1",
                "GATEWAY_METRICS_PORT": metrics_port,
                "GATEWAY_PORT": port,
            }
        )


def test_a_redis_broker_key_is_derived_in_development_and_at_least_32_bytes(
    tmp_path: Path,
) -> None:
    redis = {"GATEWAY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    derived = make_settings(redis).broker_secret  # development: from the JWT secret
    assert derived is not None and len(derived.get()) >= 32
    assert make_settings(redis).broker_secret == derived  # the same on every instance
    with pytest.raises(SettingsError, match="shorter than 32 bytes"):
        make_settings({**redis, "GATEWAY_BROKER_SECRET": "short"})
    explicit = make_settings({**redis, "GATEWAY_BROKER_SECRET": "k" * 32}).broker_secret
    assert explicit is not None and explicit.get() == "k" * 32
    # Production derives nothing: the operator gives the key, in a file or the variable.
    assert any("GATEWAY_BROKER_SECRET" in p for p in problems(prod_env(tmp_path, **redis)))
    key_file = tmp_path / "broker"
    key_file.write_text("b" * 40 + "\n")
    loaded = load_settings(prod_env(tmp_path, **redis, GATEWAY_BROKER_SECRET_FILE=str(key_file)))
    assert loaded.broker_secret == Secret("b" * 40)


@pytest.mark.parametrize("written", ["warning", "Warning", "WARNING"])
def test_the_log_level_is_read_in_either_case(written: str) -> None:
    assert make_settings({"GATEWAY_LOG_LEVEL": written}).log_level == "WARNING"


@pytest.mark.parametrize(
    "url",
    ["/auth/chat-token", "/t", "https://auth.example.com/chat/token", "https://10.0.0.5:8443/t"],
)
def test_a_page_token_url_is_a_path_or_an_https_url(tmp_path: Path, url: str) -> None:
    assert load_settings(prod_env(tmp_path, GATEWAY_PAGE_TOKEN_URL=url)).page_token_url == url


@pytest.mark.parametrize(
    "url",
    [
        "//evil.example/token",  # another origin, without saying so
        "http://auth.example.com/t",  # production: https only
        "https://user:pw@auth.example.com/t",
        "https://auth.example.com/t?next=1",
        "https://auth.example.com/t#x",
        "https://auth.example.com",  # no path
        "https://auth.example.com;script-src */t",  # would end the CSP directive
        "https://auth.example.com */t",
        "javascript:alert(1)",
        "auth/chat-token",
        '/t"><script>alert(1)</script>',
        "/t\u202e",
    ],
)
def test_a_page_token_url_that_is_not_safe_to_use_is_refused(tmp_path: Path, url: str) -> None:
    (problem,) = problems(prod_env(tmp_path, GATEWAY_PAGE_TOKEN_URL=url))
    assert problem.startswith("GATEWAY_PAGE_TOKEN_URL=")
    assert "pw" not in problem


def test_development_allows_an_http_page_token_url() -> None:
    url = "http://localhost:8080/token"
    assert make_settings({"GATEWAY_PAGE_TOKEN_URL": url}).page_token_url == url
