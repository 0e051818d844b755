"""The Redis broker's keys and Lua scripts: each operation on a room's ids or presence is one
script, so it is atomic however many instances run it at once.

Keys of a room (``{room}`` is a hash tag: a room's keys would share a Redis Cluster slot):

- ``gateway:room:{<room>}:seq``, a string: the room's last chat id (:data:`PUBLISH_NUMBERED`).
- ``gateway:room:{<room>}:history``, a stream of the room's last chats (at most the history
  size: ``MAXLEN``), each with fields ``id`` (the chat id), ``at`` (Redis's clock, ms) and
  ``data`` (the sealed envelope, as published), added by the same script that takes the id and
  publishes, so history and live delivery have one order; it expires with the history TTL
  after the room's last chat (:data:`HISTORY_READ` drops older entries).
- ``gateway:room:{<room>}:conns``, a sorted set: one entry per connection present on any
  instance (:func:`conn_entry`: the user, the owning instance, the connection), scored with the
  time (Redis's clock, ms) it expires unless its instance's heartbeat refreshes it.
- ``gateway:room:{<room>}:users``, a hash: user id -> how many entries the user has.
- ``gateway:room:{<room>}:names``, a hash: user id -> the name last recorded for the user.
- ``gateway:room:{<room>}:told``, a string, only while the room is large: the member count the
  last ``room`` update told (:data:`ROOM_PUBLISH`); deleted with the room's last user.

The presence keys (:func:`presence_keys`, in that order: ``KEYS[1..4]`` of the presence
scripts) carry an expiry that every write refreshes, so a room nobody refreshes any more
disappears. Scores and expiries use Redis's clock (``TIME``), never the instances'.

A large room costs each script O(limit), not O(users): the count is ``HLEN`` of the users, a
page is ``HRANDFIELD`` with a count; only a room of at most ``limit`` users is read whole
(``HGETALL``). Expired entries are pruned at most ``ARGV[1]`` per script.
"""

from __future__ import annotations

__all__ = [
    "HISTORY_READ",
    "MEMBERS_PAGE",
    "PRESENCE_ADD",
    "PRESENCE_PRUNE",
    "PRESENCE_REMOVE",
    "PUBLISH_NUMBERED",
    "ROOM_PUBLISH",
    "ROOM_UPDATE",
    "conn_entry",
    "counter_key",
    "history_key",
    "once_key",
    "presence_keys",
]


def _key(room: str, what: str) -> str:
    return f"gateway:room:{{{room}}}:{what}"


def counter_key(room: str) -> str:
    """The key of ``room``'s chat id counter."""
    return _key(room, "seq")


def history_key(room: str) -> str:
    """The key of ``room``'s history stream."""
    return _key(room, "history")


def once_key(room: str, key: str) -> bytes:
    """The key remembering idempotency key ``key`` of ``room`` (the user and the ``ref``)."""
    return _key(room, "once:").encode() + key.encode("utf-8", "surrogatepass")


def presence_keys(room: str) -> list[str]:
    """``room``'s presence keys: connections, user counts, names, the count last told (the
    scripts' ``KEYS``)."""
    return [_key(room, "conns"), _key(room, "users"), _key(room, "names"), _key(room, "told")]


def conn_entry(user_id: bytes, instance: bytes, conn_id: bytes) -> bytes:
    """The entry of connection ``conn_id`` of ``user_id`` owned by ``instance``:
    ``<length of user_id>:<user_id><instance>:<conn_id>``, so the scripts can read the user
    back (:data:`PRESENCE_PRUNE`) whatever bytes it holds. Two users' connections never share
    an entry, even with the same connection id."""
    return b"%d:%s%s:%s" % (len(user_id), user_id, instance, conn_id)


