"""Real-browser helpers: headless Chromium through async Playwright, and a gateway that stops and
starts again on one port, so a page can lose its server and find it again at the same address.

The browser is Debian's ``/usr/bin/chromium`` (Playwright's own browser download is never used).
Every wait is bounded by :func:`wait_ms`, a few seconds scaled by ``tests.helpers.timeout``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    Locator,
    Page,
    WebSocket,
    async_playwright,
    expect,
)

from gateway.app import SERVICES_KEY, create_app
from gateway.server import serve
from gateway.settings import Settings
from tests.e2e.conftest import Gateway
from tests.helpers import make_settings, timeout

__all__ = [
    "ARTIFACTS_DIR",
    "CHROMIUM",
    "LAUNCH_ARGS",
    "ChatPage",
    "Frame",
    "RestartableGateway",
    "gateway_env",
    "launch_chromium",
    "open_chat",
    "require_chromium",
    "wait_ms",
]

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
#: Screenshots land here (git-ignored), under the repository root.
ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "test-artifacts"

#: Console errors a page logs while its server is down: the connection attempts it makes.
_REFUSED = re.compile(
    r"ERR_CONNECTION_REFUSED|ERR_CONNECTION_RESET|WebSocket connection to .* failed"
)

#: Records every value of #conn-state[data-state], in order (window.__connStates).
_STATE_RECORDER = """
window.__connStates = [];
document.addEventListener("DOMContentLoaded", () => {
  const badge = document.getElementById("conn-state");
  const push = (state) => {
    const all = window.__connStates;
    if (state && all[all.length - 1] !== state) all.push(state);
  };
  push(badge.dataset.state);
  new MutationObserver((records) => {
    records.slice(1).forEach((r) => push(r.oldValue));
    push(badge.dataset.state);
  }).observe(badge, { attributes: true, attributeFilter: ["data-state"], attributeOldValue: true });
});
"""


def wait_ms(seconds: float) -> float:
    """A Playwright timeout (milliseconds) of ``seconds``, scaled for slow machines."""
    return timeout(seconds) * 1000


def require_chromium() -> str:
    """The Chromium executable.

    Raises:
        pytest.fail.Exception: ``/usr/bin/chromium`` is missing and ``CI=true``: CI must run
            the browser tests (``.ci/run`` installs it).
        pytest.skip.Exception: it is missing elsewhere (the only skip in the suite).
    """
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: apt-get install chromium fonts-dejavu-core"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return str(CHROMIUM)


@asynccontextmanager
async def launch_chromium() -> AsyncIterator[Browser]:
    """Headless Debian Chromium (see :func:`require_chromium`), closed on exit."""
    executable = require_chromium()
    expect.set_options(timeout=wait_ms(5))  # every expect(...) default, scaled like the rest
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=list(LAUNCH_ARGS), timeout=wait_ms(30)
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass(frozen=True)
class Frame:
    """One WebSocket frame the page sent or received, parsed, with when Python saw it."""

    direction: str  # "sent" or "received"
    data: dict[str, Any]
    monotonic_seconds: float


@dataclass
class ChatPage:
    """A chat page in its own browser context (its own storage: one person)."""

    context: BrowserContext
    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    #: The URL of every WebSocket the page opened (or tried to), in order.
    sockets: list[str] = field(default_factory=list)

    # ---- the hooks listed at the top of static/app.js ----
    @property
    def state(self) -> Locator:
        return self.page.locator("#conn-state")

    @property
    def notice(self) -> Locator:
        return self.page.locator("#notice")

    @property
    def input(self) -> Locator:
        return self.page.locator("#message-input")

    @property
    def send_button(self) -> Locator:
        return self.page.locator("#send-button")

    @property
    def messages(self) -> Locator:
        return self.page.locator("#messages > li.msg")

    @property
    def members(self) -> Locator:
        return self.page.locator("#members > li[data-user-id]")

    @property
    def members_more(self) -> Locator:
        """A large room's "and N more" line, under its sample of members."""
        return self.page.locator("#members > li.members-more")

    @property
    def member_count(self) -> Locator:
        return self.page.locator("#member-count")

    @property
    def typing(self) -> Locator:
        return self.page.locator("#typing")

    def message(self, text: str) -> Locator:
        """The message whose text is exactly ``text``."""
        return self.messages.filter(
            has=self.page.locator(".msg-text").get_by_text(text, exact=True)
        )

    def room_button(self, room: str) -> Locator:
        return self.page.locator(f'#rooms button.room[data-room="{room}"]')

    # ---- actions ----
    async def sign_in(self, name: str) -> None:
        """Sign in through the form (the dev token endpoint) and wait to be in the lobby."""
        await self.page.get_by_label("Display name").fill(name)
        await self.page.get_by_role("button", name="Join chat").click()
        await self.wait_in_room("lobby")

    async def wait_in_room(self, room: str, wait_seconds: float = 5) -> None:
        await expect(self.state).to_have_attribute(
            "data-state", "connected", timeout=wait_ms(wait_seconds)
        )
        await expect(self.room_button(room)).to_have_attribute(
            "data-joined", "true", timeout=wait_ms(wait_seconds)
        )
        await expect(self.input).to_be_enabled(timeout=wait_ms(wait_seconds))

    async def send(self, text: str) -> Locator:
        """Type ``text``, press Enter, and wait for the server's acknowledgement."""
        await self.input.fill(text)
        await self.input.press("Enter")
        sent = self.message(text).and_(self.page.locator('[data-status="sent"][data-own="true"]'))
        await expect(sent).to_have_count(1, timeout=wait_ms(5))
        return sent

    async def user_id(self) -> str:
        value = await self.page.locator("#me").get_attribute("data-user-id")
        assert value, "no #me[data-user-id]: not signed in"
        return value

    async def client(self, expression: str) -> Any:
        """Evaluate ``window.chatClient.<expression>`` in the page."""
        return await self.page.evaluate(f"window.chatClient.{expression}")

    async def states(self) -> list[str]:
        """Every connection state the page has shown, in order, without repeats."""
        states: list[str] = await self.page.evaluate("window.__connStates")
        return states

    def frames_of(self, direction: str, kind: str) -> list[Frame]:
        return [f for f in self.frames if f.direction == direction and f.data.get("type") == kind]

    def assert_clean(self, *, server_went_down: bool = False) -> None:
        """No uncaught error, and no console error but refused connections while the server
        was down."""
        assert self.page_errors == []
        allowed = _REFUSED if server_went_down else None
        unexpected = [e for e in self.console_errors if not (allowed and allowed.search(e))]
        assert unexpected == []

    # ---- wiring ----
    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _on_page_error(self, error: Error) -> None:
        self.page_errors.append(f"{error.name}: {error.message}")

    def _on_websocket(self, ws: WebSocket) -> None:
        self.sockets.append(ws.url)

        def record(direction: str) -> Callable[[str | bytes], None]:
            def handler(payload: str | bytes) -> None:
                try:
                    data = json.loads(payload)
                except ValueError:
                    data = {"type": None, "raw": payload}
                now = time.monotonic()
                # Batched delivery: a received frame may hold an array of messages, in order.
                for message in data if isinstance(data, list) else [data]:
                    self.frames.append(Frame(direction, message, now))

            return handler

        ws.on("framesent", record("sent"))
        ws.on("framereceived", record("received"))


