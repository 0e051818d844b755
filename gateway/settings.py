"""One frozen, typed :class:`Settings`, built from the environment.

:func:`load_settings` is a pure function over a mapping (``os.environ`` in production, a dict in
tests). It collects every problem it finds and raises them together in one
:class:`SettingsError`, so an operator fixes a configuration in one pass, not one restart per
mistake. docs/configuration.md lists every variable read here; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import limits

__all__ = [
    "DEV_CERT_FILE",
    "DEV_FILES_HINT",
    "DEV_KEY_FILE",
    "DEV_SECRET_FILE",
    "KNOWN_DEFAULT_SECRETS",
    "MIN_SECRET_BYTES",
    "ROOM_NAME",
    "SHUTDOWN_RESERVE_SECONDS",
    "UNPARSEABLE_URL",
    "Secret",
    "Settings",
    "SettingsError",
    "describe",
    "is_room_name",
    "load_settings",
    "parse_rate",
    "redact_url",
]

#: Where ``python -m gateway dev-setup`` writes the development certificate, key and secret.
#: Relative paths resolve against the working directory, which is the checkout for ``make run``.
DEV_CERT_FILE = Path("certs/dev-cert.pem")
DEV_KEY_FILE = Path("certs/dev-key.pem")
DEV_SECRET_FILE = Path("certs/dev-jwt-secret")
#: What a problem with one of them says to do about it.
DEV_FILES_HINT = (
    "python -m gateway dev-setup makes the development files in certs/ of the working "
    "directory; make run runs it in the checkout"
)

#: Of the shutdown grace, the part kept for the server's own stop after the connections are
#: closed: Hypercorn's graceful timeout and the after-serving hooks (gateway/server.py). The
#: grace must exceed the spread by at least this much.
SHUTDOWN_RESERVE_SECONDS = 3.0

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output (32 bytes).
MIN_SECRET_BYTES = 32

#: Secrets that appear in tutorials and sample files; production refuses them at any length.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "secret",
        "changeme",
        "change-me",
        "password",
        "your-256-bit-secret",
        "development-secret-do-not-use-in-production",
        "please-change-this-secret-in-production-now",
    }
)

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
SYMMETRIC_ALGORITHMS = frozenset({"HS256"})
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS | SYMMETRIC_ALGORITHMS

#: The room names of the wire contract (docs/protocol.md, schemas/defs.json): the one rule,
#: used by the settings, the token claims and the room policy. Match it in full.
ROOM_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_room_name(room: object) -> bool:
    """Whether ``room`` is a string matching :data:`ROOM_NAME` in full (no trailing newline)."""
    return isinstance(room, str) and ROOM_NAME.fullmatch(room) is not None


#: What :func:`redact_url` shows instead of a value it cannot take apart safely.
UNPARSEABLE_URL = "<unparseable URL>"

_URL_CHARS = re.compile(r"[^\x00-\x20\x7f-\x9f]+")  # urlsplit silently drops tabs and newlines


def redact_url(url: str) -> str:
    """``url`` fit for an error message or a log line: scheme, host, port and path, no secrets.

    The user and password (``redis://user:pass@host``) become ``***``; the query and the
    fragment are dropped (redis-py reads ``?password=``). A value that is not a URL of the form
    ``scheme://...`` that :func:`urllib.parse.urlsplit` takes apart (a bad port or IPv6
    address, spaces, a password with an unescaped ``/`` that spills into the path) is shown as
    :data:`UNPARSEABLE_URL`, since where its secret ends cannot be told.
    """
    if not _URL_CHARS.fullmatch(url):
        return UNPARSEABLE_URL
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        return UNPARSEABLE_URL
    if not parts.scheme or not url[len(parts.scheme) + 1 :].startswith("//"):
        return UNPARSEABLE_URL
    _userinfo, at, host = parts.netloc.rpartition("@")
    if "@" in parts.path or (not at and "@" in url):  # userinfo cut short by a / ? or #
        return UNPARSEABLE_URL
    return f"{parts.scheme}://{'***@' if at else ''}{host}{parts.path}"


_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


class Secret:
    """A string that never shows its value when printed, logged or put in a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SettingsError(Exception):
    """The environment does not describe a configuration the gateway may start with."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the gateway. Names mirror the GATEWAY_* variables, with units."""

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = 3001
    tls: Literal["on", "proxy"] = "on"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    trusted_proxies: tuple[str, ...] = ()

    jwt_secret: Secret | None = None
    jwt_public_key_file: Path | None = None
    jwt_jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_seconds: float = 10.0
    jwt_require_exp: bool = True
    jwt_jwks_cache_seconds: float = 300.0
    jwt_jwks_max_stale_seconds: float = 86400.0
    jwt_jwks_allowed_hosts: tuple[str, ...] = ()

    allowed_origins: tuple[str, ...] = ()
    allow_missing_origin: bool = True
    open_rooms: tuple[str, ...] = ("lobby",)

    max_message_bytes: int = 16 * 1024
    rate_per_second: float = 5.0
    rate_burst: int = 15
    max_invalid_messages: int = 10
    max_rate_violations: int = 20
    abuse_window_seconds: float = 60.0
    send_queue_size: int = 256
    send_queue_bytes: int = 1024 * 1024

    max_connections: int = 10_000
    max_connections_per_user: int = 10
    connect_rate: str = "30/minute"
    ratelimit_storage_url: str = "memory://"
    broker_url: str = "memory://"
    broker_secret: Secret | None = None
    redis_ca_file: Path | None = None
    presence_ttl_seconds: float = 20.0
    presence_max_members: int = 100
    overload_lag_ms: int = 50
    batch_window_ms: int = 20
    history_size: int = 100
    history_ttl_seconds: int = 600
    dedupe_window_seconds: int = 300
    user_message_rate: str = "20/second"

    dev_token_endpoint: bool = True
    dev_token_ttl_seconds: int = 3600
    page_token_url: str | None = None
    permessage_deflate: bool = False
    backlog: int = 2048
    ping_interval_seconds: float = 20.0
    log_level: str = "INFO"

    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9102
    workers: int = 1
    shutdown_spread_seconds: float = 10.0
    shutdown_grace_seconds: float = 30.0

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def public_key_algorithms(self) -> tuple[str, ...]:
        return tuple(a for a in self.jwt_algorithms if a in ASYMMETRIC_ALGORITHMS)

    @property
    def secret_algorithms(self) -> tuple[str, ...]:
        return tuple(a for a in self.jwt_algorithms if a in SYMMETRIC_ALGORITHMS)


