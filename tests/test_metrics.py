"""Tests for gateway.metrics, and for the places that feed it: the session's frame pipeline,
the hub's one-item-per-broadcast delivery, the connection's writer, and the listener.

Values are read from each test's own registry (``Metrics(process=False)`` unless the process
collector is the subject), so tests never see each other's counts.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.broker import Envelope, MemoryBroker
from gateway.connection import run_connection
from gateway.errors import CloseCode, ConnectionClosing
from gateway.hub import RECEIVED_MONOTONIC, Hub
from gateway.metrics import (
    ATTEMPT_OUTCOMES,
    CLOSE_CODE_LABELS,
    OTHER,
    REJECT_REASONS,
    Metrics,
    MetricsServer,
    close_code_label,
    frame_kind,
)
from gateway.outbox import Outgoing, Put
from gateway.protocol import CLIENT_TYPES, SERVER_TYPES, encode
from gateway.ratelimit import Verdict
from tests.helpers import timeout
from tests.test_connection import FakeSocket
from tests.test_session import NOW_SECONDS, World, send

__all__: list[str] = []


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name} {labels}"
    return found


def series(metrics: Metrics, family: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``family``'s ``_total`` counter."""
    return [
        sample.labels
        for metric in metrics.registry.collect()
        if metric.name == family
        for sample in metric.samples
        if sample.name == f"{family}_total"
    ]


# --- labels --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SERVER_TYPES))
def test_frame_kind_reads_the_type_of_every_frame_we_encode(kind: str) -> None:
    text = encode({"type": kind, "room": "lobby", "ref": "r"})
    assert frame_kind(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"type":"',
        '{"type":"cha',  # cut short
        '{"type":"chatter"}',  # not a type we send
        '{"type":"' + "x" * 10_000 + '"}',  # long: the search is bounded, the answer "other"
        '{"room":"lobby","type":"chat"}',  # type not first: not our encoding
        '{ "type": "chat"}',
        '{"type":"welcome\\u0000"}',
    ],
)
def test_frame_kind_of_anything_else_is_other(text: str) -> None:
    assert frame_kind(text) == OTHER


def test_close_code_labels_are_a_fixed_set_a_client_cannot_grow() -> None:
    assert close_code_label(1000) == "1000"
    assert close_code_label(1006) == "1006"
    assert close_code_label(4029) == "4029"
    metrics = Metrics(process=False)
    for code in range(3000, 5000):  # every code a client may put in its close frame
        metrics.connection_opened()
        metrics.connection_closed(code)
    labels = {labels["code"] for labels in series(metrics, "gateway_disconnects")}
    assert labels == CLOSE_CODE_LABELS | {OTHER}
    assert value(metrics, "gateway_disconnects_total", code=OTHER) == 2000 - 3  # 4001 4008 4029
    assert value(metrics, "gateway_connections_open") == 0


# --- the Metrics object ----------------------------------------------------------------------


def test_every_series_exists_at_zero_from_the_start() -> None:
    metrics = Metrics(process=False)
    for outcome in ATTEMPT_OUTCOMES:
        assert value(metrics, "gateway_connection_attempts_total", outcome=outcome) == 0
    for reason in REJECT_REASONS:
        assert value(metrics, "gateway_frames_rejected_total", reason=reason) == 0
    for kind in CLIENT_TYPES:
        assert value(metrics, "gateway_messages_received_total", type=kind) == 0
    for kind in SERVER_TYPES | {OTHER}:
        assert value(metrics, "gateway_messages_sent_total", type=kind) == 0
    assert value(metrics, "gateway_connections_open") == 0
    assert value(metrics, "gateway_broadcast_latency_seconds_count") == 0


def test_counters_move_one_label_at_a_time() -> None:
    metrics = Metrics(process=False)
    metrics.attempt("accepted")
    metrics.attempt("accepted")
    metrics.attempt("origin")
    metrics.received("chat")
    metrics.rejected("utf8")
    assert value(metrics, "gateway_connection_attempts_total", outcome="accepted") == 2
    assert value(metrics, "gateway_connection_attempts_total", outcome="origin") == 1
    assert value(metrics, "gateway_connection_attempts_total", outcome="token") == 0
    assert value(metrics, "gateway_messages_received_total", type="chat") == 1
    assert value(metrics, "gateway_messages_received_total", type="join") == 0
    assert value(metrics, "gateway_frames_rejected_total", reason="utf8") == 1


@pytest.mark.parametrize("method", ["attempt", "rejected", "received"])
def test_a_label_outside_the_fixed_set_is_a_bug_not_a_new_series(method: str) -> None:
    metrics = Metrics(process=False)
    with pytest.raises(KeyError):
        getattr(metrics, method)("mallory-was-here")


