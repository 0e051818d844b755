"""Serve the app with Hypercorn, configured field by field from :class:`Settings`.

Never ``Config.from_mapping``: it silently drops unknown keys, so a typo would quietly run
with a default. The access log format names only the path (``%(r)s``), never the query string
where a browser's ``access_token`` travels.

:func:`serve` also starts the metrics listener (``GATEWAY_METRICS_PORT``, not the public
port), and on SIGTERM or SIGINT drains the app (:func:`gateway.app.drain`) before Hypercorn
stops. The whole stop fits in ``GATEWAY_SHUTDOWN_GRACE_SECONDS``: the drain takes at most the
grace less :data:`~gateway.settings.SHUTDOWN_RESERVE_SECONDS`, and the reserve is Hypercorn's
graceful timeout (:data:`SERVER_STOP_SECONDS`: cancel what the drain abandoned) plus its
lifespan shutdown timeout (:data:`AFTER_SERVING_SECONDS`: close the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from quart import Quart

from gateway import hypercorn_fixes
from gateway.app import SERVICES_KEY, create_app, drain
from gateway.metrics import MetricsServer
from gateway.settings import SHUTDOWN_RESERVE_SECONDS, Settings
from gateway.web import Services

__all__ = [
    "ACCESS_LOG_FORMAT",
    "AFTER_SERVING_SECONDS",
    "SERVER_STOP_SECONDS",
    "build_config",
    "serve",
]

log = logging.getLogger("gateway.server")

#: Remote address, request line without the query string, status, bytes, microseconds.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(D)s'
#: Hypercorn's graceful timeout, after the drain: every WebSocket is closed or abandoned by
#: then, so this only ends idle keep-alive connections and cancels what the drain abandoned.
SERVER_STOP_SECONDS = 1.0
#: Hypercorn's lifespan shutdown timeout: the after-serving hooks (close the broker).
AFTER_SERVING_SECONDS = SHUTDOWN_RESERVE_SECONDS - SERVER_STOP_SECONDS


def _bind_address(host: str, port: int) -> str:
    host = host.removeprefix("[").removesuffix("]")  # GATEWAY_HOST=[::] or ::
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_config(settings: Settings, *, fd: int | None = None) -> Config:
    """The Hypercorn configuration for ``settings``.

    Args:
        fd: serve this already-bound socket (Hypercorn takes ownership) instead of binding
            GATEWAY_HOST and GATEWAY_PORT; tests bind port 0 and pass the descriptor.
    """
    config = Config()
    config.bind = [f"fd://{fd}" if fd is not None else _bind_address(settings.host, settings.port)]
    if settings.tls == "on":
        config.certfile = str(settings.tls_cert_file)
        config.keyfile = str(settings.tls_key_file)
    # HTTP/1.1 only: browsers upgrade WebSockets over it, and it keeps HTTP/2's attack surface out.
    config.alpn_protocols = ["http/1.1"]
    config.backlog = settings.backlog
    config.websocket_max_message_size = settings.max_message_bytes
    config.websocket_ping_interval = settings.ping_interval_seconds or None
    config.include_server_header = False
    config.ssl_handshake_timeout = 10
    config.keep_alive_timeout = 5
    config.h11_max_incomplete_size = 16 * 1024
    config.accesslog = logging.getLogger("gateway.access")
    config.errorlog = logging.getLogger("gateway.server")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.logger_class = hypercorn_fixes.SafeAccessLogger
    config.graceful_timeout = SERVER_STOP_SECONDS
    config.shutdown_timeout = AFTER_SERVING_SECONDS
    return config


async def serve(
    settings: Settings,
    *,
    app: Quart | None = None,
    fd: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run the gateway until ``shutdown_trigger`` returns (or SIGINT/SIGTERM without one).

    Then, before Hypercorn stops, new upgrades are refused with 503 and open connections are
    closed with 1001, spread over the configured window (:func:`gateway.app.drain`);
    Hypercorn's own graceful stop would otherwise wait ``graceful_timeout`` for connections
    that never end by themselves, then cancel them.

    Raises:
        OSError: the metrics address cannot be bound.
    """
    hypercorn_fixes.install(permessage_deflate=settings.permessage_deflate)
    config = build_config(settings, fd=fd)
    application = app if app is not None else create_app(settings)
    trigger = shutdown_trigger if shutdown_trigger is not None else _stop_signal

    async def drain_then_stop() -> None:
        await trigger()
        await drain(application)

    async with _metrics_listener(settings, application):
        await hypercorn_serve(application, config, shutdown_trigger=drain_then_stop)


@contextlib.asynccontextmanager
async def _metrics_listener(settings: Settings, app: Quart) -> AsyncIterator[None]:
    """Serve the app's metrics on GATEWAY_METRICS_HOST:GATEWAY_METRICS_PORT while in the block
    (nothing when the port is 0, or the app has no metrics)."""
    services = app.extensions.get(SERVICES_KEY)
    if settings.metrics_port == 0 or not isinstance(services, Services):
        yield
        return
    server = MetricsServer(settings.metrics_host, settings.metrics_port, services.metrics.registry)
    log.info(
        "metrics listening",
        extra={"host": settings.metrics_host, "port": server.port, "path": "/metrics"},
    )
    try:
        yield
    finally:
        await server.close()


async def _stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM; a second one gets the default (immediate) end."""
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, received.set)
    try:
        await received.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def run(settings: Settings) -> None:
    """Blocking entry point for ``python -m gateway serve``."""
    asyncio.run(serve(settings))