#: Redis's clock in ms; forgetting one connection entry: if it was its user's last, the user
#: is forgotten too and ``user, name`` is added to ``gone`` (and with the room's last user, the
#: count last told); and forgetting at most ``limit`` expired entries, their users in ``gone``.
_PRELUDE = """
local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function forget(entry, user, gone)
  if redis.call("ZREM", KEYS[1], entry) == 0 then return end
  if redis.call("HINCRBY", KEYS[2], user, -1) > 0 then return end
  gone[#gone + 1] = user
  gone[#gone + 1] = redis.call("HGET", KEYS[3], user) or ""
  redis.call("HDEL", KEYS[2], user)
  redis.call("HDEL", KEYS[3], user)
  if redis.call("EXISTS", KEYS[2]) == 0 then redis.call("DEL", KEYS[4]) end
end

local function prune(limit, gone)
  local now = string.format("%.0f", now_ms())
  local expired = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now, "LIMIT", 0, limit)
  for _, entry in ipairs(expired) do
    local colon = string.find(entry, ":", 1, true)
    local size = colon and tonumber(string.sub(entry, 1, colon - 1))
    if size then
      forget(entry, string.sub(entry, colon + 1, colon + size), gone)
    else
      redis.call("ZREM", KEYS[1], entry)  -- not an entry of ours: never mind whose
    end
  end
end
"""

#: ``KEYS``: the room's counter, its history stream, and for an idempotent publish its key
#: (:func:`once_key`). ``ARGV``: the channel, the sealed envelope, the counter's expiry (ms),
#: the history size (0: keep none), the history's expiry (ms), and for an idempotent publish
#: how long its key lasts (ms) and the stamp to keep with it. Takes the next id, keeps the
#: envelope in the history under it, and publishes ``<id>|<envelope>``, as one step; returns
#: the id; or, when the idempotency key exists, publishes nothing and returns its value,
#: ``<id>:<stamp>`` (a string, where a publish returns an integer).
#: A counter that does not exist (a new room, or a Redis restarted empty) starts from Redis's
#: clock in microseconds, never below an id given before (unless more than one id per
#: microsecond was taken on average), and below 2**53 until the year 2255.
PUBLISH_NUMBERED = """
if KEYS[3] then
  local prior = redis.call("GET", KEYS[3])
  if prior then return prior end
end
if redis.call("EXISTS", KEYS[1]) == 0 then
  local t = redis.call("TIME")
  redis.call("SET", KEYS[1], t[1] .. string.format("%06d", tonumber(t[2])))
end
local id = redis.call("INCR", KEYS[1])
local digits = string.format("%.0f", id)
redis.call("PEXPIRE", KEYS[1], ARGV[3])
if tonumber(ARGV[4]) > 0 then
  local t = redis.call("TIME")
  local at = string.format("%.0f", tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call("XADD", KEYS[2], "MAXLEN", ARGV[4], "*", "id", digits, "at", at, "data", ARGV[2])
  redis.call("PEXPIRE", KEYS[2], ARGV[5])
end
redis.call("PUBLISH", ARGV[1], digits .. "|" .. ARGV[2])
if KEYS[3] then redis.call("SET", KEYS[3], digits .. ":" .. ARGV[7], "PX", ARGV[6]) end
return id
"""

#: ``KEYS``: the counter, the history stream. Returns Redis's clock (ms), the room's last id
#: (0 before its first chat) and every entry of the stream (``[stream id, [field, value,
#: ...]]``, oldest first: at most the history size).
HISTORY_READ = """
local t = redis.call("TIME")
local now = string.format("%.0f", tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local last = redis.call("GET", KEYS[1]) or "0"
return {now, last, redis.call("XRANGE", KEYS[2], "-", "+")}
"""

#: ``ARGV``: an entry's lifetime (ms), the keys' expiry (ms), ``add`` (record the names given)
#: or ``keep`` (a heartbeat: keep the names recorded), then ``user, name, entry`` per
#: connection. Records or refreshes each entry (re-creating it when missing); returns, per
#: connection, 1 when its user had no entry in the room before it, else 0.
PRESENCE_ADD = (
    _PRELUDE
    + """
local expire_at = string.format("%.0f", now_ms() + tonumber(ARGV[1]))
local firsts = {}
for i = 4, #ARGV, 3 do
  local user, name, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local first = 0
  if not redis.call("ZSCORE", KEYS[1], entry) then
    if redis.call("HINCRBY", KEYS[2], user, 1) == 1 then first = 1 end
  end
  redis.call("ZADD", KEYS[1], expire_at, entry)
  if ARGV[3] == "add" then
    redis.call("HSET", KEYS[3], user, name)
  else
    redis.call("HSETNX", KEYS[3], user, name)
  end
  firsts[#firsts + 1] = first
end
for i = 1, #KEYS do redis.call("PEXPIRE", KEYS[i], ARGV[2]) end
return firsts
"""
)

