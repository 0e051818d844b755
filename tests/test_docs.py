"""The documents agree with the code: every setting, close code and error code is documented."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.errors import CloseCode, ErrorCode
from gateway.protocol import CLIENT_TYPES, SERVER_TYPES

ROOT = Path(__file__).resolve().parent.parent


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    in_code = set(re.findall(r'"(GATEWAY_[A-Z_]+)"', read("gateway/settings.py")))
    in_docs = set(re.findall(r"`(GATEWAY_[A-Z_]+)`", read("docs/configuration.md")))
    assert in_code, "no settings found: the pattern is stale"
    assert in_code - in_docs == set(), "settings missing from docs/configuration.md"
    assert in_docs - in_code == set(), "docs/configuration.md names settings the code ignores"


def test_every_close_code_and_error_code_is_in_the_protocol() -> None:
    protocol = read("docs/protocol.md")
    for code in CloseCode:
        assert re.search(rf"\b{int(code)}\b", protocol), f"close code {int(code)} undocumented"
    for error in ErrorCode:
        assert f"`{error}`" in protocol, f"error code {error} undocumented"


def test_every_frame_type_is_in_the_protocol() -> None:
    protocol = read("docs/protocol.md")
    for kind in CLIENT_TYPES | SERVER_TYPES:
        assert f"`{kind}`" in protocol, f"frame type {kind} undocumented"


def test_readme_states_the_two_commands() -> None:
    readme = read("README.md")
    assert "make run" in readme and "make test" in readme