T = TypeVar("T")


class _Reader:
    """Reads typed values from the mapping, recording problems instead of raising."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def optional(self, name: str) -> str | None:
        return self.raw(name)

    def parsed(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not {what}")
            return default

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.parsed(name, default, int, "a whole number")
        if not minimum <= value <= maximum:
            self.problems.append(f"{name}={value} must be between {minimum} and {maximum}")
            return default
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.parsed(name, default, float, "a number")
        if not minimum <= value <= maximum:  # also rejects NaN
            self.problems.append(f"{name}={value} must be between {minimum} and {maximum}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        def parse(value: str) -> bool:
            lowered = value.lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)

        return self.parsed(name, default, parse, "a boolean (true/false)")

    def choice(
        self,
        name: str,
        default: str,
        choices: tuple[str, ...],
        fold: Callable[[str], str] | None = None,
    ) -> str:
        value = self.text(name, default)
        if fold is not None:
            value = fold(value)
        if value not in choices:
            self.problems.append(f"{name}={value!r} must be one of: {', '.join(choices)}")
            return default
        return value

    def listing(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.env.get(name)
        if value is None:
            return default
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def path(self, name: str, default: Path | None = None) -> Path | None:
        value = self.raw(name)
        return Path(value) if value is not None else default


def _valid_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
    except ValueError:  # a bad IPv6 literal: https://[bad
        return False
    return (
        parts.scheme in {"http", "https"}
        and bool(parts.netloc)
        and "@" not in parts.netloc  # a browser's Origin never carries a user or password
        and not parts.path
        and not parts.query
        and not parts.fragment
    )


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build the settings from ``env``.

    Args:
        env: the environment, or any mapping of GATEWAY_* names to strings.

    Raises:
        SettingsError: with every problem found, when the configuration is unusable, or when
            production's rules (weak secret, missing TLS files, the development token endpoint,
            no origin policy, no token audience, a TLS proxy without trusted proxies) are
            broken. A URL shown in a problem goes through :func:`redact_url`.
    """
    r = _Reader(env)
    mode = r.choice("GATEWAY_ENV", "development", ("development", "production"))
    production = mode == "production"

    tls = r.choice("GATEWAY_TLS", "on", ("on", "proxy"))
    cert = r.path("GATEWAY_TLS_CERT_FILE", None if production else DEV_CERT_FILE)
    key = r.path("GATEWAY_TLS_KEY_FILE", None if production else DEV_KEY_FILE)

    proxies = r.listing("GATEWAY_TRUSTED_PROXIES", ())
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            r.problems.append(f"GATEWAY_TRUSTED_PROXIES: {proxy!r} is not an IP address or network")

    secret = _read_secret(
        r,
        "GATEWAY_JWT_SECRET",
        "GATEWAY_JWT_SECRET_FILE",
        default_file=None if production else DEV_SECRET_FILE,
    )
    public_key_file = r.path("GATEWAY_JWT_PUBLIC_KEY_FILE")
    jwks_url = r.optional("GATEWAY_JWT_JWKS_URL")
    algorithms = r.listing("GATEWAY_JWT_ALGORITHMS", ())
    if not algorithms:
        algorithms = ("RS256", "ES256", "EdDSA") if (public_key_file or jwks_url) else ("HS256",)
    dev_secret_file = None if production or r.raw("GATEWAY_JWT_SECRET_FILE") else DEV_SECRET_FILE
    _check_keys(r, algorithms, secret, public_key_file, jwks_url, dev_secret_file)

    origins = r.listing("GATEWAY_ALLOWED_ORIGINS", ())
    for origin in origins:
        if not _valid_origin(origin):
            r.problems.append(
                f"GATEWAY_ALLOWED_ORIGINS: {origin!r} is not an origin like https://chat.example.com"
            )
    open_rooms = r.listing("GATEWAY_OPEN_ROOMS", ("lobby",))
    for room in open_rooms:
        if not is_room_name(room):
            r.problems.append(f"GATEWAY_OPEN_ROOMS: {room!r} is not a valid room name")

    connect_rate = _rate(r, "GATEWAY_CONNECT_RATE", "30/minute")
    user_message_rate = _rate(r, "GATEWAY_USER_MESSAGE_RATE", "20/second")
    storage_url = r.text("GATEWAY_RATELIMIT_STORAGE_URL", "memory://")
    broker_url = r.text("GATEWAY_BROKER_URL", "memory://")
    for name, url in (
        ("GATEWAY_RATELIMIT_STORAGE_URL", storage_url),
        ("GATEWAY_BROKER_URL", broker_url),
    ):
        _check_url(r, name, url, ("memory", "redis", "rediss"), "a memory:// or redis:// URL")

    settings = Settings(
        env="production" if production else "development",
        host=r.text("GATEWAY_HOST", "127.0.0.1"),
        port=r.integer("GATEWAY_PORT", 3001, 0, 65535),
        tls="proxy" if tls == "proxy" else "on",
        tls_cert_file=cert,
        tls_key_file=key,
        trusted_proxies=proxies,
        jwt_secret=secret,
        jwt_public_key_file=public_key_file,
        jwt_jwks_url=jwks_url,
        jwt_algorithms=algorithms,
        jwt_audience=r.optional("GATEWAY_JWT_AUDIENCE"),
        jwt_issuer=r.optional("GATEWAY_JWT_ISSUER"),
        jwt_leeway_seconds=r.number("GATEWAY_JWT_LEEWAY_SECONDS", 10.0, 0.0, 300.0),
        jwt_require_exp=r.boolean("GATEWAY_JWT_REQUIRE_EXP", True),
        jwt_jwks_cache_seconds=r.number("GATEWAY_JWT_JWKS_CACHE_SECONDS", 300.0, 1.0, 86400.0),
        jwt_jwks_max_stale_seconds=r.number(
            "GATEWAY_JWT_JWKS_MAX_STALE_SECONDS", 86400.0, 1.0, 7 * 86400.0
        ),
        jwt_jwks_allowed_hosts=_jwks_hosts(r, jwks_url),
        allowed_origins=origins,
        allow_missing_origin=r.boolean("GATEWAY_ALLOW_MISSING_ORIGIN", True),
        open_rooms=open_rooms,
        max_message_bytes=r.integer("GATEWAY_MAX_MESSAGE_BYTES", 16 * 1024, 256, 1024 * 1024),
        rate_per_second=r.number("GATEWAY_RATE_PER_SECOND", 5.0, 0.01, 10_000.0),
        rate_burst=r.integer("GATEWAY_RATE_BURST", 15, 1, 100_000),
        max_invalid_messages=r.integer("GATEWAY_MAX_INVALID_MESSAGES", 10, 1, 100_000),
        max_rate_violations=r.integer("GATEWAY_MAX_RATE_VIOLATIONS", 20, 1, 100_000),
        abuse_window_seconds=r.number("GATEWAY_ABUSE_WINDOW_SECONDS", 60.0, 1.0, 86400.0),
        send_queue_size=r.integer("GATEWAY_SEND_QUEUE_SIZE", 256, 1, 1_000_000),
        send_queue_bytes=r.integer(
            "GATEWAY_SEND_QUEUE_BYTES", 1024 * 1024, 4096, 1024 * 1024 * 1024
        ),
        max_connections=r.integer("GATEWAY_MAX_CONNECTIONS", 10_000, 1, 10_000_000),
        max_connections_per_user=r.integer("GATEWAY_MAX_CONNECTIONS_PER_USER", 10, 1, 100_000),
        connect_rate=connect_rate,
        ratelimit_storage_url=storage_url,
        broker_url=broker_url,
        broker_secret=_broker_secret(r, production, secret),
        redis_ca_file=r.path("GATEWAY_REDIS_CA_FILE"),
        presence_ttl_seconds=r.number("GATEWAY_PRESENCE_TTL_SECONDS", 20.0, 3.0, 300.0),
        presence_max_members=r.integer("GATEWAY_PRESENCE_MAX_MEMBERS", 100, 1, 10_000),
        overload_lag_ms=r.integer("GATEWAY_OVERLOAD_LAG_MS", 50, 0, 60_000),
        batch_window_ms=r.integer("GATEWAY_BATCH_WINDOW_MS", 20, 0, 1000),
        history_size=r.integer("GATEWAY_HISTORY_SIZE", 100, 0, 10_000),
        history_ttl_seconds=r.integer("GATEWAY_HISTORY_TTL_SECONDS", 600, 1, 7 * 86400),
        dedupe_window_seconds=r.integer("GATEWAY_DEDUPE_WINDOW_SECONDS", 300, 0, 86400),
        user_message_rate=user_message_rate,
        dev_token_endpoint=r.boolean("GATEWAY_DEV_TOKEN_ENDPOINT", not production),
        dev_token_ttl_seconds=r.integer("GATEWAY_DEV_TOKEN_TTL_SECONDS", 3600, 5, 86400),
        page_token_url=_page_token_url(r, production),
        permessage_deflate=r.boolean("GATEWAY_PERMESSAGE_DEFLATE", False),
        backlog=r.integer("GATEWAY_BACKLOG", 2048, 1024, 65535),
        ping_interval_seconds=r.number("GATEWAY_PING_INTERVAL_SECONDS", 20.0, 0.0, 3600.0),
        # Upper or lower case: the logs themselves print the level in lower case.
        log_level=r.choice("GATEWAY_LOG_LEVEL", "INFO", _LOG_LEVELS, fold=str.upper),
        metrics_host=r.text("GATEWAY_METRICS_HOST", "127.0.0.1"),
        metrics_port=r.integer("GATEWAY_METRICS_PORT", 9102, 0, 65535),
        workers=r.integer("GATEWAY_WORKERS", 1, 1, 64),
        shutdown_spread_seconds=r.number("GATEWAY_SHUTDOWN_SPREAD_SECONDS", 10.0, 0.0, 3600.0),
        shutdown_grace_seconds=r.number("GATEWAY_SHUTDOWN_GRACE_SECONDS", 30.0, 1.0, 86400.0),
    )
    _check_shutdown(r, settings)
    _check_broker(r, settings)
    if production:
        _check_production(r, settings)
    if r.problems:
        raise SettingsError(r.problems)
    return settings


