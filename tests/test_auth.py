"""Tests for gateway.auth: the JWT attack matrix, bearer extraction, origins, minting.

Every key is generated here by ``cryptography``; none is committed. The JWKS endpoint is a real
HTTP server on 127.0.0.1, port 0, in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.auth import (
    FALLBACK_NAME,
    MAX_TOKEN_CHARS,
    Principal,
    TokenVerifier,
    default_name,
    extract_token,
    mint_token,
    origin_allowed,
)
from gateway.errors import AuthError
from gateway.settings import Secret, Settings, load_settings

SECRET = "test-secret-" + "0123456789abcdef" * 4  # 75 bytes: long enough for HS384 too
NOW = 1_700_000_000.0
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hs_settings(**env: str) -> Settings:
    return load_settings({"GATEWAY_JWT_SECRET": SECRET, **env})


def claims(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"sub": "alice", "exp": NOW + 600, "iat": NOW - 5}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: Mapping[str, object], payload: object, hmac_key: bytes | None = None) -> str:
    """A compact JWS built by hand, so it can carry what PyJWT refuses to produce."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(raw)}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def hs_token(payload: dict[str, object], **headers: object) -> str:
    return forge({"alg": "HS256", "typ": "JWT", **headers}, payload, SECRET.encode())


async def rejected(verifier: TokenVerifier, token: str) -> AuthError:
    """Verify must fail with AuthError, and say nothing of the token."""
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    err = info.value
    assert err.status == 401
    for text in (str(err), err.detail, repr(err.args)):
        if token:
            assert token not in text
        for segment in token.split("."):
            if len(segment) >= 8:
                assert segment not in text
    return err


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(hs_settings(), clock=FakeClock())


# --- keys ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def pk_settings(tmp_path: Path, key: PrivateKey, algorithms: str | None = None) -> Settings:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(public_pem(key))
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_JWT_PUBLIC_KEY_FILE": str(path)}
    if algorithms is not None:
        env["GATEWAY_JWT_ALGORITHMS"] = algorithms
    return load_settings(env)


# --- HS256: the happy path and the claims --------------------------------------------------


async def test_valid_token_gives_principal(verifier: TokenVerifier) -> None:
    token = hs_token(claims(name="Alice", rooms=["lobby", "dev:ops", "lobby"]))
    principal = await verifier.verify(token)
    assert principal == Principal(
        user_id="alice", name="Alice", rooms=frozenset({"lobby", "dev:ops"}), expires_at=NOW + 600
    )