def test_open_connections_and_disconnects() -> None:
    metrics = Metrics(process=False)
    metrics.connection_opened()
    metrics.connection_opened()
    assert value(metrics, "gateway_connections_open") == 2
    metrics.connection_closed(1000)
    assert value(metrics, "gateway_connections_open") == 1
    assert value(metrics, "gateway_disconnects_total", code="1000") == 1
    assert value(metrics, "gateway_disconnects_total", code="1001") == 0


def test_written_counts_by_type_and_observes_only_broadcasts() -> None:
    metrics = Metrics(process=False)
    metrics.written("pong", None, 100.0)  # a direct reply: no latency
    assert value(metrics, "gateway_messages_sent_total", type="pong") == 1
    assert value(metrics, "gateway_broadcast_latency_seconds_count") == 0
    metrics.written("chat", 99.997, 100.0)
    metrics.written("not-a-type", 100.5, 100.0)  # a clock step backwards is 0, not negative
    assert value(metrics, "gateway_messages_sent_total", type="chat") == 1
    assert value(metrics, "gateway_messages_sent_total", type=OTHER) == 1
    assert value(metrics, "gateway_broadcast_latency_seconds_count") == 2
    assert value(metrics, "gateway_broadcast_latency_seconds_sum") == pytest.approx(0.003)
    assert value(metrics, "gateway_broadcast_latency_seconds_bucket", le="0.0025") == 1  # the 0
    assert value(metrics, "gateway_broadcast_latency_seconds_bucket", le="0.005") == 2


def test_queue_depths_are_sampled_at_scrape_time_only() -> None:
    metrics = Metrics(process=False)
    depths: list[int] = []
    calls: list[int] = []

    def sample() -> list[int]:
        calls.append(1)
        return depths

    metrics.watch_queues(sample)
    assert calls == []  # registering describes; it does not sample
    assert value(metrics, "gateway_outbound_queue_frames") == 0
    assert value(metrics, "gateway_outbound_queue_max_frames") == 0
    depths.extend([3, 0, 250])
    assert value(metrics, "gateway_outbound_queue_frames") == 253
    assert value(metrics, "gateway_outbound_queue_max_frames") == 250


def test_the_process_collector_reports_resident_memory() -> None:
    metrics = Metrics()
    assert value(metrics, "process_resident_memory_bytes") > 1024 * 1024
    assert Metrics(process=False).registry.get_sample_value("process_resident_memory_bytes") is None


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()  # the same names twice: no clash
    one.attempt("token")
    assert value(two, "gateway_connection_attempts_total", outcome="token") == 0
    shared = CollectorRegistry()
    Metrics(shared, process=False)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(shared, process=False)


# --- the frame pipeline counts what it refuses ----------------------------------------------


async def test_the_session_counts_messages_by_type_and_refusals_by_step() -> None:
    world = await World({"GATEWAY_RATE_PER_SECOND": "1", "GATEWAY_RATE_BURST": "3"}).start()
    s = await world.session("alice")
    metrics = world.metrics
    await send(s, type="join", room="lobby")
    await send(s, type="ping")
    await send(s, raw="{")  # json
    await send(s, raw='{"type":"ping","colour":"red"}')  # schema
    await send(s, type="join", room="secret")  # refused by the handler: not a pipeline step
    await send(s, type="ping")  # the bucket is empty now (join, ping, join): rate
    assert s.meter_frame("pong") is Verdict.REFUSE  # a control frame without a token: control
    assert value(metrics, "gateway_control_frames_total", kind="pong") == 1
    assert value(metrics, "gateway_control_frames_total", kind="ping") == 0
    assert value(metrics, "gateway_messages_received_total", type="join") == 2
    assert value(metrics, "gateway_messages_received_total", type="ping") == 2
    rejected = {
        reason: value(metrics, "gateway_frames_rejected_total", reason=reason)
        for reason in REJECT_REASONS
    }
    assert rejected == {
        "size": 0,
        "json": 1,
        "schema": 1,
        "rate": 1,
        "binary": 0,
        "utf8": 0,
        "control": 1,
        "user_rate": 0,
    }
    assert s.refused == 5


@pytest.mark.parametrize(
    ("data", "reason"), [(b"{}", "binary"), (None, "binary"), ("x" * 16385, "size")]
)
async def test_frames_that_close_are_counted(data: bytes | str | None, reason: str) -> None:
    world = await World().start()
    s = await world.session("alice")
    with pytest.raises(ConnectionClosing):
        await s.handle_frame(data)
    assert value(world.metrics, "gateway_frames_rejected_total", reason=reason) == 1


