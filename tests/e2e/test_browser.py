"""The chat page, proven in a real browser: headless Chromium against a real TLS gateway.

Each test drives static/index.html and static/app.js the way a person would (the form, the
keyboard, the buttons) and reads the page through the hooks listed at the top of app.js.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.async_api import Browser, BrowserContext, Route, expect

from gateway.auth import mint_token
from gateway.errors import CloseCode
from gateway.hypercorn_fixes import TransportControl
from gateway.metrics import ATTEMPT_OUTCOMES
from tests.e2e.browser import (
    ARTIFACTS_DIR,
    ChatPage,
    RestartableGateway,
    gateway_env,
    launch_chromium,
    open_chat,
    wait_ms,
)
from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.helpers import timeout
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launch_chromium() as chromium:
        yield chromium


class Pages:
    """Opens chat pages, one browser context each; closes every context at teardown."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.opened: list[ChatPage] = []

    async def open(
        self,
        base_url: str,
        *,
        reconnect_options: Mapping[str, float] | None = None,
        fragment: str = "",
        shows: str = "#signin-panel",
        setup: Callable[[BrowserContext], Awaitable[None]] | None = None,
    ) -> ChatPage:
        page = await open_chat(
            self.browser,
            base_url,
            reconnect_options=reconnect_options,
            fragment=fragment,
            shows=shows,
            setup=setup,
        )
        self.opened.append(page)
        return page

    async def close(self) -> None:
        while self.opened:
            await self.opened.pop().context.close()


@pytest.fixture
async def pages(browser: Browser) -> AsyncIterator[Pages]:
    opened = Pages(browser)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def serve_pages(start_gateway: StartGateway, pages: Pages) -> StartGateway:
    """``start_gateway``, closing every page before the server stops: a page still open would
    reconnect into the shutdown, which is what the restart tests are for, not these."""

    @asynccontextmanager
    async def start(**env: str) -> AsyncIterator[Gateway]:
        async with start_gateway(**env) as gw:
            try:
                yield gw
            finally:
                await pages.close()

    return start


@pytest.fixture
async def restartable(
    tls_files: tuple[Path, Path], client_ssl: ssl.SSLContext
) -> AsyncIterator[Callable[..., RestartableGateway]]:
    """``restartable(GATEWAY_X="...")``: a gateway the test stops and starts on one port."""
    made: list[RestartableGateway] = []

    def make(**env: str) -> RestartableGateway:
        made.append(RestartableGateway(gateway_env(tls_files, **env), client_ssl))
        return made[-1]

    try:
        yield make
    finally:
        for gw in made:
            await gw.stop()


# ---- 1. two people ----