async def test_name_defaults_to_sub_and_rooms_to_empty(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(hs_token(claims()))
    assert (principal.name, principal.rooms) == ("alice", frozenset())


@pytest.mark.parametrize(
    ("sub", "name"),
    [
        # A sub longer than a name may be: its first 64 characters (it was refused, for the
        # name claim it does not carry).
        ("s" * 65, "s" * 64),
        ("u" * 128, "u" * 64),
        ("\U0001f600" * 100, "\U0001f600" * 64),  # characters, not bytes or UTF-16 units
        # A joiner the cut leaves at the end joins nothing: it goes too.
        ("a" * 63 + "\u200d" + "b" * 10, "a" * 63),
        ("a" * 62 + "\u200c\u200d" + "b" * 10, "a" * 62),
        # Past the cut, anything: the name does not hold it.
        ("a" * 64 + "\u202e" + "b", "a" * 64),
        # A sub that cannot be a name (it is a user id: any text): the fixed default.
        ("\u202eecila", FALLBACK_NAME),  # a right-to-left override
        ("ali\u200bce", FALLBACK_NAME),  # a zero-width space
        ("\u2066" + "a" * 70, FALLBACK_NAME),  # in the first 64
        (" " * 64 + "x", FALLBACK_NAME),  # cut to blanks
    ],
)
async def test_without_a_name_claim_the_name_comes_from_the_sub_and_always_verifies(
    verifier: TokenVerifier, sub: str, name: str
) -> None:
    principal = await verifier.verify(hs_token(claims(sub=sub)))
    assert (principal.user_id, principal.name) == (sub, name)
    assert default_name(sub) == name
    # The name given is one the verifier accepts as a name claim too.
    assert (await verifier.verify(hs_token(claims(sub="u", name=name)))).name == name
    # gateway token mints the same: nothing the server accepts is refused there.
    minted = await verifier.verify(mint_token(hs_settings(), sub=sub, now=NOW))
    assert minted.name == name


#: Any text a JSON string can hold: every code point, lone surrogates included.
any_text = st.text(st.characters(exclude_categories=()), max_size=140)


@given(sub=any_text | st.just("s" * 200), name=st.none() | any_text)
@settings(max_examples=600, deadline=None)
def test_mint_refuses_exactly_what_the_verifier_refuses(sub: str, name: str | None) -> None:
    verifier = TokenVerifier(hs_settings(), clock=FakeClock())
    token = hs_token(claims(sub=sub, **({} if name is None else {"name": name})))
    try:
        principal: Principal | None = asyncio.run(verifier.verify(token))
    except AuthError as error:
        assert error.reason == "invalid_claims"
        principal = None
    try:
        minted = mint_token(hs_settings(), sub=sub, name=name, now=NOW)
    except ValueError:
        assert principal is None, "gateway token refused what the server accepts"
        return
    assert principal is not None, "gateway token made a token the server refuses"
    again = asyncio.run(verifier.verify(minted))
    assert (again.user_id, again.name, again.rooms) == (sub, principal.name, principal.rooms)
    # What the server accepts, it can send: every frame naming this user encodes.
    assert principal.name == (default_name(sub) if name is None else name)
    assert principal.name and len(principal.name) <= 64 and len(principal.user_id) <= 128
    orjson.dumps({"id": principal.user_id, "name": principal.name})
    if name is None:  # the default name is itself a valid name claim
        asyncio.run(verifier.verify(hs_token(claims(sub="u", name=principal.name))))


async def test_boundary_sizes_pass(verifier: TokenVerifier) -> None:
    rooms = [f"r{i}" for i in range(99)] + ["x" * 64]
    principal = await verifier.verify(hs_token(claims(sub="s" * 128, name="n" * 64, rooms=rooms)))
    assert len(principal.user_id) == 128 and len(principal.rooms) == 100


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signed", [False, True])
async def test_alg_none_is_rejected(verifier: TokenVerifier, alg: str, signed: bool) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), SECRET.encode() if signed else None)
    assert (await rejected(verifier, token)).reason == "disallowed_algorithm"


@pytest.mark.parametrize("header", [{}, {"alg": ["HS256"]}, {"alg": "HS512"}, {"alg": "hs256"}])
async def test_missing_or_unlisted_alg_is_rejected(
    verifier: TokenVerifier, header: dict[str, object]
) -> None:
    token = forge({"typ": "JWT", **header}, claims(), SECRET.encode())
    assert (await rejected(verifier, token)).reason == "disallowed_algorithm"


