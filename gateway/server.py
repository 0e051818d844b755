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
import dataclasses
import errno
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from quart import Quart

from gateway import hypercorn_fixes
from gateway.app import SERVICES_KEY, create_app, drain
from gateway.metrics import MetricsServer
from gateway.settings import DEV_FILES_HINT, SHUTDOWN_RESERVE_SECONDS, Settings
from gateway.web import Services

__all__ = [
    "ACCESS_LOG_FORMAT",
    "AFTER_SERVING_SECONDS",
    "GC_YOUNG_THRESHOLD",
    "SERVER_STOP_SECONDS",
    "StartupError",
    "build_config",
    "check_files",
    "listen",
    "listening_url",
    "run",
    "run_workers",
    "serve",
    "tune_gc",
    "worker_settings",
]

log = logging.getLogger("gateway.server")

#: Remote address, request line without the query string, status, bytes, microseconds.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(D)s'
#: Hypercorn's graceful timeout, after the drain: every WebSocket is closed or abandoned by
#: then, so this only ends idle keep-alive connections and cancels what the drain abandoned.
SERVER_STOP_SECONDS = 1.0
#: Hypercorn's lifespan shutdown timeout: the after-serving hooks (close the broker).
AFTER_SERVING_SECONDS = SHUTDOWN_RESERVE_SECONDS - SERVER_STOP_SECONDS


class StartupError(Exception):
    """The gateway cannot start: one line for the operator that names the setting to change."""


def _why(error: OSError) -> str:
    """An OSError in words, with what an operator usually does about it."""
    if isinstance(error, socket.gaierror):
        return f"the host name does not resolve ({error.strerror})"
    hints = {
        errno.EADDRINUSE: "another process listens there (another gateway?); choose a free port",
        errno.EADDRNOTAVAIL: "not an address of this machine",
        errno.EACCES: "not allowed (ports below 1024 need privileges)",
    }
    what = error.strerror or str(error)
    hint = hints.get(error.errno or 0)
    return f"{what}: {hint}" if hint else what


def check_files(settings: Settings) -> list[str]:
    """What stops the server from using its TLS files, before it tries (empty when nothing).

    The settings check cannot tell: it runs for ``token`` too, and in development the files
    are defaults relative to the working directory, made by ``python -m gateway dev-setup``.
    """
    if settings.tls != "on" or settings.tls_cert_file is None or settings.tls_key_file is None:
        return []  # production without them is refused by the settings check
    problems: list[str] = []
    for name, path in (
        ("GATEWAY_TLS_CERT_FILE", settings.tls_cert_file),
        ("GATEWAY_TLS_KEY_FILE", settings.tls_key_file),
    ):
        try:
            with path.open("rb"):
                pass
        except FileNotFoundError:
            where = "" if path.is_absolute() else f" in the working directory {Path.cwd()}"
            problems.append(
                f"{name}: {path} does not exist{where}"
                + ("" if settings.is_production else f"; {DEV_FILES_HINT}")
            )
        except OSError as error:
            problems.append(f"{name}: cannot read {path}: {error.strerror or error}")
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_password() -> bytes:
        raise ValueError("encrypted")

    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file, no_password)
    except (ssl.SSLError, ValueError) as error:
        return [
            f"GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE cannot be used together ({error}): "
            "each must be PEM, the key must be the certificate's and not encrypted"
        ]
    return []


def listen(settings: Settings) -> socket.socket:
    """The listening socket on GATEWAY_HOST:GATEWAY_PORT (a port 0 becomes a free one).

    Raises:
        StartupError: it cannot be bound, saying why and which setting to change.
    """
    host = settings.host.removeprefix("[").removesuffix("]")
    try:
        # IPv4 unless the host is an IPv6 literal, as Hypercorn binds: a name that resolves
        # to both (localhost) listens where IPv4 clients look for it.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        *_, address = socket.getaddrinfo(
            host, settings.port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(settings.backlog)
        except BaseException:
            sock.close()
            raise
    except OSError as error:
        raise StartupError(
            f"cannot listen on GATEWAY_HOST={settings.host} GATEWAY_PORT={settings.port}: "
            f"{_why(error)}"
        ) from None
    return sock


