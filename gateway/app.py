"""``create_app(settings)``: the one place that wires the gateway together, in order.

settings -> verifier -> room policy -> broker -> hub -> limits -> routes. Pools and background
connections open in ``before_serving`` and close in ``after_serving``, so tests that use
``async with app.test_app()`` and the real server run the same start-up.
"""

from __future__ import annotations

import asyncio
import contextlib

from quart import Quart

from gateway.auth import TokenVerifier
from gateway.broker import create_broker
from gateway.connection import BoundedWebsocketConnection
from gateway.errors import CloseCode
from gateway.hub import Hub
from gateway.ratelimit import ConnectAttemptLimiter, ConnectionSlots
from gateway.rooms import RoomPolicy
from gateway.settings import Settings
from gateway.web import Services, create_blueprint

__all__ = ["SERVICES_KEY", "create_app", "drain"]

#: Where the app keeps its :class:`~gateway.web.Services` (``app.extensions[SERVICES_KEY]``).
SERVICES_KEY = "gateway"
#: How long shutdown waits for open connections to close before it closes the broker.
SHUTDOWN_CLOSE_SECONDS = 5.0


def create_app(settings: Settings) -> Quart:
    """Build the Quart application for ``settings`` (already validated by load_settings)."""
    app = Quart(__name__, static_folder=None)
    app.asgi_websocket_class = BoundedWebsocketConnection
    # Quart's own body caps: nothing we serve takes a large request.
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.config["BODY_TIMEOUT"] = 10

    broker = create_broker(settings.broker_url)
    services = Services(
        settings=settings,
        verifier=TokenVerifier(settings),
        policy=RoomPolicy(settings.open_rooms),
        broker=broker,
        hub=Hub(broker),
        attempts=ConnectAttemptLimiter(settings.connect_rate, settings.ratelimit_storage_url),
        slots=ConnectionSlots(settings.max_connections, settings.max_connections_per_user),
    )
    app.extensions[SERVICES_KEY] = services
    app.register_blueprint(create_blueprint(services))

    @app.before_serving
    async def start() -> None:
        await services.hub.start()

    @app.after_serving
    async def stop() -> None:
        # Connections still open leave their rooms through the broker: close them first.
        await drain(app)
        await services.broker.close()
        await services.attempts.close()

    return app


async def drain(app: Quart, timeout_seconds: float = SHUTDOWN_CLOSE_SECONDS) -> None:
    """Refuse new upgrades (503 ``shutting_down``), close every open connection with 1001 (RFC
    6455 section 7.4.1: going away) and wait, at most ``timeout_seconds``, until they are gone.

    server.py calls this as soon as a shutdown is asked for: Hypercorn only runs the
    ``after_serving`` hooks after its connections have ended (or its graceful timeout has
    cancelled them, which the client sees as 1011 or 1006, not 1001). Calling it again is
    harmless; an app not made by :func:`create_app` is left alone.
    """
    services = app.extensions.get(SERVICES_KEY)
    if not isinstance(services, Services):
        return
    services.draining = True
    for session in list(services.sessions.values()):
        session.request_close(CloseCode.GOING_AWAY)
    if services.sessions:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds):
                await services.no_sessions.wait()