async def test_hs384_signed_with_the_secret_is_rejected(verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS384")
    assert (await rejected(verifier, token)).reason == "disallowed_algorithm"


@pytest.mark.parametrize(
    "headers",
    [
        {"jwk": {"kty": "oct", "k": b64url(b"k" * 32)}},
        {"jku": "https://evil.example/jwks.json"},
        {"x5u": "https://evil.example/cert.pem"},
        {"x5c": ["MIIB"]},
        {"crit": ["b64"], "b64": True},  # RFC 7515 4.1.11: we understand no extension
    ],
)
async def test_key_carrying_headers_are_rejected(
    verifier: TokenVerifier, headers: dict[str, object]
) -> None:
    token = hs_token(claims(), **headers)
    assert (await rejected(verifier, token)).reason == "disallowed_header"


@pytest.mark.parametrize(
    "typ",
    ["JWT", "jwt", "application/jwt", "Application/JWT", "at+jwt", "AT+JWT", "application/at+jwt"],
)
async def test_access_token_types_pass(verifier: TokenVerifier, typ: str) -> None:
    # RFC 7519 section 5.1 and RFC 9068 section 2.1; media types are case-insensitive, and
    # RFC 7515 section 4.1.9 lets "application/" be left out.
    assert (await verifier.verify(hs_token(claims(), typ=typ))).user_id == "alice"


async def test_a_token_without_typ_passes(verifier: TokenVerifier) -> None:
    token = forge({"alg": "HS256"}, claims(), SECRET.encode())
    assert (await verifier.verify(token)).user_id == "alice"


@pytest.mark.parametrize(
    "typ",
    [
        "reset+jwt",  # a password-reset token of the same issuer, signed with the same secret
        "logout+jwt",  # OpenID Connect back-channel logout
        "secevent+jwt",  # RFC 8417
        "JOSE",
        "application/jose",
        "application/application/jwt",
        "jwt ",
        "",
        None,
        7,
        ["JWT"],
    ],
)
async def test_other_token_types_are_rejected(verifier: TokenVerifier, typ: object) -> None:
    # RFC 8725 section 3.11: a valid signature on a token of another kind is not a login.
    err = await rejected(verifier, hs_token(claims(), typ=typ))
    assert err.reason == "disallowed_type"
    assert "typ" in err.detail


@pytest.mark.parametrize("headers", [{"crit": ["exp"]}, {"crit": "b64"}, {"kid": 7}])
async def test_invalid_header_parameters_are_malformed(
    verifier: TokenVerifier, headers: dict[str, object]
) -> None:
    assert (await rejected(verifier, hs_token(claims(), **headers))).reason == "malformed"


async def test_tampered_signature_is_rejected(verifier: TokenVerifier) -> None:
    token = hs_token(claims())
    head, body, sig = token.split(".")
    middle = len(sig) // 2
    flipped = sig[:middle] + ("A" if sig[middle] != "A" else "B") + sig[middle + 1 :]
    for bad in (f"{head}.{body}.{flipped}", f"{head}.{body}.", f"{head}.{body}.{sig[:-4]}"):
        assert (await rejected(verifier, bad)).reason in {"bad_signature", "malformed"}
    assert (await rejected(verifier, f"{head}.{body}.{flipped}")).reason == "bad_signature"


async def test_tampered_payload_is_rejected(verifier: TokenVerifier) -> None:
    head, _, sig = hs_token(claims()).split(".")
    body = b64url(json.dumps(claims(sub="admin", rooms=["admin"])).encode())
    assert (await rejected(verifier, f"{head}.{body}.{sig}")).reason == "bad_signature"


async def test_other_secret_is_rejected(verifier: TokenVerifier) -> None:
    token = forge({"alg": "HS256"}, claims(), b"another-secret-of-sufficient-length-0123456789")
    assert (await rejected(verifier, token)).reason == "bad_signature"


async def test_expired_token() -> None:
    verifier = TokenVerifier(hs_settings(), clock=FakeClock())
    err = await rejected(verifier, hs_token(claims(exp=NOW - 11)))  # leeway is 10 s
    assert err.reason == "expired" and "expired" in err.detail


async def test_leeway_is_honoured() -> None:
    verifier = TokenVerifier(hs_settings(GATEWAY_JWT_LEEWAY_SECONDS="10"), clock=FakeClock())
    assert (await verifier.verify(hs_token(claims(exp=NOW - 9)))).expires_at == NOW - 9
    assert (await rejected(verifier, hs_token(claims(exp=NOW - 10)))).reason == "expired"
    strict = TokenVerifier(hs_settings(GATEWAY_JWT_LEEWAY_SECONDS="0"), clock=FakeClock())
    assert (await rejected(strict, hs_token(claims(exp=NOW - 1)))).reason == "expired"


async def test_fake_clock_makes_a_token_expire() -> None:
    clock = FakeClock()
    verifier = TokenVerifier(hs_settings(), clock=clock)
    token = hs_token(claims(exp=NOW + 60))
    await verifier.verify(token)
    clock.now += 71
    assert (await rejected(verifier, token)).reason == "expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_yet_valid(verifier: TokenVerifier, claim: str) -> None:
    assert (await verifier.verify(hs_token(claims(**{claim: NOW + 9})))).user_id == "alice"
    err = await rejected(verifier, hs_token(claims(**{claim: NOW + 60})))
    assert err.reason == "not_yet_valid"


async def test_audience_and_issuer_when_configured() -> None:
    settings = hs_settings(GATEWAY_JWT_AUDIENCE="chat", GATEWAY_JWT_ISSUER="https://idp.example")
    verifier = TokenVerifier(settings, clock=FakeClock())
    good = claims(aud="chat", iss="https://idp.example")
    assert (await verifier.verify(hs_token(good))).user_id == "alice"
    assert (await verifier.verify(hs_token({**good, "aud": ["other", "chat"]}))).name == "alice"
    cases = [
        ({**good, "aud": "other"}, "invalid_audience"),
        ({**good, "aud": ["chatx"]}, "invalid_audience"),
        ({**good, "iss": "https://evil.example"}, "invalid_issuer"),
        ({**good, "iss": ["https://idp.example"]}, "invalid_issuer"),
        (claims(iss="https://idp.example"), "missing_claim"),
        (claims(aud="chat"), "missing_claim"),
    ]
    for payload, reason in cases:
        assert (await rejected(verifier, hs_token(payload))).reason == reason


async def test_audience_present_but_not_configured(verifier: TokenVerifier) -> None:
    # RFC 7519 section 4.1.3: a token meant for someone else is not for us.
    assert (await rejected(verifier, hs_token(claims(aud="elsewhere")))).reason == (
        "invalid_audience"
    )


@pytest.mark.parametrize("missing", ["sub", "exp"])
async def test_missing_required_claim(verifier: TokenVerifier, missing: str) -> None:
    err = await rejected(verifier, hs_token(claims(**{missing: ...})))
    assert err.reason == "missing_claim" and missing in err.detail
    err = await rejected(verifier, hs_token(claims(**{missing: None})))
    assert err.reason == "missing_claim"


async def test_exp_optional_when_configured() -> None:
    verifier = TokenVerifier(hs_settings(GATEWAY_JWT_REQUIRE_EXP="false"), clock=FakeClock())
    assert (await verifier.verify(hs_token(claims(exp=...)))).expires_at is None
    assert (await rejected(verifier, hs_token(claims(exp=NOW - 60)))).reason == "expired"
    assert (await rejected(verifier, hs_token(claims(sub=...)))).reason == "missing_claim"


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": 42},
        {"sub": ["alice"]},
        {"sub": ""},
        {"sub": "   "},
        {"sub": "s" * 129},
        {"sub": "alice\nadmin"},
        {"sub": "\ud800"},  # a lone surrogate: no UTF-8 holds it, no frame could carry it
        {"sub": "alice\udfff"},
        {"name": 42},
        {"name": ""},
        {"name": "n" * 65},
        {"name": None},
        {"name": "Eve\x00"},
        {"name": "\u202eecila"},  # a right-to-left override: shows as "alice"
        {"name": "ali\u200bce"},  # a zero-width space: looks like "alice"
        {"name": "\u2066alice\u2069"},  # an isolate
        {"name": "\ufeffalice"},  # a byte order mark
        {"name": "alice\u200e"},  # a left-to-right mark
        {"name": "Ev\udc00e"},  # a lone surrogate
        {"rooms": "lobby"},
        {"rooms": None},
        {"rooms": {"lobby": True}},
        {"rooms": ["lobby", 1]},
        {"rooms": ["bad room"]},
        {"rooms": ["lobby\n"]},
        {"rooms": [""]},
        {"rooms": ["x" * 65]},
        {"rooms": [f"r{i}" for i in range(101)]},
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"exp": 10**20},
        {"exp": -1},
        {"nbf": "soon"},
        {"iat": [1]},
        {"jti": 5},
    ],
)
async def test_invalid_claims(verifier: TokenVerifier, changes: dict[str, object]) -> None:
    assert (await rejected(verifier, hs_token(claims(**changes)))).reason == "invalid_claims"