def describe(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """The effective configuration as ``GATEWAY_NAME=value`` lines, for ``gateway config``.

    Each line says where its value came from when not from the variable itself (``# default``,
    or the file a secret was read from). Secrets show as ``***``, a URL's password as ``***``
    (:func:`redact_url`): the output can be pasted into a ticket.
    """
    lines = []
    for field in dataclasses.fields(settings):
        name = f"GATEWAY_{field.name.upper()}"
        value = getattr(settings, field.name)
        if isinstance(value, Secret):
            shown = "***"
        elif value is None:
            shown = ""
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, tuple):
            shown = ",".join(value)
        elif field.name.endswith("_url"):
            shown = redact_url(value)
        else:
            shown = str(value)
        source = ""
        if name not in env:
            file_name = f"{name}_FILE"
            if isinstance(value, Secret) and file_name in env:
                source = f"  # read from {file_name}"
            elif isinstance(value, Secret) and field.name == "jwt_secret":
                source = f"  # read from {DEV_SECRET_FILE} (the development default)"
            elif isinstance(value, Secret):
                source = "  # derived from the JWT secret (development only)"
            else:
                source = "  # default"
        lines.append(f"{name}={shown}{source}")
    return lines


def parse_rate(rate: str) -> limits.RateLimitItem:
    """The one rule for a rate setting: one limit in ``limits`` notation, like ``30/minute``
    or ``5 per 10 seconds``, of at least 1.

    Several limits (``20/minute;100/hour``) are refused: each setting enforces one.

    Raises:
        ValueError: saying what is wrong, for a settings problem.
    """
    try:
        items = limits.parse_many(rate)
    except ValueError:
        raise ValueError("is not in limits notation, like 20/minute or 5 per 10 seconds") from None
    if len(items) != 1:
        raise ValueError("names several limits; one only, like 20/minute")
    if items[0].amount < 1:
        raise ValueError("allows nothing; the amount must be at least 1, like 20/minute")
    return items[0]


