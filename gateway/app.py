"""``create_app(settings)``: the one place that wires the gateway together, in order.

settings -> metrics -> verifier -> room policy -> broker -> hub -> quota store -> limits -> routes.
Pools, background connections and heartbeats open in ``before_serving`` and close in
``after_serving``, so tests that use ``async with app.test_app()`` and the real server run the
same start-up. The metrics are made here but served by server.py, so tests through Quart's test
client bind no port.

:func:`drain` is the graceful shutdown: not ready at once, new upgrades refused, and the open
connections closed with 1001 in batches spread over ``GATEWAY_SHUTDOWN_SPREAD_SECONDS``, so
thousands of clients do not all reconnect (to the other instances) in the same second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from quart import Quart

from gateway.auth import TokenVerifier
from gateway.broker import create_broker
from gateway.connection import BoundedWebsocketConnection
from gateway.errors import CloseCode
from gateway.hub import Hub
from gateway.hypercorn_fixes import WriteCoalescing
from gateway.load import LoadMonitor
from gateway.metrics import Metrics
from gateway.quotas import ConnectAttemptLimiter, QuotaStore, UserMessageQuota
from gateway.rooms import RoomPolicy
from gateway.settings import SHUTDOWN_RESERVE_SECONDS, Settings
from gateway.slots import ConnectionSlots
from gateway.web import Services, create_blueprint

__all__ = ["MIN_BATCH_INTERVAL_SECONDS", "SERVICES_KEY", "close_batches", "create_app", "drain"]

log = logging.getLogger("gateway.app")

#: Where the app keeps its :class:`~gateway.web.Services` (``app.extensions[SERVICES_KEY]``).
SERVICES_KEY = "gateway"
#: The shortest time between two batches of closes: at most 20 wake-ups a second, however
#: many connections there are.
MIN_BATCH_INTERVAL_SECONDS = 0.05

T = TypeVar("T")


def create_app(settings: Settings) -> Quart:
    """Build the Quart application for ``settings`` (already validated by load_settings)."""
    app = Quart(__name__, static_folder=None)
    app.asgi_websocket_class = BoundedWebsocketConnection
    # Quart's own body caps: nothing we serve takes a large request.
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.config["BODY_TIMEOUT"] = 10

    metrics = Metrics()
    broker = create_broker(settings, metrics)
    # One store (one Redis pool) for the attempts, the slots and the message quota.
    store = QuotaStore(settings.ratelimit_storage_url, ca_file=settings.redis_ca_file)
    services = Services(
        settings=settings,
        verifier=TokenVerifier(settings),
        policy=RoomPolicy(settings.open_rooms),
        broker=broker,
        hub=Hub(broker, metrics=metrics, presence_max_members=settings.presence_max_members),
        attempts=ConnectAttemptLimiter(settings.connect_rate, store),
        slots=ConnectionSlots(
            settings.max_connections,
            settings.max_connections_per_user,
            store=store,
            ttl_seconds=settings.presence_ttl_seconds,
        ),
        quota=UserMessageQuota(settings.user_message_rate, store),
        metrics=metrics,
        load=LoadMonitor(settings.overload_lag_ms / 1000, [metrics, WriteCoalescing()]),
    )
    sessions = services.sessions
    # On the metrics server's thread: list() of a dict's values is one step under the GIL.
    metrics.watch_queues(lambda: [session.outbox.depth for session in list(sessions.values())])
    app.extensions[SERVICES_KEY] = services
    app.register_blueprint(create_blueprint(services))

    @app.before_serving
    async def start() -> None:
        await services.hub.start()
        services.load.start()
        await services.slots.start()

    @app.after_serving
    async def stop() -> None:
        # Connections still open leave their rooms through the broker: close them first.
        await drain(app)
        services.load.close()
        await services.hub.close()
        await services.broker.close()
        await services.slots.close()
        await store.close()

    return app


def close_batches(items: Sequence[T], spread_seconds: float) -> list[tuple[float, Sequence[T]]]:
    """Split ``items`` into batches evenly spaced over ``spread_seconds``, in order.

    Returns:
        ``(offset_seconds, batch)`` pairs: the first batch at 0, the last before
        ``spread_seconds``; at most one batch per :data:`MIN_BATCH_INTERVAL_SECONDS`, their
        sizes differing by one at most. One batch at 0 when ``spread_seconds`` is 0.
    """
    if not items:
        return []
    count = min(len(items), max(1, int(spread_seconds / MIN_BATCH_INTERVAL_SECONDS)))
    interval_seconds = spread_seconds / count
    return [
        (k * interval_seconds, items[k * len(items) // count : (k + 1) * len(items) // count])
        for k in range(count)
    ]


async def drain(
    app: Quart,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Shut down gracefully: refuse new upgrades (503 ``shutting_down``) and answer /readyz 503
    at once, then close every open connection with 1001 (RFC 6455 section 7.4.1: going away),
    in batches spread over ``GATEWAY_SHUTDOWN_SPREAD_SECONDS``, and wait until they are gone.

    The order is that of the connection ids, which are random. A connection that has not
    closed by the deadline, ``GATEWAY_SHUTDOWN_GRACE_SECONDS`` less
    :data:`~gateway.settings.SHUTDOWN_RESERVE_SECONDS` after the drain began, is abandoned:
    Hypercorn's graceful timeout (server.py) then cancels it, within the reserve.

    server.py calls this as soon as a shutdown is asked for: Hypercorn only runs the
    ``after_serving`` hooks after its connections have ended (or its graceful timeout has
    cancelled them, which the client sees as 1011 or 1006, not 1001). Calling it again is
    harmless (the deadline stays that of the first call); an app not made by
    :func:`create_app` is left alone.

    Args:
        clock: monotonic time, for the schedule and the deadline.
        sleep: waits between batches.
    """
    services = app.extensions.get(SERVICES_KEY)
    if not isinstance(services, Services):
        return
    settings = services.settings
    services.draining = True
    started = services.drain_started_monotonic
    if started is None:
        started = services.drain_started_monotonic = clock()
        log.info(
            "draining",
            extra={
                "connections": len(services.sessions),
                "spread_seconds": settings.shutdown_spread_seconds,
                "grace_seconds": settings.shutdown_grace_seconds,
            },
        )
    deadline = started + settings.shutdown_grace_seconds - SHUTDOWN_RESERVE_SECONDS
    ordered = sorted(services.sessions.items())
    for offset_seconds, batch in close_batches(ordered, settings.shutdown_spread_seconds):
        if not services.sessions:
            break
        delay_seconds = min(started + offset_seconds, deadline) - clock()
        if delay_seconds > 0:
            await sleep(delay_seconds)
        for conn_id, session in batch:
            if services.sessions.get(conn_id) is session:  # not gone by itself meanwhile
                session.request_close(CloseCode.GOING_AWAY)
    remaining_seconds = deadline - clock()
    if services.sessions and remaining_seconds > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining_seconds):
                await services.no_sessions.wait()
    if services.sessions:
        log.warning("shutdown grace ran out", extra={"abandoned": len(services.sessions)})