@pytest.mark.parametrize(
    "name",
    [
        "\u0645\u0647\u200c\u0633\u0627",  # Persian, with the zero-width non-joiner it needs
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # an emoji family, joined by ZWJ
        "\u05d3\u05d5\u05d3",  # Hebrew, right to left by itself: no override needed
        "Zoë",
    ],
)
async def test_names_of_every_script_pass(verifier: TokenVerifier, name: str) -> None:
    assert (await verifier.verify(hs_token(claims(name=name)))).name == name
    mint_token(hs_settings(), sub="u", name=name)


def _deep_header(depth: int) -> str:
    return f"{b64url(b'[' * depth + b']' * depth)}.{b64url(b'{}')}.c2ln"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "...",
        "a..c",
        "x.y.z",
        "a b.c.d",
        "é.é.é",
        "eyJhbGciOiJIUzI1NiJ9.e30.c2ln.e30.c2ln",  # JWE-shaped: five parts
        f"{b64url(b'not json')}.e30.c2ln",
        f"{b64url(b'[1]')}.e30.c2ln",
        "a" * (MAX_TOKEN_CHARS + 1),
        _deep_header(2400),
    ],
)
async def test_malformed(verifier: TokenVerifier, token: str) -> None:
    assert (await rejected(verifier, token)).reason == "malformed"