def _rate(r: _Reader, name: str, default: str) -> str:
    rate = r.text(name, default)
    try:
        parse_rate(rate)
    except ValueError as error:
        r.problems.append(f"{name}={rate!r} {error}")
    return rate


def _read_secret(
    r: _Reader, name: str, file_name: str, default_file: Path | None = None
) -> Secret | None:
    """The secret in ``name``, or in the file ``file_name`` names (``default_file`` when unset)."""
    value = r.raw(name)
    secret_file = r.path(file_name, default_file)
    if value is not None and r.raw(file_name) is not None:
        r.problems.append(f"set {name} or {file_name}, not both")
    if value is None and secret_file is not None:
        try:
            value = secret_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            if r.raw(file_name) is not None:
                r.problems.append(f"{file_name}: {secret_file} does not exist")
        except (OSError, UnicodeDecodeError) as exc:
            r.problems.append(f"{file_name}: cannot read {secret_file}: {exc}")
    return Secret(value) if value is not None else None


def _broker_secret(r: _Reader, production: bool, jwt_secret: Secret | None) -> Secret | None:
    """GATEWAY_BROKER_SECRET(_FILE); in development, derived from the JWT secret when unset,
    so that instances sharing the development secret share this key too."""
    secret = _read_secret(r, "GATEWAY_BROKER_SECRET", "GATEWAY_BROKER_SECRET_FILE")
    if secret is None and not production and jwt_secret is not None:
        derived = hmac.new(jwt_secret.get().encode(), b"gateway broker envelopes", "sha256")
        secret = Secret(derived.hexdigest())
    return secret


