"""Who is connecting: bearer tokens (RFC 6750) verified as JWTs (RFC 7519), and the origin check.

:class:`TokenVerifier` turns a token into a :class:`Principal` or raises :class:`AuthError` with
a short ``reason`` and a fixed human ``detail``; neither ever carries the token or any part of it.
Keys are bound to their algorithms once, at start-up (RFC 8725 section 3.1): a secret only with
HS256, a public key only with the algorithm of its type, so ``none`` and algorithm confusion
never reach a signature check. A token of another kind than an access token (a ``typ`` other
than JWT or at+jwt, RFC 8725 section 3.11) is refused before it too. Times are checked against
an injected clock.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from gateway.errors import AuthError
from gateway.jwks import JwksCache, JwksError
from gateway.settings import ROOM_NAME, Settings, is_room_name

__all__ = [
    "FALLBACK_NAME",
    "MAX_NAME_CHARS",
    "MAX_SUB_CHARS",
    "MAX_TOKEN_CHARS",
    "Principal",
    "TokenVerifier",
    "default_name",
    "extract_token",
    "mint_token",
    "origin_allowed",
]

MAX_TOKEN_CHARS = 8192
MAX_ROOMS = 100
#: The longest ``sub`` (the user id) and display name, in characters (Unicode code points, as
#: JSON Schema counts a string's length: schemas/defs.json).
MAX_SUB_CHARS = 128
MAX_NAME_CHARS = 64
#: The display name of a token without a ``name`` claim whose ``sub`` cannot serve as one
#: (:func:`default_name`). It passes every rule of a name, as a default must.
FALLBACK_NAME = "user"
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 section 2.1
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # RFC 7515 7.1
_ORIGIN_CHARS = re.compile(r"[\x21-\x7e]+")  # urlsplit silently drops tabs and newlines
# RFC 7515 4.1.2-4.1.6: key material named by the token itself is never trusted; 4.1.11: we
# understand no critical extension, so a token that declares one must be rejected.
_DISALLOWED_HEADERS = ("jwk", "jku", "x5u", "x5c", "crit")
# RFC 8725 section 3.11: other kinds of JWT the same issuer signs (a password reset, a logout
# token) carry their own typ. A typ, when present, must be a plain JWT or an access token
# (RFC 9068 section 2.1); media types are case-insensitive and "application/" may be left out
# (RFC 7515 section 4.1.9).
_ALLOWED_TYPES = frozenset({"jwt", "at+jwt"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_MAX_NUMERIC_DATE = 253_402_300_799.0  # 9999-12-31T23:59:59Z
_DECODE_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (  # the first match wins
    (jwt.InvalidSignatureError, "bad_signature", "the token signature does not verify"),
    (jwt.InvalidAlgorithmError, "disallowed_algorithm", "the token's algorithm is not allowed"),
    (jwt.InvalidAudienceError, "invalid_audience", "the token is not meant for this service"),
    (jwt.InvalidIssuerError, "invalid_issuer", "the token comes from an unknown issuer"),
    (jwt.DecodeError, "malformed", "the token cannot be decoded"),
    (jwt.InvalidTokenError, "invalid_claims", "the token's claims are not valid"),
    (jwt.PyJWTError, "invalid_token", "the token cannot be verified"),
)
_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user, as the token describes them."""

    user_id: str
    name: str
    rooms: frozenset[str]
    expires_at: float | None


def _claims_error(detail: str) -> AuthError:
    return AuthError("invalid_claims", detail)


#: Unicode categories no claim's text may hold: controls, and surrogates (only lone ones
#: reach a str: a JSON escape of a valid pair decodes to one character).
_NOT_TEXT = frozenset({"Cc", "Cs"})


