"""Test helpers shared by the unit, app and end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Mapping

from gateway.settings import Settings, load_settings

__all__ = ["TEST_SECRET", "TIMEOUT_FACTOR", "make_settings", "timeout"]

TEST_SECRET = "test-secret-" + "x" * 40

#: Every timeout in the tests is scaled by this factor, so slow machines do not flake.
TIMEOUT_FACTOR = float(os.environ.get("GATEWAY_TEST_TIMEOUT_FACTOR", "1"))


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


def make_settings(overrides: Mapping[str, str] | None = None) -> Settings:
    """Development settings with a known secret and no files read from certs/, no metrics
    listener (tests that want one pick a free port), and a shutdown that closes at once."""
    env = {
        "GATEWAY_JWT_SECRET": TEST_SECRET,
        "GATEWAY_TLS_CERT_FILE": "/nonexistent/cert.pem",
        "GATEWAY_TLS_KEY_FILE": "/nonexistent/key.pem",
        "GATEWAY_METRICS_PORT": "0",
        "GATEWAY_SHUTDOWN_SPREAD_SECONDS": "0",
    }
    env.update(overrides or {})
    return load_settings(env)
