"""Who a token names, end to end on the real server: the display name of a token without a
``name`` claim, and a ``sub`` that is not Unicode text."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from gateway.auth import FALLBACK_NAME
from tests.e2e.conftest import Client, Gateway

pytestmark = pytest.mark.e2e


def signed(gw: Gateway, claims: dict[str, object]) -> str:
    """A token of the operator's issuer (not made by mint_token: any claims at all)."""
    secret = gw.settings.jwt_secret
    assert secret is not None
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, secret.get(), algorithm="HS256")


@pytest.mark.parametrize(
    ("sub", "name"),
    [("u" * 100, "u" * 64), ("\u202eecila", FALLBACK_NAME)],
)
async def test_a_token_without_a_name_is_welcomed_with_a_valid_one(
    gateway: Gateway, sub: str, name: str
) -> None:
    client = Client(await gateway.connect(signed(gateway, {"sub": sub})))
    welcome = await client.recv()  # checked against schemas/server/welcome.json
    assert welcome["user"] == {"id": sub, "name": name}
    await client.join("lobby")
    await client.send({"type": "chat", "room": "lobby", "message": "hi"})
    assert (await client.recv_type("chat"))["from"] == {"id": sub, "name": name}
    await client.close()


async def test_a_sub_that_is_not_unicode_text_is_refused_at_the_upgrade(gateway: Gateway) -> None:
    # A lone surrogate: JSON can escape it, no UTF-8 frame can carry it. It was accepted, and
    # the welcome then failed inside the server.
    with pytest.raises(InvalidStatus) as refused:
        await gateway.connect(signed(gateway, {"sub": "mallory\ud800"}))
    response = refused.value.response
    assert response.status_code == 401
    assert json.loads(response.body or b"{}")["error"] == "invalid_token"
    assert not gateway.services.sessions