def _text_ok(value: object, max_chars: int) -> bool:
    """1 to ``max_chars`` characters, not blank, no control character, and no lone surrogate
    (a JSON string may hold ``"\\ud800"``: not Unicode text, it cannot be sent in any frame)."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= max_chars
        and bool(value.strip())
        and not any(unicodedata.category(c) in _NOT_TEXT for c in value)
    )


#: Format characters a display name may hold: the zero-width non-joiner and joiner, which
#: scripts (Persian, Indic) and emoji sequences need. Every other format character (category
#: Cf: bidi overrides and isolates such as U+202E, marks, zero-width spaces, tags) is refused:
#: in a name they only serve to impersonate ("alice" + U+200B) or reorder what follows.
_JOINERS = "\u200c\u200d"
_NAME_FORMAT_ALLOWED = frozenset(_JOINERS)


def _name_ok(value: object) -> bool:
    """A display name: 1 to 64 characters, not blank, no control or format character but
    those of :data:`_NAME_FORMAT_ALLOWED` (docs/protocol.md, Credentials)."""
    return _text_ok(value, MAX_NAME_CHARS) and not any(
        unicodedata.category(c) == "Cf" and c not in _NAME_FORMAT_ALLOWED for c in str(value)
    )


def default_name(sub: str) -> str:
    """The display name of a token without a ``name`` claim: its ``sub``, cut to
    :data:`MAX_NAME_CHARS` characters (whole code points; a joiner the cut leaves at the end,
    which would join nothing, goes too), or :data:`FALLBACK_NAME` when that is not a valid
    name (a format character such as U+202E in it, or only blanks): always a valid name, so a
    token is never refused for a claim it does not carry."""
    name = sub
    if len(name) > MAX_NAME_CHARS:
        name = name[:MAX_NAME_CHARS].rstrip(_JOINERS)
    return name if _name_ok(name) else FALLBACK_NAME


_SUB_RULE = (
    f"the sub claim must be a string of 1 to {MAX_SUB_CHARS} characters, not blank, without "
    "control characters or unpaired surrogates"
)
_NAME_RULE = (
    f"the name claim must be a string of 1 to {MAX_NAME_CHARS} characters, without control or "
    "format characters (bidi overrides, zero-width spaces)"
)
_ROOMS_RULE = (
    f"the rooms claim must be a list of at most {MAX_ROOMS} room names (each matching "
    f"{ROOM_NAME.pattern})"
)
#: A ``name`` claim the token does not carry (an explicit ``null`` is carried, and refused).
_ABSENT = object()


def _identity(sub: object, name: object, rooms: object) -> tuple[str, str, frozenset[str]]:
    """The user id, display name and rooms of a token's claims, checked by the one set of
    rules the verifier and :func:`mint_token` share (``name`` is :data:`_ABSENT` when the
    token has none: then :func:`default_name`).

    Raises:
        ValueError: with what is wrong, for people.
    """
    if not isinstance(sub, str) or not _text_ok(sub, MAX_SUB_CHARS):
        raise ValueError(_SUB_RULE)
    if name is _ABSENT:
        name = default_name(sub)
    elif not isinstance(name, str) or not _name_ok(name):
        raise ValueError(_NAME_RULE)
    if not isinstance(rooms, list) or not _rooms_ok(rooms):
        raise ValueError(_ROOMS_RULE)
    return sub, name, frozenset(rooms)


def _rooms_ok(rooms: object) -> bool:
    return (
        isinstance(rooms, list) and len(rooms) <= MAX_ROOMS and all(is_room_name(r) for r in rooms)
    )


def _numeric_date(payload: dict[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _claims_error(f"the {claim} claim must be a number (RFC 7519 section 2)")
    if not 0 <= value <= _MAX_NUMERIC_DATE:  # also NaN and infinity (json accepts both)
        raise _claims_error(f"the {claim} claim is out of range")
    return float(value)


def _type_allowed(typ: object) -> bool:
    return isinstance(typ, str) and typ.lower().removeprefix("application/") in _ALLOWED_TYPES


def _algorithms_for_key(key: object, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"the RSA public key has {key.key_size} bits; at least 2048 needed")
        family = ("RS256",)
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        family = ("ES256",)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        family = ("EdDSA",)
    else:
        raise ValueError("the public key must be RSA, EC P-256 or Ed25519")
    algorithms = tuple(a for a in allowed if a in family)
    if not algorithms:
        raise ValueError(f"the public key fits {family[0]}, which GATEWAY_JWT_ALGORITHMS omits")
    return algorithms


async def _jwks_key(cache: JwksCache, kid: object) -> jwt.PyJWK:
    if not isinstance(kid, str) or not 1 <= len(kid) <= 256:
        raise AuthError("unknown_key", "the token names no key of the key set (kid)")
    try:
        return await cache.key(kid)
    except KeyError:
        raise AuthError("unknown_key", "the token names no key of the key set (kid)") from None
    except JwksError:
        raise AuthError("jwks_unavailable", "the key set cannot be fetched or used") from None


class TokenVerifier:
    """Verifies bearer JWTs against the configured key (RFC 7519 section 7.2, RFC 8725).

    Args:
        settings: the key source, allow-list, audience, issuer, leeway and exp policy.
        clock: unix seconds now; tests pass a fake one.

    Raises:
        ValueError: when the settings name no usable key, or mix HMAC and public-key algorithms.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._jwks: JwksCache | None = None
        self._key: Any = None
        if settings.secret_algorithms and settings.public_key_algorithms:
            raise ValueError("GATEWAY_JWT_ALGORITHMS mixes HS256 with public-key algorithms")
        if settings.public_key_algorithms and settings.jwt_jwks_url is not None:
            self._algorithms = settings.public_key_algorithms
            self._jwks = JwksCache(
                settings.jwt_jwks_url,
                fresh_seconds=settings.jwt_jwks_cache_seconds,
                max_stale_seconds=settings.jwt_jwks_max_stale_seconds,
                allowed_hosts=settings.jwt_jwks_allowed_hosts,
            )
        elif settings.public_key_algorithms and settings.jwt_public_key_file is not None:
            self._key = load_pem_public_key(settings.jwt_public_key_file.read_bytes())
            self._algorithms = _algorithms_for_key(self._key, settings.public_key_algorithms)
        elif settings.secret_algorithms and settings.jwt_secret is not None:
            self._key = settings.jwt_secret.get()
            self._algorithms = settings.secret_algorithms
        else:
            raise ValueError("no JWT key configured for the allowed algorithms")
        require = ["sub", "exp"] if settings.jwt_require_exp else ["sub"]
        self._options: Options = {
            "require": require,
            "verify_exp": False,  # checked below against the injected clock
            "verify_nbf": False,
            "verify_iat": False,
            "enforce_minimum_key_length": self._jwks is not None,
        }

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` and return who it names.

        Raises:
            AuthError: ``malformed``, ``disallowed_algorithm``, ``disallowed_header``,
                ``disallowed_type``, ``unknown_key``, ``jwks_unavailable``, ``bad_signature``,
                ``expired``, ``not_yet_valid``, ``invalid_audience``, ``invalid_issuer``,
                ``missing_claim``, ``invalid_claims`` or ``invalid_token``.
        """
        if len(token) > MAX_TOKEN_CHARS or not _COMPACT_JWS.fullmatch(token):
            raise AuthError("malformed", "the token is not a compact JWS (RFC 7515 section 7.1)")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, RecursionError):
            raise AuthError("malformed", "the token header cannot be decoded") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("disallowed_algorithm", "the token's algorithm is not allowed")
        if any(name in header for name in _DISALLOWED_HEADERS):
            raise AuthError("disallowed_header", "the token names its own key or extensions")
        if "typ" in header and not _type_allowed(header["typ"]):
            raise AuthError("disallowed_type", "the token's type (typ) is not JWT or at+jwt")
        key = self._key
        if self._jwks is not None:
            key = await _jwks_key(self._jwks, header.get("kid"))
        s = self._settings
        try:
            payload = jwt.decode(
                token,
                key,
                list(self._algorithms),
                self._options,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"the token lacks the {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            reason, detail = next((r, d) for t, r, d in _DECODE_ERRORS if isinstance(exc, t))
            raise AuthError(reason, detail) from None
        return self._principal(payload)

    def _principal(self, payload: dict[str, Any]) -> Principal:
        now = self._clock()
        leeway = self._settings.jwt_leeway_seconds
        exp = _numeric_date(payload, "exp")
        nbf = _numeric_date(payload, "nbf")
        iat = _numeric_date(payload, "iat")
        if exp is not None and exp <= now - leeway:  # RFC 7519 section 4.1.4
            raise AuthError("expired", "the token has expired")
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise AuthError("not_yet_valid", "the token is not valid yet (nbf or iat)")
        try:
            sub, name, rooms = _identity(
                payload["sub"], payload.get("name", _ABSENT), payload.get("rooms", [])
            )
        except ValueError as error:
            raise _claims_error(str(error)) from None
        return Principal(user_id=sub, name=name, rooms=rooms, expires_at=exp)


def extract_token(authorization: str | None, query_string: bytes | str) -> str:
    """Find the bearer token of an upgrade request (RFC 6750 sections 2.1 and 2.3).

    Args:
        authorization: the ``Authorization`` header, if any; the scheme is case-insensitive.
        query_string: the raw query string, which may carry one ``access_token``.

    Raises:
        AuthError: ``missing`` when there is none; ``malformed`` when there are several (RFC 6750
            section 2: exactly one method), or the token is empty, too long or not a b64token.
    """
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    try:
        params = parse_qsl(query_string, keep_blank_values=True, max_num_fields=100)
    except ValueError:
        raise AuthError("malformed", "the query string has too many parameters") from None
    found = [value for name, value in params if name == "access_token"]
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            found.append(credentials.strip())
    if not found:
        raise AuthError("missing", "send a token: Authorization: Bearer <token> or ?access_token=")
    if len(found) > 1:
        raise AuthError("malformed", "send the token once, in the header or the query string")
    token = found[0]
    if len(token) > MAX_TOKEN_CHARS or not _B64TOKEN.fullmatch(token):
        raise AuthError(
            "malformed", "the bearer token is empty, too long or has invalid characters"
        )
    return token


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    if not _ORIGIN_CHARS.fullmatch(origin):
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:  # a bad IPv6 literal or port
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password:
        return None
    if parts.path or parts.query or parts.fragment or "?" in origin or "#" in origin:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def origin_allowed(origin: str | None, settings: Settings) -> bool:
    """Whether a browser on ``origin`` may connect (RFC 6455 section 10.2, RFC 6454 section 7).

    Args:
        origin: the ``Origin`` header; None when the client is not a browser.
        settings: the allow-list, the missing-origin policy and the mode.
    """
    if origin is None:
        return settings.allow_missing_origin
    key = _origin_key(origin)  # "null" (an opaque origin) has no scheme, so never passes
    if key is None:
        return False
    if not settings.allowed_origins:
        return not settings.is_production and key[1] in _LOCAL_HOSTS
    return key in {_origin_key(allowed) for allowed in settings.allowed_origins}


def mint_token(
    settings: Settings,
    *,
    sub: str,
    name: str | None = None,
    rooms: Iterable[str] = (),
    ttl_seconds: float = 3600,
    now: float | None = None,
) -> str:
    """Issue an HS256 token the verifier accepts (for development and tests): its claims pass
    the verifier's own checks, so it refuses exactly the ``sub``, ``name`` and ``rooms`` the
    verifier would. Without ``name``, the token carries none, and the verifier gives the user
    :func:`default_name` of ``sub``.

    Raises:
        ValueError: when HS256 is not allowed or no secret is set, or a claim would be invalid.
    """
    if settings.jwt_secret is None or "HS256" not in settings.secret_algorithms:
        raise ValueError("mint_token needs HS256 in GATEWAY_JWT_ALGORITHMS and GATEWAY_JWT_SECRET")
    if isinstance(rooms, str):
        raise ValueError("rooms must be a list of room names, not one string")
    room_list = sorted(set(rooms))
    _identity(sub, _ABSENT if name is None else name, room_list)
    if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
        raise ValueError("ttl_seconds must be a positive number")
    issued_at = int(time.time() if now is None else now)
    if issued_at + ttl_seconds > _MAX_NUMERIC_DATE:
        raise ValueError(
            f"ttl_seconds is too large: the token would expire after what the verifier accepts "
            f"(at most {int(_MAX_NUMERIC_DATE - issued_at)} seconds from now)"
        )
    claims: dict[str, Any] = {"sub": sub, "rooms": room_list, "iat": issued_at}
    claims["exp"] = issued_at + max(1, int(ttl_seconds))
    if name is not None:
        claims["name"] = name
    if settings.jwt_audience is not None:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer is not None:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret.get(), algorithm="HS256")