async def test_huge_well_formed_token_is_malformed(verifier: TokenVerifier) -> None:
    token = hs_token(claims(name="x" * 64, pad="p" * MAX_TOKEN_CHARS))
    assert (await rejected(verifier, token)).reason == "malformed"


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"alice"'])
async def test_signed_non_object_payload_is_malformed(
    verifier: TokenVerifier, payload: bytes
) -> None:
    token = forge({"alg": "HS256"}, payload, SECRET.encode())
    assert (await rejected(verifier, token)).reason == "malformed"


# --- public keys: RS256, ES256, EdDSA -------------------------------------------------------


@pytest.mark.parametrize(
    ("key_name", "alg"), [("rsa_key", "RS256"), ("ec_key", "ES256"), ("ed_key", "EdDSA")]
)
async def test_public_key_algorithms(
    request: pytest.FixtureRequest, tmp_path: Path, key_name: str, alg: str
) -> None:
    key: PrivateKey = request.getfixturevalue(key_name)
    verifier = TokenVerifier(pk_settings(tmp_path, key), clock=FakeClock())
    principal = await verifier.verify(jwt.encode(claims(rooms=["a"]), key, algorithm=alg))
    assert principal.rooms == frozenset({"a"})
    # The same algorithm with another key of the same type fails the signature check.
    makers: dict[str, Callable[[], PrivateKey]] = {
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }
    other = makers[alg]()
    token = jwt.encode(claims(), other, algorithm=alg)
    assert (await rejected(verifier, token)).reason == "bad_signature"
    # The key is bound to its own algorithm, even with all three allowed (the default).
    for other_alg, other_name in (("RS256", "rsa_key"), ("ES256", "ec_key"), ("EdDSA", "ed_key")):
        if other_alg != alg:
            signer: PrivateKey = request.getfixturevalue(other_name)
            token = jwt.encode(claims(), signer, algorithm=other_alg)
            assert (await rejected(verifier, token)).reason == "disallowed_algorithm"


