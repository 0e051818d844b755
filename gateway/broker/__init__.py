"""Fan-out between connections and instances, chosen by URL scheme.

``memory://`` is one process (:class:`~gateway.broker.memory.MemoryBroker`); ``redis://`` and
``rediss://`` are meant for several instances sharing a Redis (``gateway.broker.redis``,
imported only when asked for, so the redis package stays optional).
"""

from __future__ import annotations

import importlib
from typing import cast
from urllib.parse import urlsplit

from gateway.broker.base import (
    Broker,
    BrokerObserver,
    Deliver,
    Envelope,
    Member,
    MemberLeft,
    MemberPage,
    Once,
    RoomUpdate,
)
from gateway.broker.memory import MemoryBroker
from gateway.settings import Settings

__all__ = [
    "Broker",
    "BrokerObserver",
    "Deliver",
    "Envelope",
    "Member",
    "MemberLeft",
    "MemberPage",
    "MemoryBroker",
    "Once",
    "RoomUpdate",
    "create_broker",
]

_REDIS_MODULE = "gateway.broker.redis"


def create_broker(settings: Settings, observer: BrokerObserver | None = None) -> Broker:
    """The broker that ``GATEWAY_BROKER_URL`` names.

    Args:
        settings: the URL (``memory://``, or ``redis://host:port/db`` / ``rediss://...``),
            and for Redis the envelope key, the CA file and the presence TTL.
        observer: told of publishes, receipts, drops and reconnects (the metrics).

    Raises:
        ValueError: on another scheme, or when the Redis broker cannot be loaded. The URL
            itself is never repeated in the message: it may carry a password.
    """
    url = settings.broker_url
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBroker(settings.history_size, settings.history_ttl_seconds)
    if scheme in ("redis", "rediss"):
        try:
            module = importlib.import_module(_REDIS_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name == _REDIS_MODULE:
                raise ValueError(
                    "the redis broker is not available in this version of the gateway; "
                    "use GATEWAY_BROKER_URL=memory:// (a single instance)"
                ) from None
            if exc.name is not None and exc.name.partition(".")[0] == "redis":
                raise ValueError(
                    "the redis broker needs the redis package: pip install 'gateway[redis]'"
                ) from None
            raise
        return cast(Broker, module.RedisBroker(settings, observer))
    raise ValueError(f"broker URL must be memory:// or redis://, not {scheme or '(none)'}://")