def _check_keys(
    r: _Reader,
    algorithms: tuple[str, ...],
    secret: Secret | None,
    public_key_file: Path | None,
    jwks_url: str | None,
    dev_secret_file: Path | None,
) -> None:
    unknown = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
    if unknown:
        r.problems.append(
            f"GATEWAY_JWT_ALGORITHMS: {', '.join(unknown)} not supported "
            f"(allowed: {', '.join(sorted(SUPPORTED_ALGORITHMS))}; 'none' never is)"
        )
    wants_secret = any(a in SYMMETRIC_ALGORITHMS for a in algorithms)
    wants_public = any(a in ASYMMETRIC_ALGORITHMS for a in algorithms)
    if wants_secret and wants_public:
        # Mixing families is how algorithm confusion starts: a public key used as an HMAC secret.
        r.problems.append(
            "GATEWAY_JWT_ALGORITHMS mixes HS256 with public-key algorithms; choose one family"
        )
    if wants_secret and secret is None:
        where = (
            f" (the development default, {dev_secret_file} in the working directory "
            f"{Path.cwd()}, is missing or empty: {DEV_FILES_HINT})"
            if dev_secret_file is not None
            else ""
        )
        r.problems.append(f"HS256 needs GATEWAY_JWT_SECRET or GATEWAY_JWT_SECRET_FILE{where}")
    if wants_public and public_key_file is None and jwks_url is None:
        r.problems.append(
            "public-key algorithms need GATEWAY_JWT_PUBLIC_KEY_FILE or GATEWAY_JWT_JWKS_URL"
        )
    if public_key_file is not None and jwks_url is not None:
        r.problems.append("set GATEWAY_JWT_PUBLIC_KEY_FILE or GATEWAY_JWT_JWKS_URL, not both")
    if public_key_file is not None and not public_key_file.is_file():
        r.problems.append(f"GATEWAY_JWT_PUBLIC_KEY_FILE: {public_key_file} does not exist")
    if jwks_url is not None:
        _check_url(r, "GATEWAY_JWT_JWKS_URL", jwks_url, ("https", "http"), "an https:// URL")


