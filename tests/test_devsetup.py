"""Tests for gateway.devsetup: the development certificate, its key and the secret."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.devsetup import CERT_DAYS, ensure_dev_files, write_self_signed
from gateway.settings import DEV_CERT_FILE, DEV_KEY_FILE, DEV_SECRET_FILE, MIN_SECRET_BYTES

__all__: list[str] = []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def pair_matches(cert_file: Path, key_file: Path) -> bool:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    public = certificate(cert_file).public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    return public.public_numbers() == key.public_key().public_numbers()


def test_the_certificate_names_every_local_address(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    cert = certificate(tmp_path / "cert.pem")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False  # it can sign nothing else


def test_the_certificate_is_valid_now_for_the_configured_days(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    cert = certificate(tmp_path / "cert.pem")
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    lifetime = cert.not_valid_after_utc - now
    assert dt.timedelta(days=CERT_DAYS - 1) < lifetime <= dt.timedelta(days=CERT_DAYS)


def test_the_key_is_private_and_matches_the_certificate(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    key_file = tmp_path / "key.pem"
    assert mode(key_file) == 0o600
    assert pair_matches(tmp_path / "cert.pem", key_file)


def test_a_rewritten_key_is_private_even_if_the_old_file_was_not(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text("old key")
    key_file.chmod(0o644)
    write_self_signed(tmp_path / "cert.pem", key_file)
    assert mode(key_file) == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes()


def test_keys_are_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        ensure_dev_files(tmp_path)
    finally:
        os.umask(previous)
    assert mode(tmp_path / DEV_KEY_FILE) == 0o600
    assert mode(tmp_path / DEV_SECRET_FILE) == 0o600


def test_ensure_dev_files_writes_all_three_then_nothing(tmp_path: Path) -> None:
    written = ensure_dev_files(tmp_path)
    expected = [tmp_path / DEV_CERT_FILE, tmp_path / DEV_KEY_FILE, tmp_path / DEV_SECRET_FILE]
    assert written == expected
    contents = [path.read_bytes() for path in expected]
    assert ensure_dev_files(tmp_path) == []
    assert [path.read_bytes() for path in expected] == contents


def test_the_secret_is_long_and_random(tmp_path: Path) -> None:
    ensure_dev_files(tmp_path / "a")
    ensure_dev_files(tmp_path / "b")
    first = (tmp_path / "a" / DEV_SECRET_FILE).read_text()
    second = (tmp_path / "b" / DEV_SECRET_FILE).read_text()
    assert first.endswith("\n")
    secret = first.strip()
    assert len(secret.encode()) >= MIN_SECRET_BYTES
    assert len(secret) == 64  # 48 random bytes, URL-safe base64
    assert secret.replace("-", "").replace("_", "").isalnum()
    assert first != second


def test_an_expiring_certificate_is_renewed_and_the_secret_kept(tmp_path: Path) -> None:
    ensure_dev_files(tmp_path)
    cert_file, key_file = tmp_path / DEV_CERT_FILE, tmp_path / DEV_KEY_FILE
    secret_before = (tmp_path / DEV_SECRET_FILE).read_bytes()
    write_self_signed(cert_file, key_file, days=0)  # expires now: within the one-day margin
    old_key = key_file.read_bytes()
    assert ensure_dev_files(tmp_path) == [cert_file, key_file]
    assert certificate(cert_file).not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(
        days=CERT_DAYS - 1
    )
    assert key_file.read_bytes() != old_key
    assert mode(key_file) == 0o600
    assert pair_matches(cert_file, key_file)
    assert (tmp_path / DEV_SECRET_FILE).read_bytes() == secret_before


def test_a_certificate_good_for_days_is_kept(tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / DEV_CERT_FILE, tmp_path / DEV_KEY_FILE
    write_self_signed(cert_file, key_file, days=3)
    before = cert_file.read_bytes()
    assert ensure_dev_files(tmp_path) == [tmp_path / DEV_SECRET_FILE]
    assert cert_file.read_bytes() == before


@pytest.mark.parametrize("damage", [b"", b"-----BEGIN CERTIFICATE-----\ntruncat", b"\x00" * 64])
def test_a_damaged_certificate_is_made_anew(tmp_path: Path, damage: bytes) -> None:
    ensure_dev_files(tmp_path)
    cert_file = tmp_path / DEV_CERT_FILE
    cert_file.write_bytes(damage)
    assert ensure_dev_files(tmp_path) == [cert_file, tmp_path / DEV_KEY_FILE]
    assert certificate(cert_file).not_valid_after_utc > dt.datetime.now(dt.UTC)


def test_a_missing_key_remakes_the_pair(tmp_path: Path) -> None:
    ensure_dev_files(tmp_path)
    (tmp_path / DEV_KEY_FILE).unlink()
    assert ensure_dev_files(tmp_path) == [tmp_path / DEV_CERT_FILE, tmp_path / DEV_KEY_FILE]
    assert pair_matches(tmp_path / DEV_CERT_FILE, tmp_path / DEV_KEY_FILE)