#: ``ARGV``: ``user, entry`` per connection. Forgets those entries; returns ``user, name`` for
#: each user whose last entry that was.
PRESENCE_REMOVE = (
    _PRELUDE
    + """
local gone = {}
for i = 1, #ARGV, 2 do forget(ARGV[i + 1], ARGV[i], gone) end
return gone
"""
)

#: ``ARGV``: at most how many expired entries to forget, and ``list`` to list the room too.
#: Forgets expired entries (their instance stopped refreshing them); returns ``{gone}``, or
#: ``{gone, names}`` when listing: ``gone`` holds ``user, name`` for each user whose last
#: entry expired, ``names`` ``user, name`` for each user present.
PRESENCE_PRUNE = (
    _PRELUDE
    + """
local gone = {}
prune(ARGV[1], gone)
if ARGV[2] == "list" then return {gone, redis.call("HGETALL", KEYS[3])} end
return {gone}
"""
)

#: ``ARGV``: at most how many expired entries to forget, at most how many users to list (at
#: least 1). Prunes as :data:`PRESENCE_PRUNE`; returns ``{gone, count, names}``: ``count`` users
#: are present, ``names`` holds ``user, name`` for every one of them when they are at most the
#: limit, else for that many of them (random ones: ``HRANDFIELD`` costs O(limit)).
MEMBERS_PAGE = (
    _PRELUDE
    + """
local gone = {}
prune(ARGV[1], gone)
local count = redis.call("HLEN", KEYS[2])
if count <= tonumber(ARGV[2]) then return {gone, count, redis.call("HGETALL", KEYS[3])} end
return {gone, count, redis.call("HRANDFIELD", KEYS[3], ARGV[2], "WITHVALUES")}
"""
)

#: ``ARGV``: at most how many expired entries to forget, the limit above which a room is large.
#: Prunes as :data:`PRESENCE_PRUNE`, then says whether the room is due an update
#: (``Broker.room_update``; nothing recorded): returns ``{gone, count, 0}`` when not,
#: ``{gone, count, 1}`` for a large room whose count is not the one last told,
#: ``{gone, count, 2, names}`` for a room at or under the limit whose last update told of a
#: large one, ``names`` its whole list.
ROOM_UPDATE = (
    _PRELUDE
    + """
local gone = {}
prune(ARGV[1], gone)
local count = redis.call("HLEN", KEYS[2])
local told = redis.call("GET", KEYS[4])
if count > tonumber(ARGV[2]) then
  if told == tostring(count) then return {gone, count, 0} end
  return {gone, count, 1}
end
if not told then return {gone, count, 0} end
return {gone, count, 2, redis.call("HGETALL", KEYS[3])}
"""
)

#: ``ARGV``: the update's kind (``1`` large, ``2`` small again, as :data:`ROOM_UPDATE` said),
#: its count, the channel, the sealed envelope, the told key's expiry (ms). Publishes the
#: envelope and records what it told, as one step, if the room still has that many users and
#: nobody told it since; returns 1 when published, else 0.
ROOM_PUBLISH = """
if redis.call("HLEN", KEYS[2]) ~= tonumber(ARGV[2]) then return 0 end
local told = redis.call("GET", KEYS[4])
if ARGV[1] == "1" then
  if told == ARGV[2] then return 0 end
  redis.call("SET", KEYS[4], ARGV[2], "PX", ARGV[5])
else
  if not told then return 0 end
  redis.call("DEL", KEYS[4])
end
redis.call("PUBLISH", ARGV[3], ARGV[4])
return 1
"""