async def test_two_users_see_messages_members_presence_and_typing(
    serve_pages: StartGateway, pages: Pages, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve_pages() as gw:
        alice = await pages.open(gw.base_url)
        # The sign-in screen: no connection yet, so no "Disconnected" badge either.
        await expect(alice.state).to_be_hidden()
        await alice.sign_in("alice")
        await expect(alice.state).to_be_visible()
        bob = await pages.open(gw.base_url)
        await bob.sign_in("bob")
        alice_id, bob_id = await alice.user_id(), await bob.user_id()
        assert alice_id != bob_id
        # The page asks for batched delivery (docs/protocol.md), and everything below runs so.
        sinks = [s.outbox.sink for s in gw.services.sessions.values()]
        assert len(sinks) == 2
        assert all(isinstance(sink, TransportControl) and sink.batching for sink in sinks)

        # Members: both pages list both people, from the joined list and the presence event.
        for page, me, other, other_name in (
            (alice, alice_id, bob_id, "bob"),
            (bob, bob_id, alice_id, "alice"),
        ):
            await expect(page.members).to_have_count(2)
            await expect(page.member_count).to_have_text("2")
            await expect(page.page.locator(f'#members > li[data-user-id="{other}"]')).to_have_text(
                other_name
            )
            await expect(page.page.locator(f'#members > li[data-user-id="{me}"]')).to_contain_text(
                "(you)"
            )

        # A message typed in one page appears in the other, under the name from the token.
        await alice.send("hello bob")
        seen = bob.message("hello bob")
        await expect(seen).to_have_count(1)
        await expect(seen).to_have_attribute("data-user-id", alice_id)
        await expect(seen).to_have_attribute("data-own", "false")
        await expect(seen).to_have_attribute("data-id", re.compile(r"^[1-9]\d*$"))
        await expect(seen.locator(".msg-from")).to_have_text("alice")
        await bob.send("hi alice, how are you?")
        await expect(alice.message("hi alice, how are you?").locator(".msg-from")).to_have_text(
            "bob"
        )
        await expect(alice.messages.locator(".msg-text")).to_have_text(
            ["hello bob", "hi alice, how are you?"]
        )
        await expect(bob.messages.locator(".msg-text")).to_have_text(
            ["hello bob", "hi alice, how are you?"]
        )

        # Typing: shown in the other page only, cleared when the input is emptied. The page
        # hides a typing line by itself after 5 s: clearing well before that proves the
        # typing:false frame.
        await bob.input.press_sequentially("fine, thanks")
        await expect(alice.typing).to_have_text("bob is typing…")
        await expect(bob.typing).to_have_text("")

        ARTIFACTS_DIR.mkdir(exist_ok=True)
        shots = [ARTIFACTS_DIR / "two-users-alice.png", ARTIFACTS_DIR / "two-users-bob.png"]
        await alice.page.screenshot(path=str(shots[0]))
        await bob.page.screenshot(path=str(shots[1]))
        with capsys.disabled():
            print("\nscreenshots: " + " ".join(str(p) for p in shots))

        typing_frames = len(bob.frames_of("sent", "typing"))
        await bob.input.press("Control+a")
        await bob.input.press("Backspace")
        await expect(alice.typing).to_have_text("", timeout=wait_ms(2))
        stops = [f.data for f in bob.frames_of("sent", "typing")[typing_frames:]]
        assert stops == [{"type": "typing", "room": "lobby", "typing": False}]

        # Bob signs out: Alice's member list shrinks, and his badge goes with his session.
        await bob.page.get_by_role("button", name="Sign out").click()
        await expect(bob.page.locator("#signin-panel")).to_be_visible()
        await expect(bob.state).to_be_hidden()
        await expect(alice.members).to_have_count(1)
        await expect(alice.member_count).to_have_text("1")
        await expect(alice.page.locator(f'#members > li[data-user-id="{bob_id}"]')).to_have_count(0)

        # Bob comes back, then closes his page: joins and leaves again.
        await bob.sign_in("bob")
        await expect(alice.members).to_have_count(2)
        await bob.page.close()
        await expect(alice.members).to_have_count(1)
        await expect(alice.members).to_have_text(["alice (you)"])
        await alice.send("still here")
        alice.assert_clean()
        bob.assert_clean()


async def test_two_windows_on_two_instances_meet_in_one_room(
    serve_pages: StartGateway, pages: Pages, redis_server: RedisServer
) -> None:
    # Two gateway instances sharing one real Redis, each serving its own page: what a user
    # sees behind a load balancer that put the two windows on different replicas.
    shared = {
        "GATEWAY_BROKER_URL": redis_server.url_for(0),
        "GATEWAY_RATELIMIT_STORAGE_URL": redis_server.url_for(1),
    }
    async with serve_pages(**shared) as one, serve_pages(**shared) as two:
        assert one.port != two.port
        alice = await pages.open(one.base_url)
        await alice.sign_in("alice")
        bob = await pages.open(two.base_url)
        await bob.sign_in("bob")
        for page in (alice, bob):  # each lists both: the other is on the other instance
            await expect(page.members).to_have_count(2)
        await expect(alice.members).to_have_text(["alice (you)", "bob"])
        await expect(bob.members).to_have_text(["alice", "bob (you)"])
        await bob.input.press_sequentially("hi")
        await expect(alice.typing).to_have_text("bob is typing…")
        for n in range(3):  # both ways, one order
            await alice.send(f"from alice {n}")
            await bob.send(f"from bob {n}")
        expected = [f"from {who} {n}" for n in range(3) for who in ("alice", "bob")]
        for page in (alice, bob):
            await expect(page.messages.locator(".msg-text")).to_have_text(expected)
        ids = [int(i) for i in await bob.messages.evaluate_all("ms => ms.map(m => m.dataset.id)")]
        assert ids == sorted(ids) and len(set(ids)) == 6
        assert (one.services.hub.members("lobby"), two.services.hub.members("lobby")) == (1, 1)


async def test_a_large_room_shows_its_size_and_a_sample_of_its_members(
    serve_pages: StartGateway, pages: Pages
) -> None:
    # Above GATEWAY_PRESENCE_MAX_MEMBERS users a room is large: the page lists a sample, says
    # how many more there are, and follows the room's size through `room` frames.
    async with serve_pages(GATEWAY_PRESENCE_MAX_MEMBERS="2") as gw:
        others: dict[str, Client] = {}

        async def enter(sub: str) -> None:
            others[sub] = await gw.user(sub)
            await others[sub].join("lobby")

        async def leave(sub: str) -> None:
            await others.pop(sub).close()

        for sub in ("amy", "ben", "cat"):
            await enter(sub)
        zoe = await pages.open(gw.base_url)
        await zoe.sign_in("zoe")
        [joined] = zoe.frames_of("received", "joined")
        assert (joined.data["member_count"], joined.data["members_truncated"]) == (4, True)
        await expect(zoe.member_count).to_have_text("4")
        await expect(zoe.members).to_have_count(2)  # the sample: the limit, zoe in it
        await expect(zoe.members.filter(has_text="zoe (you)")).to_have_count(1)
        await expect(zoe.members_more).to_have_text("and 2 more")

        ARTIFACTS_DIR.mkdir(exist_ok=True)
        shot = ARTIFACTS_DIR / "large-room.png"
        await zoe.page.screenshot(path=str(shot))

        await enter("dan")  # nobody is told of dan alone: the next room update says 5
        await expect(zoe.member_count).to_have_text("5", timeout=wait_ms(3))
        await expect(zoe.members_more).to_have_text("and 3 more")
        assert zoe.frames_of("received", "presence") == []
        for sub in ("cat", "dan"):
            await leave(sub)
        await expect(zoe.member_count).to_have_text("3", timeout=wait_ms(3))
        await expect(zoe.members_more).to_have_text("and 1 more")

        # Back at the limit: presence again, and the whole list in the last room update.
        await leave("ben")
        await expect(zoe.member_count).to_have_text("2", timeout=wait_ms(3))
        await expect(zoe.members_more).to_have_count(0)
        await expect(zoe.members).to_have_text(["Amy", "zoe (you)"])
        small_again = [{"id": "amy", "name": "Amy"}, {"id": await zoe.user_id(), "name": "zoe"}]
        await leave("amy")  # a small room's presence frames, as before
        await expect(zoe.members).to_have_text(["zoe (you)"])
        await enter("eve")
        await expect(zoe.members).to_have_text(["Eve", "zoe (you)"])
        await expect(zoe.member_count).to_have_text("2")
        await enter("fay")  # large again: the list is a sample once more
        await expect(zoe.member_count).to_have_text("3", timeout=wait_ms(3))
        await expect(zoe.members_more).to_have_text("and 1 more")
        assert len(zoe.frames_of("received", "presence")) == 3  # ben, amy, eve
        updates = [f.data for f in zoe.frames_of("received", "room")]
        # One a second at most, so changes in the same second come as one (4 may come alone,
        # or with dan's 5): the sizes told, and the list back when the room was small again.
        assert [u for u in updates if "members" in u] == [
            {"type": "room", "room": "lobby", "member_count": 2, "members": small_again}
        ]
        counts = [u["member_count"] for u in updates]
        assert set(counts) <= {3, 4, 5, 2} and {5, 3, 2} <= set(counts) and counts[-1] == 3
        for sub in list(others):
            await leave(sub)
        zoe.assert_clean()


# ---- 2. connection state ----


async def test_connection_state_survives_a_server_restart(
    restartable: Callable[..., RestartableGateway], pages: Pages
) -> None:
    server = restartable()
    await server.start()
    alice = await pages.open(server.base_url, reconnect_options={"baseMs": 200, "capMs": 1000})
    await expect(alice.state).to_have_attribute("data-state", "disconnected")
    await alice.sign_in("alice")
    states = await alice.states()
    assert states[-2:] == ["connecting", "connected"], states
    await expect(alice.state).to_have_text("Connected")
    await expect(alice.page.locator("#live")).to_have_text("Connected")
    await alice.send("before the restart")

    await server.stop()
    await expect(alice.state).to_have_attribute(
        "data-state", re.compile(r"^(reconnecting|disconnected)$")
    )
    await expect(alice.state).to_have_text(re.compile(r"^Reconnecting in \d+ s…$"))
    await expect(alice.send_button).to_be_disabled()
    await expect(alice.input).to_be_disabled()
    # It keeps failing while the server is down, and says so.
    await alice.page.wait_for_function(
        "() => window.chatClient.reconnectDelays.length >= 3", timeout=wait_ms(10)
    )
    assert await alice.client("state.conn") != "connected"
    await expect(alice.send_button).to_be_disabled()

    gw = await server.start()
    await alice.wait_in_room("lobby", wait_seconds=10)
    await expect(alice.state).to_have_text("Connected")
    # It re-joined the lobby on the server, not only in its own view.
    bob = await gw.user("bob")
    joined = await bob.join("lobby")
    assert {m["name"] for m in joined["members"]} == {"alice", "Bob"}
    await alice.send("after the restart")
    frame = await bob.recv_type("chat")
    assert (frame["message"], frame["from"]["name"]) == ("after the restart", "alice")
    await bob.close()
    assert "connecting" in (await alice.states())[-3:]
    await expect(alice.messages.locator(".msg-text")).to_have_text(
        ["before the restart", "after the restart"]
    )
    alice.assert_clean(server_went_down=True)


# ---- 3. backoff ----


def _attempt_caps(count: int, base_ms: float, cap_ms: float) -> list[float]:
    return [min(cap_ms, base_ms * 2**n) for n in range(count)]


async def test_reconnect_backoff_grows_is_jittered_capped_and_resets(
    restartable: Callable[..., RestartableGateway], pages: Pages
) -> None:
    base_ms, cap_ms, stable_ms, attempts = 50, 1000, 2000, 10
    options = {"baseMs": base_ms, "capMs": cap_ms, "stableMs": stable_ms}
    server = restartable()
    await server.start()
    people = [await pages.open(server.base_url, reconnect_options=options) for _ in range(2)]
    for name, page in zip(("alice", "bob"), people, strict=True):
        await page.sign_in(name)

    await server.stop()
    caps = _attempt_caps(attempts, base_ms, cap_ms)
    sequences: list[list[float]] = []
    for page in people:
        await page.page.wait_for_function(
            f"() => window.chatClient.reconnectDelays.length >= {attempts}", timeout=wait_ms(20)
        )
        delays: list[float] = (await page.client("reconnectDelays"))[:attempts]
        # Each delay is within its attempt's window, which doubles up to the cap...
        for n, (delay, cap) in enumerate(zip(delays, caps, strict=True)):
            assert 0 <= delay <= cap, (n, delays)
        assert max(delays) <= cap_ms
        # ...so the largest delay rises as the attempts go on (full jitter: single delays are
        # noisy; the first two are at most 100 ms, six later ones up to 1000 ms each).
        assert max(delays[:2]) < max(delays[4:]), delays
        # Jittered: not every delay sits at the same fraction of its window.
        assert len({round(d / c, 6) for d, c in zip(delays, caps, strict=True)}) > 1, delays
        sequences.append(delays)
    assert sequences[0] != sequences[1]

    # A connection that lasts stableMs resets the backoff: not at once (accept-then-close loops
    # must keep backing off), but after the threshold.
    await server.start()

    async def attempt_once_back(page: ChatPage) -> int:
        await page.wait_in_room("lobby", wait_seconds=10)
        attempt: int = await page.client("state.attempt")
        return attempt

    assert all(n > 0 for n in await asyncio.gather(*map(attempt_once_back, people)))
    for page in people:
        await page.page.wait_for_function(
            "() => window.chatClient.state.attempt === 0", timeout=wait_ms(stable_ms / 1000 + 5)
        )
    before = [len(await page.client("reconnectDelays")) for page in people]
    await server.stop()
    for page, count in zip(people, before, strict=True):
        await page.page.wait_for_function(
            f"() => window.chatClient.reconnectDelays.length >= {count + 3}", timeout=wait_ms(10)
        )
        fresh: list[float] = (await page.client("reconnectDelays"))[count : count + 3]
        for delay, cap in zip(fresh, _attempt_caps(3, base_ms, cap_ms), strict=True):
            assert 0 <= delay <= cap, fresh
        page.assert_clean(server_went_down=True)


# ---- 4. injection ----


async def test_markup_in_messages_and_names_is_shown_as_text(
    serve_pages: StartGateway, pages: Pages
) -> None:
    evil_name = '<img src=x onerror="window.__pwned=1">'
    payloads = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>"]
    async with serve_pages() as gw:
        alice = await pages.open(gw.base_url)
        await alice.sign_in(evil_name)
        bob = await pages.open(gw.base_url)
        await bob.sign_in("bob")
        for payload in payloads:
            await alice.send(payload)
        await expect(bob.messages.locator(".msg-text")).to_have_text(payloads)
        await expect(bob.messages.locator(".msg-from")).to_have_text([evil_name, evil_name])
        await expect(bob.members).to_have_count(2)
        assert sorted(await bob.members.all_text_contents()) == sorted(["bob (you)", evil_name])
        await expect(alice.page.locator("#me")).to_have_text(evil_name)
        await expect(alice.messages.locator(".msg-text")).to_have_text(payloads)
        for page in (alice, bob):
            # The CSP would stop an inline handler anyway: the element checks are what fail if
            # the page ever renders data as HTML.
            assert await page.page.evaluate("typeof window.__pwned") == "undefined"
            assert await page.page.locator("#messages img, #messages script").count() == 0
            assert (
                await page.page.locator(
                    "body img, body script, #members li *, #me *, .msg-from *"
                ).count()
                == 0
            )
            page.assert_clean()


async def test_bidi_controls_in_a_message_stay_inside_it(
    serve_pages: StartGateway, pages: Pages
) -> None:
    tricky = "see \u202etxt.exe and \u2066more"  # an override and an isolate, never closed
    async with serve_pages() as gw:
        alice = await pages.open(gw.base_url)
        await alice.sign_in("alice")
        bob = await pages.open(gw.base_url)
        await bob.sign_in("bob")
        await alice.send(tricky)
        await alice.send("plain")
        await expect(bob.messages.locator(".msg-text")).to_have_text([tricky, "plain"])
        # Each piece of user text is its own bidi island (CSS), so the override reorders that
        # message's text alone: not its author's name, its time, or the next message.
        styles = await bob.page.evaluate(
            """() => Object.fromEntries(['.msg-text', '.msg-from', '#members > li', '#me']
                .map((s) => [s, getComputedStyle(document.querySelector(s)).unicodeBidi]))"""
        )
        assert styles == {
            ".msg-text": "plaintext",
            ".msg-from": "isolate",
            "#members > li": "isolate",
            "#me": "isolate",
        }
        # A display name with such controls is refused where tokens are made.
        response = await bob.page.request.post(
            gw.base_url + "/dev/token", data={"name": "\u202eecila"}
        )
        assert response.status == 400
        alice.assert_clean()
        bob.assert_clean()


# ---- 5. token expiry ----


async def test_page_keeps_working_across_token_expiries_without_losing_messages(
    serve_pages: StartGateway, pages: Pages
) -> None:
    ttl_seconds = 5
    async with serve_pages(
        GATEWAY_DEV_TOKEN_TTL_SECONDS=str(ttl_seconds), GATEWAY_JWT_LEEWAY_SECONDS="0"
    ) as gw:
        alice = await pages.open(gw.base_url)
        await alice.sign_in("alice")
        first_expiry_ms: int = await alice.client("state.expiresAt")
        assert abs(first_expiry_ms - (time.time() + ttl_seconds) * 1000) < 3000
        bob = await gw.user("bob")
        await bob.join("lobby")

        # Bob talks steadily until Alice's page has outlived three of its tokens.
        sent: list[str] = []
        expiries = {first_expiry_ms}
        deadline = time.monotonic() + timeout(4 * ttl_seconds + 10)
        while len(expiries) < 4 or time.time() * 1000 < first_expiry_ms + 2 * ttl_seconds * 1000:
            assert time.monotonic() < deadline, f"token renewed {len(expiries) - 1} times"
            text = f"bob #{len(sent) + 1}"
            ack = await bob.request({"type": "chat", "room": "lobby", "message": text}, "chat")
            assert ack["message"] == text
            sent.append(text)
            expiries.add(await alice.client("state.expiresAt"))
            await asyncio.sleep(0.3)

        await expect(alice.messages.locator(".msg-text")).to_have_text(sent)
        ids = [
            int(i or 0)
            for i in await alice.messages.evaluate_all("els => els.map(e => e.dataset.id)")
        ]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        # The page renewed in place: refresh frames answered by refreshed, no reconnect.
        assert len(alice.frames_of("sent", "refresh")) >= 3
        assert len(alice.frames_of("received", "refreshed")) >= 3
        assert await alice.states() == ["disconnected", "connecting", "connected"]
        assert sorted(expiries)[-1] > first_expiry_ms + 2 * ttl_seconds * 1000
        await alice.send("alice after the expiries")
        assert (await bob.recv_type("chat"))["message"] == "alice after the expiries"
        await bob.close()
        alice.assert_clean()


# ---- 6. limits ----


async def test_message_over_the_size_cap_is_refused_with_a_clear_notice(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages(GATEWAY_MAX_MESSAGE_BYTES="512") as gw:
        alice = await pages.open(gw.base_url)
        await alice.sign_in("alice")
        # 150 emoji: 150 characters, 300 UTF-16 units, 600 UTF-8 bytes. Only bytes count.
        too_big = "\U0001f600" * 150
        await alice.input.fill(too_big)
        await alice.input.press("Enter")
        await expect(alice.notice).to_have_attribute("data-code", "too_long")
        await expect(alice.notice).to_have_text(
            re.compile(r"^Message too long \(\d+ of 512 bytes\)$")
        )
        await expect(alice.notice).to_be_visible()
        await expect(alice.input).to_have_value(too_big)  # kept, to shorten
        await expect(alice.input).to_be_focused()
        await expect(alice.messages).to_have_count(0)

        await alice.input.fill("a" * 2001)
        await alice.input.press("Enter")
        await expect(alice.notice).to_have_text("Message too long (2001 of 2000 characters)")
        assert not alice.frames_of("sent", "chat")

        await alice.send("a short one")
        await expect(alice.state).to_have_attribute("data-state", "connected")
        assert await alice.states() == ["disconnected", "connecting", "connected"]
        alice.assert_clean()


async def test_messages_sent_too_fast_get_a_clear_notice_then_go_through(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages(GATEWAY_RATE_BURST="2", GATEWAY_RATE_PER_SECOND="0.2") as gw:
        alice = await pages.open(gw.base_url)
        await alice.sign_in("alice")
        # The join took one of two tokens, typing takes tokens too: a few messages run out.
        failed_text = None
        for n in range(1, 5):
            text = f"quick {n}"
            await alice.input.fill(text)
            await alice.input.press("Enter")
            outcome = alice.message(text).and_(
                alice.page.locator('[data-status="sent"], [data-status="failed"]')
            )
            await expect(outcome).to_have_count(1)
            if await outcome.get_attribute("data-status") == "failed":
                failed_text = text
                break
        assert failed_text is not None, "never rate-limited"
        await expect(alice.message(failed_text).locator(".msg-status")).to_have_text("not sent")
        await expect(alice.notice).to_have_attribute("data-code", "rate_limited")
        await expect(alice.notice).to_have_text(
            re.compile(r"^You're sending too fast — try again in \d+ s$")
        )
        await expect(alice.notice).to_be_visible()
        await expect(alice.state).to_have_attribute("data-state", "connected")
        await expect(alice.input).to_have_value(failed_text)  # one Enter sends it again
        await expect(alice.input).to_be_focused()

        # Once allowed (retry_after_ms after the last refusal), the same Enter goes through.
        refusals = [
            f for f in alice.frames_of("received", "error") if f.data["code"] == "rate_limited"
        ]
        assert refusals and all(0 < f.data["retry_after_ms"] <= 5000 for f in refusals)
        allowed_at = max(f.monotonic_seconds + f.data["retry_after_ms"] / 1000 for f in refusals)
        await asyncio.sleep(max(0.0, allowed_at - time.monotonic()) + 0.2)
        await alice.input.press("Enter")
        sent = alice.message(failed_text).and_(alice.page.locator('[data-status="sent"]'))
        await expect(sent).to_have_count(1)
        await expect(sent).to_have_attribute("data-id", re.compile(r"^[1-9]\d*$"))
        await expect(alice.message(failed_text)).to_have_count(2)  # the failed copy stays marked
        await expect(alice.state).to_have_attribute("data-state", "connected")
        assert await alice.states() == ["disconnected", "connecting", "connected"]
        alice.assert_clean()


# ---- 7. keyboard and screen readers ----


async def test_keyboard_only_use_and_announcements(serve_pages: StartGateway, pages: Pages) -> None:
    async with serve_pages() as gw:
        alice = await pages.open(gw.base_url)
        page = alice.page
        name_field = page.get_by_label("Display name")
        await expect(name_field).to_be_focused()
        await page.keyboard.type("alice")
        await page.keyboard.press("Enter")
        await alice.wait_in_room("lobby")
        await expect(page.locator("#live")).to_have_text("Connected")

        message_field = page.get_by_label("Message", exact=True)
        await expect(message_field).to_have_id("message-input")
        await expect(message_field).to_be_focused()  # straight from the sign-in to the composer
        log = page.get_by_role("log")
        await expect(log).to_have_attribute("aria-live", "polite")
        await expect(log).to_have_accessible_name("#lobby")

        for text in ("typed with the keyboard", "and a second one"):
            await page.keyboard.type(text)
            await page.keyboard.press("Enter")
            await expect(log.locator("li.msg").filter(has_text=text)).to_have_attribute(
                "data-status", "sent"
            )
            await expect(message_field).to_be_focused()
            await expect(message_field).to_have_value("")

        # Another person's message lands in the live log region.
        bob = await gw.user("bob")
        await bob.join("lobby")
        await bob.send({"type": "chat", "room": "lobby", "message": "heard you"})
        arrived = log.locator("li.msg").filter(has_text="heard you")
        await expect(arrived).to_have_count(1)
        await expect(arrived.locator(".msg-from")).to_have_text("Bob")
        await expect(message_field).to_be_focused()
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        await expect(page.get_by_role("status")).to_have_id("notice")
        await bob.close()
        alice.assert_clean()


# ---- 8. sign-in links (#token=...) ----
# A link carrying a token signs in as whoever the token names: sent by someone else, it is a login
# CSRF (the reader chats in the sender's account, and the sender reads it all). The page must ask.


def upgrade_attempts(gw: Gateway) -> float:
    """Every WebSocket upgrade the gateway has seen, accepted or refused."""
    registry = gw.services.metrics.registry
    return sum(
        registry.get_sample_value("gateway_connection_attempts_total", {"outcome": outcome}) or 0.0
        for outcome in ATTEMPT_OUTCOMES
    )


async def assert_never_connected(chat: ChatPage, gw: Gateway) -> None:
    """After giving the page time to misbehave: it opened no WebSocket, and the gateway saw no
    upgrade and holds no session."""
    await asyncio.sleep(timeout(1))
    assert chat.sockets == []
    assert upgrade_attempts(gw) == 0
    assert gw.services.sessions == {}
    await expect(chat.state).to_have_attribute("data-state", "disconnected")
    await expect(chat.state).to_be_hidden()  # nobody signed in: no red "Disconnected"
    assert await chat.states() == ["disconnected"]


async def open_link(pages: Pages, gw: Gateway, token: str, *, shows: str) -> ChatPage:
    chat = await pages.open(gw.base_url, fragment=f"token={token}", shows=shows)
    # The token leaves the address bar at once, whatever happens next.
    assert chat.page.url == gw.base_url + "/"
    assert await chat.page.evaluate("location.hash") == ""
    return chat


async def test_a_sign_in_link_names_who_it_signs_in_as_and_does_not_connect(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages() as gw:
        victim = await open_link(
            pages, gw, gw.token("mallory", name="Mallory"), shows="#link-signin-panel"
        )
        page = victim.page
        panel = page.get_by_role("region", name="Sign in with this link?")
        await expect(panel).to_have_id("link-signin-panel")
        await expect(panel).to_have_accessible_description(
            re.compile(r"^This link signs you in as Mallory \(mallory\)\. Only continue if you")
        )
        await expect(page.locator("#link-signin-name")).to_have_text("Mallory")
        await expect(page.locator("#link-signin-sub")).to_have_text("mallory")
        await expect(panel).to_contain_text("This link signs you in as Mallory (mallory).")
        await expect(panel).to_contain_text("Only continue if you asked for this link.")
        continue_button = page.get_by_role("button", name="Continue as Mallory", exact=True)
        await expect(continue_button).to_have_id("link-signin-continue")
        await expect(page.get_by_role("button", name="Cancel", exact=True)).to_have_id(
            "link-signin-cancel"
        )
        await expect(page.locator("#link-signin-heading")).to_be_focused()
        await expect(page.locator("#signin-panel")).to_be_hidden()
        await expect(page.locator("#chat")).to_be_hidden()
        await expect(page.locator("#signout")).to_be_hidden()
        await assert_never_connected(victim, gw)
        # Enter on what has focus does not accept: only the button does.
        await page.keyboard.press("Enter")
        await expect(continue_button).to_be_visible()
        await assert_never_connected(victim, gw)
        victim.assert_clean()


async def test_b_cancel_discards_the_link_and_shows_the_sign_in_form(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages() as gw:
        victim = await open_link(
            pages, gw, gw.token("mallory", name="Mallory"), shows="#link-signin-panel"
        )
        page = victim.page
        await page.get_by_role("button", name="Cancel", exact=True).click()
        await expect(page.locator("#signin-panel")).to_be_visible()
        await expect(page.locator("#link-signin-panel")).to_be_hidden()
        await expect(page.locator("#chat")).to_be_hidden()
        await expect(page.get_by_label("Display name")).to_be_focused()
        await assert_never_connected(victim, gw)
        # Gone for good: a reload shows the plain form, and nothing connects.
        await page.reload()
        await expect(page.locator("#signin-panel")).to_be_visible()
        await expect(page.locator("#link-signin-panel")).to_be_hidden()
        await assert_never_connected(victim, gw)
        # The form signs in as the reader, not as the link's user.
        await victim.sign_in("zoe")
        assert await victim.user_id() != "mallory"
        await expect(page.locator("#me")).to_have_text("zoe")
        victim.assert_clean()


async def test_c_continue_signs_in_as_the_links_user(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages() as gw:
        victim = await open_link(
            pages, gw, gw.token("mallory", name="Mallory"), shows="#link-signin-panel"
        )
        page = victim.page
        await page.get_by_role("button", name="Continue as Mallory", exact=True).click()
        await expect(page.locator("#me")).to_have_attribute("data-user-id", "mallory")
        await expect(page.locator("#me")).to_have_text("Mallory")
        await victim.wait_in_room("lobby")
        await expect(victim.state).to_have_text("Connected")
        await expect(page.locator("#link-signin-panel")).to_be_hidden()
        await expect(page.locator("#signin-panel")).to_be_hidden()
        assert await victim.states() == ["disconnected", "connecting", "connected"]
        assert [s.principal.user_id for s in gw.services.sessions.values()] == ["mallory"]
        assert len(victim.sockets) == 1
        await victim.send("hello from the link")
        assert victim.frames_of("received", "chat")[-1].data["from"] == {
            "id": "mallory",
            "name": "Mallory",
        }
        victim.assert_clean()


def _expired_token(gw: Gateway) -> str:
    return mint_token(gw.settings, sub="mallory", name="Mallory", now=time.time() - 7200)


class _RawUtf8(json.JSONEncoder):
    """Writes non-ASCII as UTF-8, as many JWT libraries do (PyJWT escapes it by default)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "ensure_ascii": False})


def _signed(gw: Gateway, claims: dict[str, Any], *, raw_utf8: bool = False) -> str:
    """A token signed with the gateway's secret, with exactly ``claims``."""
    secret = gw.settings.jwt_secret
    assert secret is not None
    token = jwt.encode(
        claims, secret.get(), algorithm="HS256", json_encoder=_RawUtf8 if raw_utf8 else None
    )
    if raw_utf8:  # what the case is for: bytes over 0x7F in the payload, not \u escapes
        assert not base64.urlsafe_b64decode(token.split(".")[1] + "==").isascii()
    return token


def _token_without_sub(gw: Gateway) -> str:
    return _signed(gw, {"name": "Mallory", "exp": int(time.time()) + 3600})


@pytest.mark.parametrize(
    ("make_token", "code", "text"),
    [
        (_expired_token, "link-expired", "This sign-in link has expired: ask for a new one."),
        (
            lambda gw: "not-a-jwt",
            "link-invalid",
            "This sign-in link is not valid: ask for a new one.",
        ),
        (_token_without_sub, "link-invalid", "This sign-in link is not valid: ask for a new one."),
    ],
    ids=["expired", "malformed", "no-sub"],
)
async def test_d_an_expired_or_malformed_link_is_refused_without_connecting(
    serve_pages: StartGateway,
    pages: Pages,
    make_token: Callable[[Gateway], str],
    code: str,
    text: str,
) -> None:
    async with serve_pages() as gw:
        victim = await open_link(pages, gw, make_token(gw), shows="#signin-panel")
        page = victim.page
        await expect(victim.notice).to_have_attribute("data-code", code)
        await expect(victim.notice).to_have_text(text)
        await expect(victim.notice).to_be_visible()
        await expect(page.locator("#link-signin-panel")).to_be_hidden()
        await expect(page.locator("#chat")).to_be_hidden()
        await expect(page.get_by_label("Display name")).to_be_focused()
        await assert_never_connected(victim, gw)
        await expect(victim.notice).to_have_attribute("data-code", code)  # it stays
        victim.assert_clean()


@pytest.mark.parametrize("raw_utf8", [True, False], ids=["utf8-payload", "escaped-payload"])
async def test_e_link_names_render_as_text_in_utf8(
    serve_pages: StartGateway, pages: Pages, raw_utf8: bool
) -> None:
    name = 'Zoë 🦊 <img src=x onerror="window.__pwned=1">'
    async with serve_pages() as gw:
        claims = {"sub": "zoë-1", "name": name, "exp": int(time.time()) + 3600}
        token = _signed(gw, claims, raw_utf8=raw_utf8)
        victim = await open_link(pages, gw, token, shows="#link-signin-panel")
        page = victim.page
        await expect(page.locator("#link-signin-name")).to_have_text(name)
        await expect(page.locator("#link-signin-sub")).to_have_text("zoë-1")
        continue_button = page.get_by_role("button", name=f"Continue as {name}", exact=True)
        await expect(continue_button).to_have_id("link-signin-continue")
        assert await page.locator("#link-signin-panel *:not(h2, p, bdi, div, button)").count() == 0
        assert await page.evaluate("typeof window.__pwned") == "undefined"
        await assert_never_connected(victim, gw)
        # The page read the name as the server does: the same text comes back in welcome.
        await continue_button.click()
        await expect(page.locator("#me")).to_have_attribute("data-user-id", "zoë-1")
        await expect(page.locator("#me")).to_have_text(name)
        assert await page.evaluate("typeof window.__pwned") == "undefined"
        victim.assert_clean()


async def test_a_chat_refused_as_overloaded_stays_pending_and_goes_once_the_server_catches_up(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages() as gw:
        ann = await pages.open(gw.base_url)
        await ann.sign_in("ann")
        bob = await gw.user("bob")
        await bob.join("lobby")
        # The server's load, held overloaded by hand (its own timer would let it go within
        # 150 ms): what a loop too busy to keep up looks like to every session.
        load = gw.services.load
        load.close()
        load.sample(0.2)
        load.sample(0.2)
        assert load.overloaded
        await ann.input.fill("when you can")
        await ann.input.press("Enter")
        await expect(ann.notice).to_contain_text("The server is busy", timeout=wait_ms(5))
        pending = ann.message("when you can")
        await expect(pending).to_have_attribute("data-status", "pending")
        await expect(pending.locator(".msg-status")).to_have_text("sending…")
        # The outbox is bounded: with one message waiting and a bound of one, the next is not
        # taken (it stays in the input) and the notice says why.
        await ann.page.evaluate("window.chatClient.maxPending = 1")
        await ann.input.fill("not yet")
        await ann.input.press("Enter")
        await expect(ann.notice).to_have_attribute("data-code", "outbox_full")
        await expect(ann.message("not yet")).to_have_count(0)
        await expect(ann.input).to_have_value("not yet")
        await ann.input.fill("")
        for _ in range(3):
            load.sample(0.0)  # caught up
        assert not load.overloaded
        # Sent again by itself after retry_after_ms (0.8 to 1.6 s here), with the same ref.
        await expect(pending).to_have_attribute("data-status", "sent", timeout=wait_ms(10))
        chat = await bob.recv_type("chat")
        assert chat["message"] == "when you can"
        sent = [f.data for f in ann.frames_of("sent", "chat")]
        assert len(sent) == 2 and sent[0]["ref"] == sent[1]["ref"]
        [refusal] = [f.data for f in ann.frames_of("received", "error")]
        assert refusal["code"] == "overloaded" and refusal["ref"] == sent[0]["ref"]
        await bob.close()
        ann.assert_clean()


# ---- 6. resume after a reconnect ----


async def cut_off(page: ChatPage, gw: Gateway, sub_name: str) -> None:
    """Take ``page`` offline and end its connection (as a drain does): it cannot come back
    until it is online again."""
    await page.context.set_offline(True)
    for session in list(gw.services.sessions.values()):
        if session.principal.name == sub_name:
            session.request_close(CloseCode.GOING_AWAY, "test: cut off")
    await expect(page.state).not_to_have_attribute("data-state", "connected")


async def test_a_page_back_from_offline_shows_what_it_missed_once_in_order_or_a_gap(
    serve_pages: StartGateway, pages: Pages
) -> None:
    async with serve_pages(GATEWAY_HISTORY_SIZE="5") as gw:
        alice = await pages.open(gw.base_url, reconnect_options={"baseMs": 200, "capMs": 1000})
        await alice.sign_in("alice")
        bob = await gw.user("bob")
        await bob.join("lobby")
        texts = alice.messages.locator(".msg-text")
        gaps = alice.page.locator("#messages > li.gap")

        async def say(*lines: str) -> None:
            for line in lines:
                await bob.request({"type": "chat", "room": "lobby", "message": line}, "chat")

        await say("one", "two")
        await expect(texts).to_have_text(["one", "two"])

        # Away while three are said (history keeps five): back with no reload, each once.
        await cut_off(alice, gw, "alice")
        await say("three", "four", "five")
        await alice.context.set_offline(False)
        await alice.wait_in_room("lobby", wait_seconds=10)
        await expect(texts).to_have_text(["one", "two", "three", "four", "five"])
        await expect(gaps).to_have_count(0)
        await alice.send("mine")

        # Away while more are said than history keeps: the newest five, after a gap marker.
        await cut_off(alice, gw, "alice")
        await say(*(f"late {n}" for n in range(8)))
        await alice.context.set_offline(False)
        await alice.wait_in_room("lobby", wait_seconds=10)
        newest = [f"late {n}" for n in range(3, 8)]
        await expect(texts).to_have_text(["one", "two", "three", "four", "five", "mine", *newest])
        await expect(gaps).to_have_count(1)
        order = await alice.page.eval_on_selector_all(
            "#messages > li",
            "items => items.map(li => li.classList.contains('gap')"
            " ? 'GAP' : li.querySelector('.msg-text').textContent)",
        )
        assert order == ["one", "two", "three", "four", "five", "mine", "GAP", *newest]
        ids = [int(i) for i in await alice.messages.evaluate_all("m => m.map(li => li.dataset.id)")]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        await bob.close()
        alice.assert_clean(server_went_down=True)


# ---- the page in production: tokens from the operator's own sign-in ----

SIGNED_OUT = "You are not signed in to this site: sign in, then choose Join chat."


@pytest.mark.parametrize(
    "token_url",
    ["/auth/chat-token", "https://auth.example.test:8443/chat-token"],
    ids=["same-origin", "other-origin"],
)
async def test_a_production_page_signs_in_through_the_operators_token_url(
    serve_pages: StartGateway, pages: Pages, token_url: str
) -> None:
    """No /dev/token: the page POSTs to GATEWAY_PAGE_TOKEN_URL with the user's cookies and
    gets its tokens there, the first and each renewal (Playwright answers for the operator's
    sign-in service; the Content-Security-Policy lets the page reach that origin only)."""
    calls: list[tuple[str, str, str]] = []
    async with serve_pages(
        GATEWAY_DEV_TOKEN_ENDPOINT="false", GATEWAY_PAGE_TOKEN_URL=token_url
    ) as gw:
        origin = gw.base_url
        cors = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}

        async def sign_in_service(route: Route) -> None:
            headers = await route.request.all_headers()
            cookie = headers.get("cookie", "")
            calls.append((route.request.method, cookie, route.request.post_data or ""))
            if "site_session=carol-session" not in cookie:
                await route.fulfill(status=401, headers=cors, body="")
                return
            token = mint_token(gw.settings, sub="carol", name="Carol", ttl_seconds=8)
            await route.fulfill(
                status=200,
                headers=cors,
                content_type="application/json",
                body=json.dumps({"token": token}),
            )

        cookie_url = token_url if token_url.startswith("https:") else origin + token_url

        async def setup(context: BrowserContext) -> None:
            await context.route(re.compile(re.escape(cookie_url)), sign_in_service)

        carol = await pages.open(gw.base_url, setup=setup)
        # Not signed in at the site: the page says so, asks for no name, opens no socket.
        await expect(carol.notice).to_have_text(SIGNED_OUT)
        await expect(carol.page.locator("#signin-name")).to_be_hidden()
        assert carol.sockets == []
        assert calls == [("POST", "", "")]

        # Signed in at the site (its cookie, sent to the token URL): Join chat. On another
        # site than the page's (as here: localhost), only a SameSite=None cookie goes along.
        await carol.context.add_cookies(
            [
                {
                    "name": "site_session",
                    "value": "carol-session",
                    "url": cookie_url,
                    "sameSite": "None",
                    "secure": True,
                }
            ]
        )
        await carol.page.get_by_role("button", name="Join chat").click()
        await carol.wait_in_room("lobby")
        await expect(carol.page.locator("#me")).to_have_text("Carol")
        await carol.send("hello from production")

        # The token lives 8 s: renewed from the same URL, sent as a refresh, same connection.
        async with asyncio.timeout(timeout(15)):
            while not any(f.data.get("type") == "refreshed" for f in carol.frames):
                await asyncio.sleep(0.1)
        assert len(calls) >= 3 and all(call[1] for call in calls[1:])
        assert len(carol.sockets) == 1
        await expect(carol.state).to_have_attribute("data-state", "connected")
        assert not [e for e in carol.console_errors if "Content Security Policy" in e]
        assert carol.page_errors == []