def listening_url(settings: Settings, sock: socket.socket) -> str:
    """The URL a browser on this machine would open for ``sock``."""
    scheme = "https" if settings.tls == "on" else "http"
    host = "localhost" if settings.host in {"127.0.0.1", "::1"} else settings.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{host}:{sock.getsockname()[1]}/"


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
        StartupError: the metrics address cannot be bound.
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
    try:
        server = MetricsServer(
            settings.metrics_host, settings.metrics_port, services.metrics.registry
        )
    except OSError as error:
        raise StartupError(
            f"cannot serve metrics on GATEWAY_METRICS_HOST={settings.metrics_host} "
            f"GATEWAY_METRICS_PORT={settings.metrics_port}: {_why(error)} "
            "(GATEWAY_METRICS_PORT=0 turns the listener off)"
        ) from None
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


#: CPython collects its youngest generation every this many net allocations (default 700).
#: A gateway allocates a few hundred long-lived objects per connection, and CPython makes a
#: full collection (every object in the process: 100 to 300 ms with thousands of connections)
#: each time the long-lived ones grew by a quarter and enough young collections ran: with the
#: default, a storm of 3,000 connections cost 12 full collections, 3.8 s of CPU, most of its
#: handshake time. Young collections this much rarer make the full ones rarer by as much; the
#: price is up to this many objects of cyclic garbage waiting a little longer.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Set the garbage collector up for a long-lived server with many connections: what start-up
    made (modules, classes, settings) is frozen out of every later collection (``gc.freeze``;
    before forking workers, it also keeps those pages shared), and young collections run every
    :data:`GC_YOUNG_THRESHOLD` allocations. Called by :func:`run`, never by tests that serve in
    their own process."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run(settings: Settings, sock: socket.socket) -> None:
    """Blocking entry point for ``python -m gateway serve``: serve ``sock`` (from :func:`listen`)
    from one process, or with ``GATEWAY_WORKERS`` > 1 from a supervisor of that many worker
    processes (:func:`run_workers`).

    Raises:
        StartupError: the gateway could not start (the metrics address cannot be bound).
        SystemExit: with a worker's failing status, when one failed.
    """
    tune_gc()
    if settings.workers == 1:
        asyncio.run(serve(settings, fd=sock.detach()))  # Hypercorn owns (and closes) it now
        return
    status = run_workers(settings, sock)
    if status != 0:
        raise SystemExit(status)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: its own metrics port (the configured one plus the index)."""
    port = settings.metrics_port + index if settings.metrics_port else 0
    return dataclasses.replace(settings, metrics_port=port, workers=1)


def run_workers(settings: Settings, sock: socket.socket) -> int:
    """Serve from ``settings.workers`` processes that share the listening ``sock``, each a whole
    gateway (its own broker connection, presence entries, metrics port): settings.py requires
    a Redis broker and limits store for this, so they behave as one gateway, like instances.

    The supervisor forks the workers before any event loop or thread
    exists, forwards SIGTERM and SIGINT to them (each drains as a single process does), and
    waits. If a worker exits on its own, the others are stopped the same way.

    Returns:
        0 when every worker exited cleanly, else the first failing worker's status.
    """
    pids: list[int] = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker: serve, then leave without running the parent's clean-up
            code = 1
            try:
                fd = os.dup(sock.fileno())  # Hypercorn owns (and closes) the one it is given
                sock.close()
                asyncio.run(serve(worker_settings(settings, index), fd=fd))
                code = 0
            except StartupError as error:
                log.error("gateway cannot start", extra={"worker": index, "problem": str(error)})
                code = 2
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    sock.close()
    log.info("workers started", extra={"workers": settings.workers, "pids": pids})

    def forward(signum: int, _frame: object) -> None:
        for child in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        remaining = set(pids)
        while remaining:
            pid, wait_status = os.wait()
            if pid not in remaining:
                continue
            remaining.discard(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code != 0:
                log.error("worker exited", extra={"pid": pid, "status": code})
                if status == 0:
                    status = code if code > 0 else 1
                    forward(signal.SIGTERM, None)  # one is gone: stop the rest cleanly
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
