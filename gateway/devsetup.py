"""Development set-up: a self-signed certificate and a random JWT secret, made once.

``make run`` calls ``python -m gateway dev-setup``, which writes into certs/ (ignored by git):
``dev-cert.pem`` and ``dev-key.pem`` (an ECDSA P-256 key, valid for localhost, 127.0.0.1 and
::1 for 30 days) and ``dev-jwt-secret`` (48 random bytes, URL-safe). Existing files are kept,
except an expired or soon-expiring certificate, which is made anew.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.settings import DEV_CERT_FILE, DEV_KEY_FILE, DEV_SECRET_FILE

__all__ = ["ensure_dev_files", "write_self_signed"]

CERT_DAYS = 30


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only to a new file, not one rewritten
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_self_signed(cert_file: Path, key_file: Path, *, days: int = CERT_DAYS) -> None:
    """Write a self-signed certificate for localhost and its private key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway development")])
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _certificate_fresh(cert_file: Path, key_file: Path) -> bool:
    if not (cert_file.is_file() and key_file.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError:  # empty or damaged (an interrupted write): make a new one
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)


def ensure_dev_files(root: Path = Path()) -> list[Path]:
    """Create whichever development files are missing under ``root``; return those written."""
    written: list[Path] = []
    cert, key, secret = root / DEV_CERT_FILE, root / DEV_KEY_FILE, root / DEV_SECRET_FILE
    if not _certificate_fresh(cert, key):
        write_self_signed(cert, key)
        written += [cert, key]
    if not secret.is_file():
        _write_private(secret, secrets.token_urlsafe(48).encode() + b"\n")
        written.append(secret)
    return written