async def test_hs_rs_confusion_fails(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(pk_settings(tmp_path, rsa_key, "RS256"), clock=FakeClock())
    pem = public_pem(rsa_key)
    confused = forge({"alg": "HS256", "typ": "JWT"}, claims(sub="admin"), pem)
    assert (await rejected(verifier, confused)).reason == "disallowed_algorithm"
    disguised = forge({"alg": "RS256", "typ": "JWT"}, claims(sub="admin"), pem)
    assert (await rejected(verifier, disguised)).reason == "bad_signature"


async def test_public_key_settings_reject_secret_tokens(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = TokenVerifier(pk_settings(tmp_path, ec_key), clock=FakeClock())
    assert (await rejected(verifier, hs_token(claims()))).reason == "disallowed_algorithm"


def test_key_type_outside_the_allow_list_fails_at_start(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(ValueError, match="RS256"):
        TokenVerifier(pk_settings(tmp_path, rsa_key, "ES256"))


def test_short_rsa_key_fails_at_start(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (the point)
    with pytest.raises(ValueError, match="2048"):
        TokenVerifier(pk_settings(tmp_path, weak, "RS256"))


def test_unusable_settings_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixes"):
        TokenVerifier(
            Settings(
                jwt_secret=Secret(SECRET),
                jwt_public_key_file=tmp_path / "k.pem",
                jwt_algorithms=("HS256", "RS256"),
            )
        )
    with pytest.raises(ValueError, match="no JWT key"):
        TokenVerifier(Settings(jwt_secret=None, jwt_algorithms=("HS256",)))


# --- JWKS over real HTTP --------------------------------------------------------------------


class JwksServer(HTTPServer):
    body: bytes = b'{"keys": []}'
    status: int = 200
    requests: int = 0
    hold: threading.Event | None = None
    arrived = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/.well-known/jwks.json"


class JwksHandler(BaseHTTPRequestHandler):
    server: JwksServer

    def do_GET(self) -> None:
        self.server.requests += 1
        self.server.arrived.set()
        if self.server.hold is not None:
            self.server.hold.wait(10)
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        text = RSAAlgorithm.to_jwk(public)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        text = ECAlgorithm.to_jwk(public)
    else:
        text = OKPAlgorithm.to_jwk(public)
    data: dict[str, Any] = json.loads(text) if isinstance(text, str) else dict(text)
    return {**data, "kid": kid, "use": "sig"}


@pytest.fixture
def jwks(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> Iterator[JwksServer]:
    server = JwksServer(("127.0.0.1", 0), JwksHandler)
    server.arrived = threading.Event()
    keys = [jwk(rsa_key, "rsa-1"), jwk(ec_key, "ec-1"), jwk(ed_key, "ed-1")]
    keys.append({"kty": "oct", "kid": "oct-1", "k": b64url(SECRET.encode())})
    server.body = json.dumps({"keys": keys}).encode()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def jwks_verifier(url: str) -> TokenVerifier:
    settings = load_settings({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_JWT_JWKS_URL": url})
    return TokenVerifier(settings, clock=FakeClock())


async def test_jwks_all_algorithms_and_one_fetch(
    jwks: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    verifier = jwks_verifier(jwks.url)
    signers: list[tuple[PrivateKey, str, str]] = [
        (rsa_key, "RS256", "rsa-1"),
        (ec_key, "ES256", "ec-1"),
        (ed_key, "EdDSA", "ed-1"),
    ]
    for key, alg, kid in signers:
        token = jwt.encode(claims(sub=kid), key, algorithm=alg, headers={"kid": kid})
        assert (await verifier.verify(token)).user_id == kid
        assert (await verifier.verify(token)).user_id == kid
    assert jwks.requests == 1


async def test_jwks_unknown_kid_is_rejected_without_fetch_storm(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = jwks_verifier(jwks.url)
    for kid in ("nope-1", "nope-2", "nope-3"):
        token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": kid})
        assert (await rejected(verifier, token)).reason == "unknown_key"
    assert jwks.requests == 1


async def test_jwks_token_without_kid_is_rejected_without_fetch(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = jwks_verifier(jwks.url)
    for headers in ({}, {"kid": ""}, {"kid": "k" * 257}):
        token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers=headers)
        assert (await rejected(verifier, token)).reason == "unknown_key"
    not_a_string = forge({"alg": "RS256", "kid": ["rsa-1"]}, claims())
    assert (await rejected(verifier, not_a_string)).reason == "malformed"
    assert jwks.requests == 0


async def test_jwks_is_not_fetched_for_rejected_headers(jwks: JwksServer) -> None:
    verifier = jwks_verifier(jwks.url)
    for header in (
        {"alg": "none", "kid": "rsa-1"},
        {"alg": "HS256", "kid": "oct-1"},
        {"alg": "RS256", "kid": "rsa-1", "jku": jwks.url},
    ):
        await rejected(verifier, forge(header, claims(), SECRET.encode()))
    assert jwks.requests == 0


async def test_jwks_key_is_bound_to_its_algorithm(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = jwks_verifier(jwks.url)
    wrong_key = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert (await rejected(verifier, wrong_key)).reason == "disallowed_algorithm"
    hmac_with_oct = hs_token(claims(), kid="oct-1")
    assert (await rejected(verifier, hmac_with_oct)).reason == "disallowed_algorithm"
    rs_header_oct_key = forge({"alg": "RS256", "kid": "oct-1"}, claims(), SECRET.encode())
    assert (await rejected(verifier, rs_header_oct_key)).reason == "disallowed_algorithm"


async def test_jwks_unreachable(rsa_key: rsa.RSAPrivateKey) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = jwks_verifier(f"http://127.0.0.1:{port}/jwks.json")
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await rejected(verifier, token)).reason == "jwks_unavailable"


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b"{}"), (200, b"<html>not json</html>"), (200, b"[]"), (200, b'{"keys": 3}')],
)
async def test_jwks_broken_endpoint(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, status: int, body: bytes
) -> None:
    jwks.status, jwks.body = status, body
    verifier = jwks_verifier(jwks.url)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await rejected(verifier, token)).reason in {"jwks_unavailable", "unknown_key"}


async def test_jwks_fetch_runs_off_the_event_loop(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.hold = threading.Event()
    verifier = jwks_verifier(jwks.url)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    task = asyncio.create_task(verifier.verify(token))
    # The server holds the response; a fetch on the loop would block it until the hold expires.
    assert await asyncio.to_thread(jwks.arrived.wait, 10)
    assert not task.done()
    jwks.hold.set()
    assert (await task).user_id == "alice"


# --- extract_token (RFC 6750 section 2) -----------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_extract_from_header(scheme: str) -> None:
    assert extract_token(f"{scheme} abc.DEF-_~+/=", b"") == "abc.DEF-_~+/="


def test_extract_from_query() -> None:
    assert extract_token(None, b"room=x&access_token=a.b.c") == "a.b.c"
    assert extract_token(None, "access_token=a%2Eb.c&z=1") == "a.b.c"
    assert extract_token("Basic dXNlcjpwYXNz", b"access_token=a.b.c") == "a.b.c"


@pytest.mark.parametrize(
    ("authorization", "query"),
    [
        ("Bearer a.b.c", b"access_token=a.b.c"),
        ("Bearer a.b.c", b"access_token="),
        (None, b"access_token=a.b.c&access_token=d.e.f"),
        (None, b"access_token="),
        ("Bearer", b""),
        ("Bearer ", b""),
        ("Bearer a.b c", b""),
        ("Bearer a\nb", b""),
        ("Bearer " + "a" * (MAX_TOKEN_CHARS + 1), b""),
        (None, b"access_token=" + b"a" * (MAX_TOKEN_CHARS + 1)),
        (None, b"access_token=a%00b"),
        (None, "access_token=é.b.c"),
        (None, b"&".join(b"x=%d" % i for i in range(200))),
    ],
)
def test_extract_malformed(authorization: str | None, query: bytes | str) -> None:
    with pytest.raises(AuthError) as info:
        extract_token(authorization, query)
    assert info.value.reason == "malformed"
    assert "a.b.c" not in str(info.value)


@pytest.mark.parametrize(
    ("authorization", "query"), [(None, b""), (None, "room=lobby"), ("Basic dXNlcjpwYXNz", b"")]
)
def test_extract_missing(authorization: str | None, query: bytes | str) -> None:
    with pytest.raises(AuthError) as info:
        extract_token(authorization, query)
    assert info.value.reason == "missing"
    assert info.value.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


# --- origin_allowed (RFC 6454, RFC 6455 section 10.2) --------------------------------------


def prod_settings(origins: str) -> Settings:
    return Settings(env="production", allowed_origins=tuple(origins.split(",")))


@pytest.mark.parametrize(
    "origin",
    [
        "https://chat.example.com",
        "HTTPS://Chat.Example.COM",
        "https://chat.example.com:443",
        "http://localhost:8080",
    ],
)
def test_origin_allowed(origin: str) -> None:
    settings = prod_settings("https://chat.example.com,http://localhost:8080")
    assert origin_allowed(origin, settings)


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "",
        "https://chat.example.com/",
        "https://chat.example.com/path",
        "https://chat.example.com?x",
        "https://chat.example.com#x",
        "http://chat.example.com",
        "https://chat.example.com:8443",
        "https://chat.example.com:80",
        "https://chat.example.com.evil.com",
        "https://evil.com/https://chat.example.com",
        "https://evilchat.example.com",
        "https://chat.example.com@evil.com",
        "https://user@chat.example.com",
        "https://chat.example.co",
        "https://chat.exa\tmple.com",
        "https://chat.example.com\n",
        " https://chat.example.com",
        "https://[::1",
        "https://chat.example.com:99999",
        "wss://chat.example.com",
        "chat.example.com",
        "//chat.example.com",
        "http://localhost:3001",
    ],
)
def test_origin_refused(origin: str) -> None:
    assert not origin_allowed(origin, prod_settings("https://chat.example.com"))


def test_default_ports_normalise_in_the_allow_list() -> None:
    settings = prod_settings("https://chat.example.com:443,http://intra.example:80")
    assert origin_allowed("https://chat.example.com", settings)
    assert origin_allowed("http://intra.example", settings)
    assert not origin_allowed("https://intra.example", settings)


def test_missing_origin_follows_settings() -> None:
    assert origin_allowed(None, Settings(allow_missing_origin=True))
    assert not origin_allowed(None, Settings(allow_missing_origin=False))


@pytest.mark.parametrize(
    "origin",
    ["http://localhost:3001", "https://127.0.0.1:9", "http://[::1]:3001", "http://localhost"],
)
def test_development_allows_localhost_only(origin: str) -> None:
    assert origin_allowed(origin, Settings(env="development"))
    assert not origin_allowed(origin, Settings(env="production"))
    # An explicit allow-list replaces the localhost rule, in development too.
    assert not origin_allowed(origin, Settings(allowed_origins=("https://chat.example.com",)))


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost.evil.com",
        "http://evil.com#localhost",
        "http://127.0.0.1.evil.com",
        "http://localhost@evil.com",
        "http://127.0.0.2",
        "null",
        "file://localhost",
    ],
)
def test_development_localhost_rule_is_exact(origin: str) -> None:
    assert not origin_allowed(origin, Settings(env="development"))


# --- mint_token -----------------------------------------------------------------------------


async def test_minted_token_round_trips() -> None:
    settings = hs_settings(GATEWAY_JWT_AUDIENCE="chat", GATEWAY_JWT_ISSUER="gateway-dev")
    token = mint_token(
        settings, sub="u-1", name="Ann", rooms=["b", "a", "a"], ttl_seconds=120, now=NOW
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    principal = await TokenVerifier(settings, clock=FakeClock()).verify(token)
    assert principal == Principal("u-1", "Ann", frozenset({"a", "b"}), NOW + 120)
    payload = jwt.decode(
        token, SECRET, ["HS256"], {"verify_exp": False}, audience="chat", issuer="gateway-dev"
    )
    assert payload["rooms"] == ["a", "b"] and payload["iat"] == NOW


async def test_minted_token_without_name_uses_sub() -> None:
    settings = hs_settings()
    token = mint_token(settings, sub="u-2", now=NOW)
    principal = await TokenVerifier(settings, clock=FakeClock(NOW + 3000)).verify(token)
    assert principal.name == "u-2" and principal.expires_at == NOW + 3600
    assert "name" not in jwt.decode(token, SECRET, ["HS256"], {"verify_exp": False})


async def test_minted_rooms_are_counted_as_the_verifier_sees_them() -> None:
    # 101 names, 100 of them different: the token carries each once, and is accepted.
    rooms = [f"r{i}" for i in range(100)] + ["r0"]
    token = mint_token(hs_settings(), sub="u", rooms=rooms, now=NOW)
    principal = await TokenVerifier(hs_settings(), clock=FakeClock()).verify(token)
    assert len(principal.rooms) == 100


def test_mint_needs_hs256_and_a_secret(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="GATEWAY_JWT_SECRET"):
        mint_token(Settings(jwt_secret=None), sub="u")
    with pytest.raises(ValueError, match="HS256"):
        mint_token(pk_settings(tmp_path, ed_key), sub="u")


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": ""},
        {"sub": "s" * 129},
        {"sub": "a\r\nb"},
        {"name": ""},
        {"name": "n" * 65},
        {"rooms": ["bad room"]},
        {"rooms": ["lobby\n"]},
        {"rooms": [f"r{i}" for i in range(101)]},
        {"ttl_seconds": 0},
        {"ttl_seconds": float("nan")},
        {"ttl_seconds": float("inf")},
        {"ttl_seconds": 1e12},  # beyond the latest exp the verifier accepts
        {"name": "\u202eecila"},
        {"sub": "\ud800"},
        {"name": "\udfff"},
        {"rooms": "lobby"},  # one string is not a list of rooms (it was five one-letter rooms)
    ],
)
def test_mint_refuses_invalid_claims(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        mint_token(hs_settings(), **{"sub": "u", **changes})