def _jwks_hosts(r: _Reader, jwks_url: str | None) -> tuple[str, ...]:
    """``GATEWAY_JWT_JWKS_ALLOWED_HOSTS``: the hosts a key set fetch may be redirected to;
    by default the URL's own host alone. The URL's host must be among them."""
    hosts = tuple(host.lower() for host in r.listing("GATEWAY_JWT_JWKS_ALLOWED_HOSTS", ()))
    if jwks_url is None:
        return hosts
    try:
        own = (urlsplit(jwks_url).hostname or "").lower()
    except ValueError:
        return hosts  # the URL's own problem is reported by _check_url
    if not hosts:
        return (own,)
    if own not in hosts:
        r.problems.append(
            f"GATEWAY_JWT_JWKS_ALLOWED_HOSTS must include {own!r}, the host of GATEWAY_JWT_JWKS_URL"
        )
    return hosts


def _url_scheme(url: str) -> str | None:
    """The scheme of ``url``; None when urlsplit cannot parse it (or its port)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        return None
    return parts.scheme


def _check_url(r: _Reader, name: str, url: str, schemes: tuple[str, ...], what: str) -> None:
    # Every URL shown goes through redact_url: a mistyped one still carries its password.
    scheme = _url_scheme(url)
    if scheme is None:
        r.problems.append(
            f"{name}={redact_url(url)} is not a valid URL (check the host and port, and "
            "percent-encode reserved characters such as / ? # @ in the user and password)"
        )
    elif scheme not in schemes:
        r.problems.append(f"{name}={redact_url(url)} must be {what}")


#: GATEWAY_PAGE_TOKEN_URL: a path, or a URL of a plain host name or IPv4 address (its origin goes
#: into the Content-Security-Policy header, so nothing else may reach it).
_PAGE_TOKEN_URL = re.compile(
    r"(?:(?P<scheme>https?)://[A-Za-z0-9.-]+(?::[0-9]{1,5})?)?/(?!/)[A-Za-z0-9._~!$&'()*+,;=:@%/-]*"
)


def _page_token_url(r: _Reader, production: bool) -> str | None:
    """GATEWAY_PAGE_TOKEN_URL: a path on this origin (``/auth/chat-token``), or an https://
    URL (http:// in development) without user, query or fragment."""
    url = r.optional("GATEWAY_PAGE_TOKEN_URL")
    if url is None:
        return None
    what = (
        "a path on this origin like /auth/chat-token, or an https:// URL of a host name "
        "with a path and no user, query or fragment"
    )
    match = _PAGE_TOKEN_URL.fullmatch(url)
    ok = match is not None and (match["scheme"] in (None, "https") or not production)
    if not ok:
        shown = redact_url(url) if "://" in url else repr(url)  # a path holds no password
        r.problems.append(f"GATEWAY_PAGE_TOKEN_URL={shown} must be {what}")
    return url


def _check_shutdown(r: _Reader, s: Settings) -> None:
    # The closes are spread over the spread; after them the server needs the reserve to stop.
    if s.shutdown_grace_seconds < s.shutdown_spread_seconds + SHUTDOWN_RESERVE_SECONDS:
        r.problems.append(
            f"GATEWAY_SHUTDOWN_GRACE_SECONDS={s.shutdown_grace_seconds:g} must exceed "
            f"GATEWAY_SHUTDOWN_SPREAD_SECONDS={s.shutdown_spread_seconds:g} by at least "
            f"{SHUTDOWN_RESERVE_SECONDS:g} (the server's own stop after the last close)"
        )
    if s.metrics_port != 0 and s.metrics_port == s.port:
        r.problems.append(
            f"GATEWAY_METRICS_PORT={s.metrics_port} is GATEWAY_PORT: the metrics need a port "
            "of their own (0 turns them off)"
        )


def _check_broker(r: _Reader, s: Settings) -> None:
    redis = _url_scheme(s.broker_url) in {"redis", "rediss"}
    if redis and s.broker_secret is None:
        r.problems.append(
            "GATEWAY_BROKER_URL is a Redis: set GATEWAY_BROKER_SECRET or "
            "GATEWAY_BROKER_SECRET_FILE, the key that authenticates messages between instances "
            "(the same on every instance; python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))')"
        )
    elif redis and s.broker_secret is not None:
        if len(s.broker_secret.get().encode("utf-8")) < MIN_SECRET_BYTES:
            r.problems.append(f"GATEWAY_BROKER_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
    if s.workers > 1:
        shared = (
            ("GATEWAY_BROKER_URL", s.broker_url),
            (
                "GATEWAY_RATELIMIT_STORAGE_URL",
                s.ratelimit_storage_url,
            ),
        )
        for name, url in shared:
            if _url_scheme(url) not in {"redis", "rediss"}:
                r.problems.append(
                    f"GATEWAY_WORKERS={s.workers} needs {name}=redis://...: with memory:// each "
                    "worker process would be its own chat world"
                )
        last_metrics_port = s.metrics_port + s.workers - 1
        if s.metrics_port != 0 and (
            last_metrics_port > 65535 or s.metrics_port <= s.port <= last_metrics_port
        ):
            r.problems.append(
                f"GATEWAY_METRICS_PORT={s.metrics_port}: the workers' metrics take ports "
                f"{s.metrics_port} to {last_metrics_port}, which must be free of GATEWAY_PORT "
                "and at most 65535"
            )
    if s.redis_ca_file is not None and not s.redis_ca_file.is_file():
        r.problems.append(f"GATEWAY_REDIS_CA_FILE: {s.redis_ca_file} does not exist")


def _check_production(r: _Reader, s: Settings) -> None:
    if s.secret_algorithms and s.jwt_secret is not None:
        value = s.jwt_secret.get()
        if len(value.encode("utf-8")) < MIN_SECRET_BYTES:
            r.problems.append(
                f"production: the JWT secret is shorter than {MIN_SECRET_BYTES} bytes "
                "(generate one: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if value.lower() in KNOWN_DEFAULT_SECRETS:
            r.problems.append("production: the JWT secret is a well-known default; generate one")
    if s.jwt_jwks_url is not None and _url_scheme(s.jwt_jwks_url) not in {None, "https"}:
        r.problems.append("production: GATEWAY_JWT_JWKS_URL must use https://")
    if s.tls == "on":
        for name, path in (
            ("GATEWAY_TLS_CERT_FILE", s.tls_cert_file),
            ("GATEWAY_TLS_KEY_FILE", s.tls_key_file),
        ):
            if path is None:
                r.problems.append(f"production: {name} is required (or GATEWAY_TLS=proxy)")
            elif not path.is_file():
                r.problems.append(f"production: {name}: {path} does not exist")
    if s.tls == "proxy" and not s.trusted_proxies:
        r.problems.append(
            "production: GATEWAY_TLS=proxy needs GATEWAY_TRUSTED_PROXIES (the proxy's address): "
            "without it every client seems to come from the proxy, so one client can spend "
            "everyone's GATEWAY_CONNECT_RATE quota"
        )
    if s.jwt_audience is None:
        r.problems.append(
            "production: GATEWAY_JWT_AUDIENCE is required (the aud claim of this gateway's "
            "tokens, like chat): without it, a token the same issuer signs for any other "
            "service (a password reset, another API) would be accepted here"
        )
    if s.dev_token_endpoint:
        r.problems.append("production: GATEWAY_DEV_TOKEN_ENDPOINT must be off")
    if not s.allowed_origins:
        r.problems.append("production: GATEWAY_ALLOWED_ORIGINS is required (the origin policy)")
