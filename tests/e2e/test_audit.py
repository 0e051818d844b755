"""The audit trail on the real server (gateway.audit): each security decision is one line of
``gateway.audit`` with a stable event, the client's address and no token content, and one
count in ``gateway_security_events_total``."""

from __future__ import annotations

import json
import logging
import time

import pytest
from websockets.exceptions import InvalidStatus

from gateway.auth import mint_token
from tests.e2e.conftest import Gateway, StartGateway

pytestmark = pytest.mark.e2e


def audit_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.audit" and r.getMessage() == event]


def security_count(gw: Gateway, event: str) -> float:
    value = gw.services.metrics.registry.get_sample_value(
        "gateway_security_events_total", {"event": event}
    )
    return value or 0.0


async def test_refusals_and_abuse_closes_are_audited_without_token_content(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    async with start_gateway(
        GATEWAY_ALLOWED_ORIGINS="https://chat.example.com",
        GATEWAY_MAX_INVALID_MESSAGES="2",
        GATEWAY_MAX_MESSAGE_BYTES="1024",
    ) as gw:
        expired = mint_token(gw.settings, sub="eve", ttl_seconds=60, now=time.time() - 3600)
        with pytest.raises(InvalidStatus):
            await gw.connect(expired)
        with pytest.raises(InvalidStatus):
            await gw.connect(gw.token("eve"), additional_headers={"Origin": "https://evil.example"})
        # Invalid frames until the connection is closed 1008 for abuse...
        abuser = await gw.user("abuser")
        for _ in range(3):
            await abuser.ws.send("{not json")
        assert await abuser.close_code() == 1008
        # ...and a frame over the size cap, refused by the WebSocket layer with 1009.
        big = await gw.user("big")
        await big.ws.send(json.dumps({"type": "chat", "room": "lobby", "message": "x" * 2000}))
        assert await big.close_code() == 1009

    [auth] = audit_lines(caplog, "auth_refused")
    assert (auth.__dict__["reason"], auth.__dict__["status"]) == ("expired", 401)
    assert auth.__dict__["client"] == "127.0.0.1"
    [origin] = audit_lines(caplog, "origin_refused")
    assert origin.__dict__["status"] == 403
    [abuse] = audit_lines(caplog, "abuse_closed")
    assert (abuse.__dict__["close_code"], abuse.__dict__["user_id"]) == (1008, "abuser")
    [frame] = audit_lines(caplog, "frame_refused")
    assert frame.__dict__["close_code"] == 1009
    for event in ("auth_refused", "origin_refused", "abuse_closed", "frame_refused"):
        assert security_count(gw, event) == 1, event
    everything = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert expired.rsplit(".", 1)[1] not in everything  # no token content, ever


async def test_a_message_over_the_rate_is_audited(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    async with start_gateway(GATEWAY_RATE_PER_SECOND="1", GATEWAY_RATE_BURST="2") as gw:
        fast = await gw.user("fast")
        for _ in range(4):
            await fast.send({"type": "ping"})
        refused = await fast.recv_type("error")
        assert refused["code"] == "rate_limited"
        await fast.close()
    assert audit_lines(caplog, "message_rate_limited")
    assert security_count(gw, "message_rate_limited") >= 1
