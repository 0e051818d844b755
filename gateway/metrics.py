"""Prometheus metrics of one gateway process, and the listener that serves them.

The metrics live in a :class:`Metrics` of their own registry (one per app, so tests can build
many apps in one process); the process collector (``process_resident_memory_bytes``, CPU, open
files), the garbage collector and the platform collectors are registered in it too.

They are served by :class:`MetricsServer`, prometheus_client's own HTTP server on a thread of
its own, on ``GATEWAY_METRICS_HOST:GATEWAY_METRICS_PORT`` (default ``127.0.0.1:9102``), path
``/metrics``: never on the public listener. Each process serves its own; with several
processes (one per container) Prometheus scrapes each one.

Every update is O(1) and takes no label lookup: each label value's child is made once, up
front, so every series exists from the start at 0 (``rate()`` sees the first increment). Label
values come from fixed sets, never from a client: a close code a client chose (any of
3000-4999) is ``other`` unless it is one we know, so no client can grow the number of series.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from gateway.audit import EVENTS as AUDIT_EVENTS
from gateway.audit import Audit
from gateway.broker.base import DROP_REASONS
from gateway.errors import CloseCode
from gateway.protocol import CLIENT_TYPES, SERVER_TYPES

__all__ = [
    "ATTEMPT_OUTCOMES",
    "CLOSE_CODE_LABELS",
    "CONTROL_FRAME_KINDS",
    "LATENCY_BUCKETS_SECONDS",
    "OTHER",
    "REJECT_REASONS",
    "SHED_TYPES",
    "Metrics",
    "MetricsServer",
    "close_code_label",
    "frame_kind",
]

#: The label value for anything outside a fixed set.
OTHER = "other"

#: ``outcome`` of ``gateway_connection_attempts_total``: accepted, or why the upgrade was refused
#: (token: 401; origin: 403; rate: 429 too many attempts from one address; capacity: 503 server
#: full or 429 too many connections for one user; shutting_down, unavailable: 503).
ATTEMPT_OUTCOMES = (
    "accepted",
    "token",
    "origin",
    "rate",
    "capacity",
    "shutting_down",
    "unavailable",
)

#: ``reason`` of ``gateway_frames_rejected_total``: the step of the frame pipeline that refused
#: it (docs/protocol.md). size, binary and utf8 close the connection; json, schema and rate cost
#: an ``error`` reply; control is a ping, pong or fragment over the rate limit (a ping goes
#: unanswered); user_rate is a message over the user's quota across all its connections.
REJECT_REASONS = ("size", "json", "schema", "rate", "binary", "utf8", "control", "user_rate")

#: ``type`` of ``gateway_messages_shed_total``: the messages refused or dropped under overload.
SHED_TYPES = ("chat", "typing")

#: ``kind`` of ``gateway_control_frames_total``: the frames the WebSocket layer handles without
#: the frame pipeline (a fragment is a frame that does not end its message).
CONTROL_FRAME_KINDS = ("ping", "pong", "fragment")

#: Close codes with a label value of their own: RFC 6455 section 7.4.1's (those a close frame
#: may carry, plus 1005 and 1006, which stand for "none" and "dropped") and ours.
CLOSE_CODE_LABELS = frozenset(
    {str(code) for code in (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011)}
    | {str(int(code)) for code in CloseCode}
)

#: From half a millisecond (a local fan-out) to ten seconds (a client near its 4008).
LATENCY_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_TYPE_PREFIX = '{"type":"'
_LONGEST_TYPE = max(len(kind) for kind in SERVER_TYPES)


def close_code_label(code: int) -> str:
    """The ``code`` label value for a close code: itself if known, else ``other``."""
    label = str(code)
    return label if label in CLOSE_CODE_LABELS else OTHER


def frame_kind(text: str) -> str:
    """The ``type`` of a server frame serialized by :func:`gateway.protocol.encode`, in O(1).

    Our frames are dicts whose first key is ``type``, so the text starts ``{"type":"<kind>"``;
    anything else (or a type we do not send) is ``other``. Used once per broadcast, so the
    envelope needs no extra field and nothing is parsed per recipient.
    """
    if not text.startswith(_TYPE_PREFIX):
        return OTHER
    start = len(_TYPE_PREFIX)
    end = text.find('"', start, start + _LONGEST_TYPE + 1)
    kind = text[start:end] if end > 0 else ""
    return kind if kind in SERVER_TYPES else OTHER


class _QueueDepths:
    """Collector of the send queues' depths, sampled at scrape time (never on the hot path).

    ``depths`` runs on the metrics server's thread: it must only read (a ``list()`` of a dict's
    values is one step under the GIL, and so is a queue's length).
    """

    def __init__(self, depths: Callable[[], Iterable[int]]) -> None:
        self._depths = depths

    def describe(self) -> Iterator[Metric]:
        yield from self._families(0, 0)

    def collect(self) -> Iterator[Metric]:
        values = list(self._depths())
        yield from self._families(sum(values), max(values, default=0))

    @staticmethod
    def _families(total: int, deepest: int) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gateway_outbound_queue_frames",
            "Frames waiting in every connection's send queue, at scrape time.",
            value=total,
        )
        yield GaugeMetricFamily(
            "gateway_outbound_queue_max_frames",
            "Frames waiting in the fullest send queue, at scrape time "
            "(GATEWAY_SEND_QUEUE_SIZE closes it 4008).",
            value=deepest,
        )


class Metrics:
    """The gateway's metrics, in a registry of their own.

    Args:
        registry: where to register them; a new :class:`CollectorRegistry` by default.
        process: also register the process, platform and garbage-collector collectors.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.connections_open = Gauge(
            "gateway_connections_open", "Open WebSocket connections.", registry=r
        )
        attempts = Counter(
            "gateway_connection_attempts_total",
            "WebSocket upgrade attempts, by outcome.",
            ["outcome"],
            registry=r,
        )
        self._attempts = {outcome: attempts.labels(outcome) for outcome in ATTEMPT_OUTCOMES}
        disconnects = Counter(
            "gateway_disconnects_total",
            "Closed connections, by close code: ours, or the client's when it closed first "
            "(1006: dropped without a close frame).",
            ["code"],
            registry=r,
        )
        self._disconnects = {
            label: disconnects.labels(label) for label in (*sorted(CLOSE_CODE_LABELS), OTHER)
        }
        received = Counter(
            "gateway_messages_received_total",
            "Valid messages received, by type (rate-limited ones included).",
            ["type"],
            registry=r,
        )
        self._received = {kind: received.labels(kind) for kind in sorted(CLIENT_TYPES)}
        sent = Counter(
            "gateway_messages_sent_total",
            "Frames written to clients, by type.",
            ["type"],
            registry=r,
        )
        self._sent = {kind: sent.labels(kind) for kind in (*sorted(SERVER_TYPES), OTHER)}
        rejected = Counter(
            "gateway_frames_rejected_total",
            "Frames refused by the frame pipeline, by reason.",
            ["reason"],
            registry=r,
        )
        self._rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        control = Counter(
            "gateway_control_frames_total",
            "Ping, pong and fragment frames received (each takes a rate-limit token), by kind.",
            ["kind"],
            registry=r,
        )
        self._control = {kind: control.labels(kind) for kind in CONTROL_FRAME_KINDS}
        self._broker_published = Counter(
            "gateway_broker_published_total",
            "Envelopes this instance published through the broker.",
            registry=r,
        )
        self.broker_publish_seconds = Histogram(
            "gateway_broker_publish_seconds",
            "How long publishing one envelope through the broker took.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self._broker_received = Counter(
            "gateway_broker_received_total",
            "Envelopes that arrived from the broker and were delivered locally.",
            registry=r,
        )
        dropped = Counter(
            "gateway_broker_dropped_total",
            "Messages on the broker's channels that were dropped, by reason (malformed, "
            "signature, room, stale, replayed, number).",
            ["reason"],
            registry=r,
        )
        self._broker_dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}
        self.broker_reconnects = Counter(
            "gateway_broker_reconnects_total",
            "Times the broker's connection was lost and made again.",
            registry=r,
        )
        self.broadcast_latency = Histogram(
            "gateway_broadcast_latency_seconds",
            "From reading a frame to writing the broadcast it caused to each recipient's "
            "socket (from its arrival, for a broadcast from another instance).",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.event_loop_lag = Gauge(
            "gateway_event_loop_lag_seconds",
            "How late the event loop runs a timer (smoothed: rises at once, falls by halves).",
            registry=r,
        )
        self.overloaded = Gauge(
            "gateway_overloaded",
            "1 while the event loop lags more than GATEWAY_OVERLOAD_LAG_MS: new chats are "
            "refused with a retryable 'overloaded' error, typing is dropped.",
            registry=r,
        )
        shed = Counter(
            "gateway_messages_shed_total",
            "Client messages refused (chat) or dropped (typing) because the server was "
            "overloaded, by type.",
            ["type"],
            registry=r,
        )
        self._shed = {kind: shed.labels(kind) for kind in SHED_TYPES}
        security = Counter(
            "gateway_security_events_total",
            "Security decisions, by event (each also one line of the gateway.audit log): "
            "refused tokens and origins, rate limits, abuse closes, refused frames, messages on "
            "Redis that are not ours.",
            ["event"],
            registry=r,
        )
        self._security = {event: security.labels(event) for event in AUDIT_EVENTS}
        #: The audit trail: one line per security decision, counted here (gateway.audit).
        self.audit = Audit(self)
        self._duplicates = Counter(
            "gateway_chat_duplicates_total",
            "Chats not broadcast because their sender had sent the same ref to the room within "
            "GATEWAY_DEDUPE_WINDOW_SECONDS (a resend): answered with the first one's id.",
            registry=r,
        )

    def loop_lag(self, seconds: float, overloaded: bool) -> None:
        """The event loop's smoothed lag and whether publishers are pushed back (gateway.load)."""
        self.event_loop_lag.set(seconds)
        self.overloaded.set(1 if overloaded else 0)

    def shed(self, kind: str) -> None:
        """A client message of ``kind`` (chat, typing) was refused because of overload."""
        self._shed[kind].inc()

    def security_event(self, event: str) -> None:
        """A security decision (gateway.audit counts each here)."""
        self._security[event].inc()

    def duplicate(self) -> None:
        """A chat was a resend of one already broadcast (the same ``ref``): not sent again."""
        self._duplicates.inc()

    def watch_queues(self, depths: Callable[[], Iterable[int]]) -> None:
        """Report the send queues' depths at each scrape (see :class:`_QueueDepths`)."""
        self.registry.register(_QueueDepths(depths))

    def attempt(self, outcome: str) -> None:
        """Count one upgrade attempt.

        Raises:
            KeyError: ``outcome`` is not one of :data:`ATTEMPT_OUTCOMES` (a bug in the caller).
        """
        self._attempts[outcome].inc()

    def connection_opened(self) -> None:
        self.connections_open.inc()

    def connection_closed(self, code: int) -> None:
        """One accepted connection ended with close ``code``."""
        self.connections_open.dec()
        self._disconnects[close_code_label(code)].inc()

    def received(self, kind: str) -> None:
        """Count a valid message of ``kind`` (a client type: decode() admits no other)."""
        self._received[kind].inc()

    def control_frame(self, kind: str) -> None:
        """Count a frame of ``kind`` (one of :data:`CONTROL_FRAME_KINDS`)."""
        self._control[kind].inc()

    def rejected(self, reason: str) -> None:
        """Count a frame refused for ``reason`` (one of :data:`REJECT_REASONS`)."""
        self._rejected[reason].inc()

    # -- gateway.broker.BrokerObserver ------------------------------------------------------

    def broker_published(self, seconds: float) -> None:
        self._broker_published.inc()
        self.broker_publish_seconds.observe(max(0.0, seconds))

    def broker_received(self) -> None:
        self._broker_received.inc()

    def broker_dropped(self, reason: str) -> None:
        """Count a dropped broker message; ``reason`` is one of DROP_REASONS. A security
        decision too (the Redis broker logs its audit line, with the room)."""
        self._broker_dropped[reason].inc()
        self.security_event("broker_message_dropped")

    def broker_reconnected(self) -> None:
        self.broker_reconnects.inc()

    def written_many(
        self, kind: str, count: int, received_monotonic: float, now_monotonic: float
    ) -> None:
        """``count`` frames of one broadcast of ``kind`` were written to sockets at once, at
        ``now_monotonic``: one latency observation for them all (the fast path's cost per
        delivery stays a socket write, not a histogram update)."""
        self._sent.get(kind, self._sent[OTHER]).inc(count)
        self.broadcast_latency.observe(max(0.0, now_monotonic - received_monotonic))

    def written(self, kind: str, received_monotonic: float | None, now_monotonic: float) -> None:
        """A frame of ``kind`` was written to a socket at ``now_monotonic``; for a broadcast,
        observe its latency since ``received_monotonic``."""
        self._sent.get(kind, self._sent[OTHER]).inc()
        if received_monotonic is not None:
            self.broadcast_latency.observe(max(0.0, now_monotonic - received_monotonic))


class MetricsServer:
    """prometheus_client's HTTP server for ``registry``, on a daemon thread of its own.

    A thread, not the event loop: a scrape still answers while the loop is busy, and it costs
    the loop nothing but the GIL. It answers ``GET /metrics`` (prometheus_client answers every
    path alike); it has no TLS and no authentication, so bind it to a private address.

    Raises:
        OSError: the address cannot be bound (in use, not local): the gateway does not start.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        host = host.removeprefix("[").removesuffix("]")  # GATEWAY_METRICS_HOST=[::1] or ::1
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        port: int = self._server.server_port
        return port

    async def close(self) -> None:
        """Stop serving and release the port (waits for the thread's poll, at most 0.5 s)."""
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join)