async def open_chat(
    browser: Browser,
    base_url: str,
    *,
    reconnect_options: Mapping[str, float] | None = None,
    fragment: str = "",
    shows: str = "#signin-panel",
    setup: Callable[[BrowserContext], Awaitable[None]] | None = None,
) -> ChatPage:
    """A new context and page on the chat page, at the sign-in form.

    Args:
        reconnect_options: merged into ``window.chatClient.reconnectOptions`` by an init script
            that runs before app.js (baseMs, capMs, stableMs).
        fragment: opens ``/#<fragment>`` instead (``token=<jwt>``: a sign-in link).
        shows: the panel the page must show once open (``#link-signin-panel`` for a link).
        setup: runs on the new context before the page opens (routes, cookies).
    """
    context = await browser.new_context(
        ignore_https_errors=True, viewport={"width": 960, "height": 600}
    )
    context.set_default_timeout(wait_ms(5))
    await context.add_init_script(script=_STATE_RECORDER)
    if reconnect_options is not None:
        options = json.dumps(dict(reconnect_options))
        await context.add_init_script(
            script=f"window.chatClient = {{reconnectOptions: {options}}};"
        )
    if setup is not None:
        await setup(context)
    page = await context.new_page()
    chat = ChatPage(context, page)
    page.on("console", chat._on_console)
    page.on("pageerror", chat._on_page_error)
    page.on("websocket", chat._on_websocket)
    await page.goto(base_url + "/" + (f"#{fragment}" if fragment else ""), timeout=wait_ms(10))
    await expect(page.locator(shows)).to_be_visible()
    return chat


def gateway_env(tls_files: tuple[Path, Path], **env: str) -> Settings:
    """Settings like ``start_gateway``'s: the session's certificate, no connect-rate limit."""
    cert_file, key_file = tls_files
    return make_settings(
        {
            "GATEWAY_TLS_CERT_FILE": str(cert_file),
            "GATEWAY_TLS_KEY_FILE": str(key_file),
            "GATEWAY_CONNECT_RATE": "1000/minute",
            **env,
        }
    )


class RestartableGateway:
    """A gateway on one fixed port that a test stops and starts again.

    Every run serves a new app built from the same :class:`Settings`, so the development
    secret, and every token already issued, stay valid across a restart.
    """

    def __init__(self, settings: Settings, client_ssl: ssl.SSLContext) -> None:
        self.settings = settings
        self.client_ssl = client_ssl
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._stop: asyncio.Event | None = None
        self._server: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> Gateway:
        """Listen on the port again; a :class:`Gateway` for this run."""
        assert self._server is None, "already running"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(self.settings.backlog)
        except OSError:
            sock.close()
            raise
        app = create_app(self.settings)
        self._stop = asyncio.Event()
        self._server = asyncio.create_task(
            serve(self.settings, app=app, fd=sock.detach(), shutdown_trigger=self._stop.wait)
        )
        for _ in range(5):
            await asyncio.sleep(0)
        if self._server.done():
            self._server.result()
            raise AssertionError(f"the server on port {self.port} stopped while starting")
        return Gateway(self.settings, app.extensions[SERVICES_KEY], self.port, self.client_ssl)

    async def stop(self) -> None:
        """Shut down gracefully (open connections get 1001) and free the port."""
        server, stop = self._server, self._stop
        if server is None or stop is None:
            return
        self._server = self._stop = None
        stop.set()
        async with asyncio.timeout(timeout(15)):
            await server
