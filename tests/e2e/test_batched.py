"""Batched delivery on a real TLS server (docs/protocol.md, Batched delivery): negotiated with
the subprotocol ``chat.batch.v1``, a window's broadcasts reach the client as one frame, a JSON
array, in order; replies are not held; a client that does not ask gets one object per frame."""

from __future__ import annotations

import json

import pytest

from gateway.protocol import BATCH_SUBPROTOCOL
from tests.e2e.conftest import Client, StartGateway

pytestmark = pytest.mark.e2e

WIDE_OPEN = {"GATEWAY_RATE_PER_SECOND": "10000", "GATEWAY_RATE_BURST": "10000"}


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ([BATCH_SUBPROTOCOL], BATCH_SUBPROTOCOL),
        (["other", BATCH_SUBPROTOCOL], BATCH_SUBPROTOCOL),
        (["other"], None),  # not ours: accepted without a subprotocol, as before
        (None, None),
    ],
)
async def test_batching_is_chosen_only_when_the_client_offers_it(
    start_gateway: StartGateway, offered: list[str] | None, chosen: str | None
) -> None:
    async with start_gateway() as gw:
        # websockets refuses a handshake that answers with a subprotocol it did not offer.
        ws = await gw.connect(gw.token("alice"), subprotocols=offered)
        assert ws.subprotocol == chosen
        client = Client(ws)
        assert (await client.recv())["type"] == "welcome"  # a reply: a plain object
        await client.close()


async def test_a_windows_chats_arrive_as_arrays_in_order_and_plain_clients_see_no_change(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(GATEWAY_BATCH_WINDOW_MS="200", **WIDE_OPEN) as gw:
        batched = await gw.user("batched", subprotocols=[BATCH_SUBPROTOCOL])
        plain, sender = await gw.user("plain"), await gw.user("sender")
        for client in (batched, plain, sender):
            await client.join("lobby")
        for n in range(30):
            await sender.send({"type": "chat", "room": "lobby", "message": str(n)})
        for client in (batched, plain):
            got = [await client.recv_type("chat") for _ in range(30)]
            assert [int(chat["message"]) for chat in got] == list(range(30))
            assert [chat["id"] for chat in got] == sorted(chat["id"] for chat in got)
        assert plain.arrays == 0
        # 30 chats sent back to back, and a window of 200 ms: fewer frames than messages.
        assert batched.arrays >= 1
        for client in (batched, plain, sender):
            await client.close()


async def test_a_reply_carries_the_broadcasts_held_before_it(start_gateway: StartGateway) -> None:
    async with start_gateway(GATEWAY_BATCH_WINDOW_MS="1000", **WIDE_OPEN) as gw:
        batched = await gw.user("batched", subprotocols=[BATCH_SUBPROTOCOL])
        sender = await gw.user("sender")
        await batched.join("lobby")
        await sender.join("lobby")
        await sender.request({"type": "chat", "room": "lobby", "message": "held"}, "chat")
        # The sender's presence and chat are held for the window; the pong goes at once, and
        # they go with it, first.
        await batched.send({"type": "ping", "ref": "p"})
        raw = await batched.ws.recv()
        assert isinstance(raw, str)
        got = json.loads(raw)
        assert [m["type"] for m in got] == ["presence", "chat", "pong"]
        assert (got[0]["user"]["id"], got[1]["message"], got[2]["ref"]) == ("sender", "held", "p")
        await batched.close()
        await sender.close()
