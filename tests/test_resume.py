"""Tests of a join that replays a room's history (gateway.session, docs/protocol.md, History
and resume): ``since`` and ``history``, ``recovered``, the seam with live traffic, bounds."""

from __future__ import annotations

from typing import Any

from gateway.broker import MemoryBroker
from gateway.history import Recovery, SinceError
from tests.test_session import Frame, World, drain, send


async def chat(world: World, *texts: str) -> list[int]:
    """``texts`` said in lobby by a user of their own; their ids."""
    speaker = await world.session("speaker")
    await send(speaker, type="join", room="lobby")
    ids = []
    for text in texts:
        frames = await send(speaker, type="chat", room="lobby", message=text)
        ids += [f["id"] for f in frames if f["type"] == "chat"]
    return ids


def chats(frames: list[Frame]) -> list[str]:
    return [f["message"] for f in frames if f["type"] == "chat"]


async def test_since_replays_what_followed_after_joined_and_says_it_is_complete() -> None:
    world = await World().start()
    ids = await chat(world, "one", "two", "three")
    alice = await world.session("alice")
    frames = await send(alice, type="join", room="lobby", since=ids[0], ref="j")
    assert frames[0]["type"] == "joined" and frames[0]["recovered"] is True
    assert "oldest_id" not in frames[0]
    assert chats(frames[1:]) == ["two", "three"]
    assert [f["id"] for f in frames[1:] if f["type"] == "chat"] == ids[1:]
    assert all("ref" not in f for f in frames[1:])
    # Live traffic follows as before.
    await chat(world, "four")
    assert chats(await drain(alice)) == ["four"]


async def test_a_since_older_than_history_is_not_recovered_and_names_the_oldest() -> None:
    world = await World({"GATEWAY_HISTORY_SIZE": "2"}, broker=MemoryBroker(2)).start()
    ids = await chat(world, "one", "two", "three", "four")
    alice = await world.session("alice")
    frames = await send(alice, type="join", room="lobby", since=ids[0])
    assert (frames[0]["recovered"], frames[0]["oldest_id"]) == (False, ids[2])
    assert chats(frames[1:]) == ["three", "four"]


async def test_a_newcomer_may_ask_for_the_last_chats_and_a_plain_join_gets_none() -> None:
    world = await World().start()
    await chat(world, "one", "two", "three")
    alice, bob = await world.sessions("alice", "bob")
    frames = await send(alice, type="join", room="lobby", history=2)
    assert "recovered" not in frames[0]
    assert chats(frames[1:]) == ["two", "three"]
    assert chats(await send(bob, type="join", room="lobby")) == []


async def test_a_since_from_the_future_is_refused_and_leaves_nothing_behind() -> None:
    world = await World({"GATEWAY_RATE_PER_SECOND": "1000", "GATEWAY_RATE_BURST": "1000"}).start()
    ids = await chat(world, "one")
    alice = await world.session("alice")
    frames = await send(alice, type="join", room="lobby", since=ids[0] + 5, ref="j")
    assert [(f["type"], f.get("code"), f.get("ref")) for f in frames] == [
        ("error", "since_ahead", "j")
    ]
    assert "lobby" not in alice.joined
    assert [m.id for m in await world.broker.members("lobby")] == ["speaker"]
    assert world.hub.seat("lobby", alice.conn_id) is None
    # Not held against the client (its rooms' ids restarted, not its fault): more of them
    # than GATEWAY_MAX_INVALID_MESSAGES never close it with 1008; it joins again without since.
    for _ in range(world.settings.max_invalid_messages + 5):
        await send(alice, type="join", room="lobby", since=ids[0] + 5)
    assert alice.close_code is None
    assert (await send(alice, type="join", room="lobby"))[0]["type"] == "joined"


async def test_bad_since_and_history_are_invalid_messages() -> None:
    world = await World().start()
    alice = await world.session("alice")
    bad_fields: list[dict[str, Any]] = [
        {"since": -1},
        {"since": "3"},
        {"since": 1.5},
        {"since": 2**53},
        {"history": 0},
        {"since": 1, "history": 1},
    ]
    for bad in bad_fields:
        frames = await send(alice, type="join", room="lobby", **bad)
        assert [(f["type"], f["code"]) for f in frames] == [("error", "invalid_message")], bad


class RacingBroker(MemoryBroker):
    """A memory broker in which, while a history is being read, someone says something."""

    def __init__(self) -> None:
        super().__init__()
        self.during_read: list[str] = []
        self.world: World | None = None

    async def history(self, room: str, since: int | None, limit: int) -> Recovery | SinceError:
        recovery = await super().history(room, since, limit)
        if self.world is not None and self.during_read:
            texts, self.during_read = self.during_read, []
            # Published after the history was read: only the live delivery (the seam) has it.
            await chat(self.world, *texts)
        return recovery


async def test_a_chat_published_while_the_replay_is_read_arrives_once_after_it() -> None:
    broker = RacingBroker()
    world = await World(broker=broker).start()
    broker.world = world
    ids = await chat(world, "one", "two")
    alice = await world.session("alice")
    broker.during_read = ["three"]
    frames = await send(alice, type="join", room="lobby", since=ids[0])
    assert frames[0]["type"] == "joined" and frames[0]["recovered"] is True
    assert chats(frames[1:]) == ["two", "three"]  # the replay, then what was held: once each
    got = [f["id"] for f in frames if f["type"] == "chat"]
    assert got == sorted(set(got))
    assert world.hub.seat("lobby", alice.conn_id) is alice


async def test_a_replay_fits_in_half_the_send_queue() -> None:
    world = await World({"GATEWAY_SEND_QUEUE_SIZE": "4"}).start()
    ids = await chat(world, *(str(n) for n in range(6)))
    alice = await world.session("alice")
    frames = await send(alice, type="join", room="lobby", since=ids[0] - 1)
    assert frames[0]["recovered"] is False
    assert chats(frames[1:]) == ["4", "5"]  # the newest two: half of 4
    assert alice.close_code is None


async def test_a_resent_ref_is_acknowledged_with_the_first_id_and_not_broadcast_again() -> None:
    world = await World().start()
    alice, bob = await world.sessions("alice", "bob")
    for session in (alice, bob):
        await send(session, type="join", room="lobby")
    await drain(alice)
    first = await send(alice, type="chat", room="lobby", message="hi", ref="r1")
    assert [f["ref"] for f in first] == ["r1"]
    world.wall_seconds += 5
    again = await send(alice, type="chat", room="lobby", message="hi", ref="r1")
    assert again == first  # the same acknowledgement: same id, same ts
    assert chats(await drain(bob)) == ["hi"]  # the room saw it once
    assert world.metrics.registry.get_sample_value("gateway_chat_duplicates_total") == 1
    # Another ref, or no ref at all, is another message.
    other = await send(alice, type="chat", room="lobby", message="hi", ref="r2")
    assert other[0]["id"] == first[0]["id"] + 1
    await send(alice, type="chat", room="lobby", message="hi")
    assert chats(await drain(bob)) == ["hi", "hi"]


async def test_dedupe_can_be_turned_off() -> None:
    world = await World({"GATEWAY_DEDUPE_WINDOW_SECONDS": "0"}).start()
    alice = await world.session("alice")
    await send(alice, type="join", room="lobby")
    first = await send(alice, type="chat", room="lobby", message="hi", ref="r1")
    again = await send(alice, type="chat", room="lobby", message="hi", ref="r1")
    assert again[0]["id"] == first[0]["id"] + 1