async def test_only_the_first_refusal_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    world = await World({"GATEWAY_MAX_INVALID_MESSAGES": "100"}).start()
    s = await world.session("alice")
    caplog.set_level("DEBUG", logger="gateway.session")
    for _ in range(50):  # a flood of bad frames
        await send(s, raw='{"type":"ping","token":"eyJ.secret.sig"}')
    records = [r for r in caplog.records if r.msg == "message refused"]
    assert [r.levelname for r in records] == ["INFO"] + ["DEBUG"] * 49
    first = records[0].__dict__
    assert (first["conn_id"], first["user_id"], first["client"]) == (s.conn_id, "alice", s.client)
    assert first["code"] == "invalid_message"
    assert "secret" not in caplog.text  # never the frame


# --- one item per broadcast, stamped at receipt ---------------------------------------------


async def test_a_broadcast_is_one_shared_item_stamped_with_the_receipt_time() -> None:
    world = await World().start()
    alice, bob, carol = await world.sessions("alice", "bob", "carol")
    for s in (alice, bob, carol):
        await send(s, type="join", room="lobby")
    await send(carol, type="leave", room="lobby")
    for s in (alice, bob):
        await send(s, type="ping")  # drain the presence frames
    RECEIVED_MONOTONIC.set(1234.5)  # what the reader sets for the frame it read
    await alice.handle_frame('{"type":"chat","room":"lobby","message":"hi","ref":"c1"}')
    [to_bob] = [await bob.outbox.get() for _ in range(bob.outbox.depth)]
    [to_alice] = [await alice.outbox.get() for _ in range(alice.outbox.depth)]
    assert (to_bob.kind, to_bob.received_monotonic) == ("chat", 1234.5)
    assert (to_alice.kind, to_alice.received_monotonic) == ("chat", 1234.5)
    assert orjson.loads(to_alice.text)["ref"] == "c1"  # the sender's own copy
    assert "ref" not in orjson.loads(to_bob.text)


async def test_every_recipient_gets_the_same_object() -> None:
    broker = MemoryBroker()
    hub = Hub(broker, monotonic=lambda: 77.0)
    await hub.start()
    got: list[Outgoing] = []

    class Member:
        def __init__(self, conn_id: str) -> None:
            self.conn_id = conn_id
            self.user_id = conn_id

        def deliver(self, item: Outgoing) -> Put:
            got.append(item)
            return Put.QUEUED

    for n in range(100):
        hub.attach("r", Member(f"c{n}"))
    hub.deliver(Envelope("r", encode({"type": "typing", "room": "r"})))  # from another instance
    assert len(got) == 100
    assert all(item is got[0] for item in got)  # serialized once, not even copied per recipient
    assert (got[0].kind, got[0].received_monotonic) == ("typing", 77.0)  # stamped on arrival
    await broker.close()


async def test_direct_replies_carry_no_receipt_time(world: World) -> None:
    s = await world.session("alice")
    await s.handle_frame('{"type":"ping"}')
    item = await s.outbox.get()
    assert (item.kind, item.received_monotonic) == ("pong", None)


# --- the writer observes after each write ---------------------------------------------------


async def test_the_writer_counts_frames_and_observes_the_broadcast_latency() -> None:
    world = await World().start()
    session = await world.session("alice")
    socket = FakeSocket().feed(
        '{"type":"join","room":"lobby"}', '{"type":"chat","room":"lobby","message":"hi"}'
    )
    task = asyncio.create_task(run_connection(socket.socket(), session, clock=lambda: NOW_SECONDS))
    assert await socket.wait_sent(3) == ["welcome", "joined", "chat"]
    session.request_close(CloseCode.GOING_AWAY)
    async with asyncio.timeout(timeout(5)):
        await task
    metrics = world.metrics
    assert value(metrics, "gateway_messages_sent_total", type="welcome") == 1
    assert value(metrics, "gateway_messages_sent_total", type="joined") == 1
    assert value(metrics, "gateway_messages_sent_total", type="chat") == 1
    assert value(metrics, "gateway_broadcast_latency_seconds_count") == 1  # the chat alone
    assert 0 <= value(metrics, "gateway_broadcast_latency_seconds_sum") < timeout(5)


@pytest.fixture
async def world() -> World:
    return await World().start()


# --- the listener ------------------------------------------------------------------------------


def fetch(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"x" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_the_listener_serves_the_registry_and_lets_go_of_its_port() -> None:
    metrics = Metrics()
    metrics.attempt("rate")
    server = MetricsServer("127.0.0.1", 0, metrics.registry)
    try:
        status, text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        assert 'gateway_connection_attempts_total{outcome="rate"} 1.0' in text
        assert "process_resident_memory_bytes" in text
        status, _ = await asyncio.to_thread(
            fetch, f"http://127.0.0.1:{server.port}/metrics", "POST"
        )
        assert status == 405  # read-only
    finally:
        async with asyncio.timeout(timeout(5)):
            await server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=timeout(5)).close()


async def test_a_port_in_use_fails_loudly() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            MetricsServer("127.0.0.1", taken.getsockname()[1], Metrics(process=False).registry)
    finally:
        taken.close()
