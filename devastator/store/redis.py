"""The clustered store: the Store interface on Redis, one server or a Redis Cluster.

Every key of one user carries the hash tag ``{u:<user>}``, so Redis Cluster
keeps a user's data on one shard, and each call that changes a user's data is
one Lua script over a fixed set of that user's keys (``prefix`` is ``dv:``
unless set; the tag follows it)::

    dv:{u:bob}:user      hash   created; seq (the mailbox counter); devno (device numbers)
    dv:{u:bob}:devices   hash   device -> JSON {n, created, attached, reg, platform, token}
    dv:{u:bob}:msgs      hash   seq (16 digits) -> the message record (ts, expires, id, sender, body)
    dv:{u:bob}:expiry    zset   seq (16 digits) scored by its expiry: what is stored, by when it goes
    dv:{u:bob}:pending   zset   "<n>:<seq, 16 digits>" at score 0: device n's deliveries, in seq order
    dv:{u:bob}:refs      hash   seq (16 digits) -> how many devices still wait for it
    dv:{u:bob}:ids       zset   message id scored by its expiry (sends with a ``cid``)
    dv:{u:alice}:cid:<cid>  string  "<id> <ts> <expires>", the sender's idempotency record, with a TTL

User ids are taken as the protocol allows them (no braces), so a user's tag
ends where its id does and no two users' keys meet.

Redis asks scripts to name every key they touch in KEYS ("scripts should never
access keys with programmatically-generated names"), so the pending deliveries
of all of a user's devices live in one sorted set, each device a lexicographic
range of it (its number, then the zero-padded seq), instead of a key per device.

Keys that belong to nobody in particular::

    dv:users             set    every user id (its size is the users count)
    dv:expiring          zset   user scored by the earliest expiry of its data (ZADD LT)
    dv:stats             hash   devices, messages, pending: counters for telemetry
    dv:{removals}:seq    string the removals cursor (INCR)
    dv:{removals}:log    zset   JSON [id, ts, user, device] scored by id
    dv:push:<platform>:<token>  string  JSON [user, device], the one device holding the token

``seq`` is per user (the mailbox counter): it only orders one recipient's
mailbox and is each of its devices' cursor.

A send claims its ``cid`` first (SET NX on the sender's tag), then runs one
script per recipient, all in one pipeline; each records the message id, so a
send retried after failing half-way (a shard down, a crash) stores the message
for the recipients it missed and for no other. A purge takes the users whose
score in ``expiring`` is due and runs a script for each.

Durability: every call is durable on its own once it returns, given a Redis
with ``appendonly yes`` and ``appendfsync always`` (Redis writes and fsyncs its
append-only file before it answers). So ``batch()`` commits nothing; it only
defers the telemetry counters, sent in one round trip when the outermost
batch ends. Those counters are updated after the scripts from the deltas they
return: a crash in between makes them drift, never the data.

The store does not retry commands itself: a script whose answer was lost to a
broken connection may have run, and running it again would store a message
twice. The call fails instead; a client that retries its send with the same
``cid`` gets it stored once.

Failures are told truthfully, per send (``all_or_nothing`` is False): in a
group of sends, those whose scripts ran are answered and told as stored,
one whose script failed gets a StoreError carrying what it did store, and
when Redis does not answer a pipeline (a connection lost, a timeout), every
send in it gets a StoreUnavailableError naming its recipients for a
``recheck``: the message may be in their mailboxes, so their devices read
them again. A retried ``cid`` that finds the message already stored for a
recipient asks for the same recheck, as the first try's success may never
have been told.
"""
from __future__ import annotations

import functools
import json
import logging
import secrets
import struct
from dataclasses import dataclass, field
from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from .base import (
    Accepted,
    Attachment,
    DeviceRecord,
    MessageIds,
    PushTarget,
    RemovedDevices,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
    UnknownDeviceError,
    UnknownUserError,
)

log = logging.getLogger(__name__)

# Seconds: a command that takes longer fails (Redis stopped or cut off), and so
# does a connection that takes longer to open; the settings redis_socket_timeout
# and redis_connect_timeout, whose defaults these are.
SOCKET_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0
# Redis did not answer: what was asked may or may not have been done.
UNANSWERED = (redis.ConnectionError, redis.TimeoutError)

# Servers poll removals every second or so; a day is ample for one to catch up.
REMOVALS_KEPT_MS = 24 * 3600 * 1000
REGISTRATION_BYTES = 12
KNOWN_USERS_KEPT = 100_000
# Users taken from the expiry index at a time, and expired messages one script drops
# at most (a script blocks the whole Redis while it runs).
PURGE_USERS_AT_ONCE = 500
PURGE_MESSAGES_AT_ONCE = 5000
REMOVALS_TRIMMED_AT_ONCE = 1000

# A message record: ts, expires, then the lengths of id and sender, then id, sender, body.
_RECORD = struct.Struct(">qqII")

_COUNTERS = ("devices", "messages", "pending")

# -- Lua --------------------------------------------------------------------------------
# Every per-user script gets the same KEYS, in this order (see _user_keys).
_USER_PRELUDE = """
local K_USER, K_DEVICES, K_MSGS, K_EXPIRY = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_PENDING, K_REFS, K_IDS = KEYS[5], KEYS[6], KEYS[7]

-- A seq as the key of a message (field in msgs, member of expiry): zero-padded, so
-- that a pending delivery, its device's number and then this, sorts by seq.
local function pad(seq)
    return string.format('%016d', seq)
end

local function entry(n, field)
    return n .. ':' .. field
end

local function entry_field(prefix, e)
    return string.sub(e, #prefix + 1)
end

local function device(name)
    local raw = redis.call('HGET', K_DEVICES, name)
    if raw then return cjson.decode(raw) end
    return nil
end

local function retire(field)
    redis.call('HDEL', K_MSGS, field)
    redis.call('ZREM', K_EXPIRY, field)
    redis.call('HDEL', K_REFS, field)
end

-- Unexpired messages waiting for device number n.
local function count_pending(n, now)
    local prefix = n .. ':'
    local low, high = '[' .. prefix, '(' .. n .. ';'
    local count = redis.call('ZLEXCOUNT', K_PENDING, low, high)
    local expired = redis.call('ZCOUNT', K_EXPIRY, '-inf', now)
    if count == 0 or expired == 0 then return count end
    if expired <= count then
        for _, field in ipairs(redis.call('ZRANGE', K_EXPIRY, '-inf', now, 'BYSCORE')) do
            if redis.call('ZSCORE', K_PENDING, entry(n, field)) then count = count - 1 end
        end
    else
        for _, e in ipairs(redis.call('ZRANGE', K_PENDING, low, high, 'BYLEX')) do
            local expires = redis.call('ZSCORE', K_EXPIRY, entry_field(prefix, e))
            if not expires or tonumber(expires) <= tonumber(now) then count = count - 1 end
        end
    end
    return count
end

-- The first unexpired pending entries of device n after the entry bound `low`, at most limit.
local function first_pending(n, low, limit, now)
    local prefix, high = n .. ':', '(' .. n .. ';'
    local found = {}
    while #found < limit do
        local want = limit - #found
        local entries = redis.call('ZRANGE', K_PENDING, low, high, 'BYLEX', 'LIMIT', 0, want)
        for _, e in ipairs(entries) do
            local field = entry_field(prefix, e)
            local expires = redis.call('ZSCORE', K_EXPIRY, field)
            if expires and tonumber(expires) > now then found[#found + 1] = field end
        end
        if #entries < want then break end
        low = '(' .. entries[#entries]
    end
    return found
end

local function earliest_expiry()
    local earliest = -1
    for _, key in ipairs({K_EXPIRY, K_IDS}) do
        local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        if first[2] then
            local score = tonumber(first[2])
            if earliest < 0 or score < earliest then earliest = score end
        end
    end
    return earliest
end
"""

_READ_ONLY = "#!lua flags=no-writes\n"

_USER_SCRIPTS = {
    # ARGV: created -> 1 if the user is new
    "add_user": """
return redis.call('HSETNX', K_USER, 'created', ARGV[1])
""",
    # ARGV: device, created, registration -> {-1} unknown user, {created 0/1, registration}
    "add_device": """
if redis.call('EXISTS', K_USER) == 0 then return {-1} end
local d = device(ARGV[1])
if d and d.reg then return {0, d.reg} end
local n = redis.call('HINCRBY', K_USER, 'devno', 1)
redis.call('HSET', K_DEVICES, ARGV[1], cjson.encode({n = n, created = ARGV[2], reg = ARGV[3]}))
return {1, ARGV[3]}
""",
    # ARGV: record, expires, message id to store once ('' for no check)
    # -> {-1} unknown user, {0} stored before, {seq, devices waiting, [device, platform, token]...}
    "append": """
if redis.call('EXISTS', K_USER) == 0 then return {-1} end
if ARGV[3] ~= '' and redis.call('ZSCORE', K_IDS, ARGV[3]) then return {0} end
local seq = redis.call('HINCRBY', K_USER, 'seq', 1)
local field = pad(seq)
redis.call('HSET', K_MSGS, field, ARGV[1])
redis.call('ZADD', K_EXPIRY, ARGV[2], field)
local result = {seq, 0}
local devices = redis.call('HGETALL', K_DEVICES)
for i = 1, #devices, 2 do
    local d = cjson.decode(devices[i + 1])
    redis.call('ZADD', K_PENDING, 0, entry(d.n, field))
    if d.token then
        result[#result + 1] = devices[i]
        result[#result + 1] = d.platform
        result[#result + 1] = d.token
    end
end
local waiting = #devices / 2
if waiting > 0 then redis.call('HSET', K_REFS, field, waiting) end
-- Last: a script that failed half-way must not have marked the message as stored.
if ARGV[3] ~= '' then redis.call('ZADD', K_IDS, ARGV[2], ARGV[3]) end
result[2] = waiting
return result
""",
    # ARGV: device, registration, now -> {-1} unknown user, {-2} unknown device, {pending, copied}
    "attach": """
local d = device(ARGV[1])
if not d then
    if redis.call('EXISTS', K_USER) == 0 then return {-1} end
    return {-2}
end
if d.reg ~= ARGV[2] then return {-2} end
local copied = 0
if not d.attached then
    d.attached = ARGV[3]
    redis.call('HSET', K_DEVICES, ARGV[1], cjson.encode(d))
    -- Its first authentication: it gets what is still stored for its user.
    for _, field in ipairs(redis.call('ZRANGE', K_EXPIRY, '(' .. ARGV[3], '+inf', 'BYSCORE')) do
        if redis.call('ZADD', K_PENDING, 'NX', 0, entry(d.n, field)) == 1 then
            redis.call('HINCRBY', K_REFS, field, 1)
            copied = copied + 1
        end
    end
end
return {count_pending(d.n, ARGV[3]), copied}
""",
    # ARGV: device, after seq, limit -> {seq, record, seq, record, ...}, the next `limit`
    # deliveries pending, expired ones too (the caller drops those, rarely there: a purge
    # takes them), which spares a lookup per message.
    "load": _READ_ONLY + """
local d = device(ARGV[1])
local limit = tonumber(ARGV[3])
if not d or limit <= 0 then return {} end
local prefix = d.n .. ':'
local entries = redis.call(
    'ZRANGE', K_PENDING, '(' .. prefix .. pad(ARGV[2]), '(' .. d.n .. ';', 'BYLEX', 'LIMIT', 0, limit)
local out = {}
for first = 1, #entries, 1000 do
    local fields = {}
    for i = first, math.min(first + 999, #entries) do fields[#fields + 1] = entry_field(prefix, entries[i]) end
    local records = redis.call('HMGET', K_MSGS, unpack(fields))
    for i, field in ipairs(fields) do
        out[#out + 1] = field
        out[#out + 1] = records[i]
    end
end
return out
""",
    # ARGV: device, seq... -> {deliveries done, messages retired}
    "ack": """
local d = device(ARGV[1])
if not d then return {0, 0} end
local done, retired = 0, 0
for i = 2, #ARGV do
    local field = pad(ARGV[i])
    if redis.call('ZREM', K_PENDING, entry(d.n, field)) == 1 then
        done = done + 1
        if redis.call('HINCRBY', K_REFS, field, -1) <= 0 then
            retire(field)
            retired = retired + 1
        end
    end
end
return {done, retired}
""",
    # ARGV: device -> {0} no such device, {1, deliveries dropped, messages retired, platform, token}
    "remove_device": """
local d = device(ARGV[1])
if not d then return {0} end
redis.call('HDEL', K_DEVICES, ARGV[1])
local prefix = d.n .. ':'
local low, high = '[' .. prefix, '(' .. d.n .. ';'
local entries = redis.call('ZRANGE', K_PENDING, low, high, 'BYLEX')
redis.call('ZREMRANGEBYLEX', K_PENDING, low, high)
-- The last device gone, its messages wait for the next one, as for a new user.
local others = redis.call('HLEN', K_DEVICES)
local retired = 0
for _, e in ipairs(entries) do
    local field = entry_field(prefix, e)
    if redis.call('HINCRBY', K_REFS, field, -1) <= 0 then
        if others > 0 then
            retire(field)
            retired = retired + 1
        else
            redis.call('HDEL', K_REFS, field)
        end
    end
end
return {1, #entries, retired, d.platform or false, d.token or false}
""",
    # ARGV: device, platform, token -> {0} no such device, {1, old platform, old token}
    "set_push": """
local d = device(ARGV[1])
if not d then return {0} end
local platform, token = d.platform or false, d.token or false
d.platform, d.token = ARGV[2], ARGV[3]
redis.call('HSET', K_DEVICES, ARGV[1], cjson.encode(d))
return {1, platform, token}
""",
    # ARGV: device, platform, token -> 1 if the device had that token (now forgotten)
    "clear_push": """
local d = device(ARGV[1])
if not d or d.platform ~= ARGV[2] or d.token ~= ARGV[3] then return 0 end
d.platform, d.token = nil, nil
redis.call('HSET', K_DEVICES, ARGV[1], cjson.encode(d))
return 1
""",
    # ARGV: now -> {device, pending, record of the first pending, ...} for devices with any
    "backlog": _READ_ONLY + """
local now = tonumber(ARGV[1])
local out = {}
local devices = redis.call('HGETALL', K_DEVICES)
for i = 1, #devices, 2 do
    local n = cjson.decode(devices[i + 1]).n
    local count = count_pending(n, ARGV[1])
    if count > 0 then
        local first = first_pending(n, '[' .. n .. ':', 1, now)
        out[#out + 1] = devices[i]
        out[#out + 1] = count
        out[#out + 1] = redis.call('HGET', K_MSGS, first[1])
    end
end
return out
""",
    # -> {messages dropped, deliveries dropped}
    "expire_user": """
local messages = redis.call('HLEN', K_MSGS)
local deliveries = redis.call('ZCARD', K_PENDING)
redis.call('DEL', K_MSGS, K_EXPIRY, K_PENDING, K_REFS)
return {messages, deliveries}
""",
    # ARGV: now, at most -> {messages dropped, deliveries dropped, earliest expiry left or -1}
    "purge": """
local expired = redis.call('ZRANGE', K_EXPIRY, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
local numbers = {}
for _, raw in ipairs(redis.call('HVALS', K_DEVICES)) do numbers[#numbers + 1] = cjson.decode(raw).n end
local deliveries = 0
for _, field in ipairs(expired) do
    for _, n in ipairs(numbers) do
        deliveries = deliveries + redis.call('ZREM', K_PENDING, entry(n, field))
    end
    retire(field)
end
redis.call('ZREMRANGEBYSCORE', K_IDS, '-inf', ARGV[1])
return {#expired, deliveries, earliest_expiry()}
""",
    # -> the earliest expiry of the user's data, or -1
    "earliest": _READ_ONLY + """
return earliest_expiry()
""",
}

_GLOBAL_SCRIPTS = {
    # KEYS: removals seq, removals log; ARGV: ts, user, device -> the removal's id
    "log_removal": """
local id = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], id, cjson.encode({id, ARGV[1], ARGV[2], ARGV[3]}))
return id
""",
    # KEYS: removals log; ARGV: cutoff ts, at most -> rows dropped. The newest row stays.
    "trim_removals": """
local cutoff, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local rows = redis.call('ZRANGE', KEYS[1], 0, most)
local dropped = 0
for i = 1, #rows - 1 do
    if tonumber(cjson.decode(rows[i])[2]) > cutoff then break end
    redis.call('ZREM', KEYS[1], rows[i])
    dropped = dropped + 1
end
return dropped
""",
    # KEYS: one key; ARGV: value -> 1 if the key held the value and is deleted
    "delete_if": """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
}


def _source(name: str) -> str:
    if name in _USER_SCRIPTS:
        body = _USER_SCRIPTS[name]
        if body.startswith(_READ_ONLY):
            return _READ_ONLY + _USER_PRELUDE + body[len(_READ_ONLY):]
        return _USER_PRELUDE + body
    return _GLOBAL_SCRIPTS[name]


def _pack(message_id: str, sender: str, ts: int, expires: int, body: bytes) -> bytes:
    id_bytes, sender_bytes = message_id.encode(), sender.encode()
    return b"".join(
        (_RECORD.pack(ts, expires, len(id_bytes), len(sender_bytes)), id_bytes, sender_bytes, body)
    )


def _unpack(seq: int, recipient: str, record: bytes) -> StoredMessage:
    ts, expires, id_length, sender_length = _RECORD.unpack_from(record)
    start = _RECORD.size
    sender_start = start + id_length
    body_start = sender_start + sender_length
    return StoredMessage(
        seq,
        record[start:sender_start].decode(),
        record[sender_start:body_start].decode(),
        recipient,
        record[body_start:],
        ts,
        expires,
    )


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# The keys every per-user script is given, in this order.
_USER_KEY_NAMES = ("user", "devices", "msgs", "expiry", "pending", "refs", "ids")


def user_key(prefix: str, user: str, name: str) -> str:
    """A key of the user's: under the user's hash tag, so that Redis Cluster keeps it beside the rest."""
    return f"{prefix}{{u:{user}}}:{name}"


def connect(
    url: str,
    cluster_nodes: Sequence[str] | None = None,
    *,
    socket_timeout: float = SOCKET_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
):
    """A Redis client: one server by URL, or a Redis Cluster by its "host:port" nodes.

    Every client of the server's is made here: its commands fail after
    ``socket_timeout`` instead of waiting for ever on a Redis that stopped
    answering, and are never retried by the client (a command whose answer
    was lost may have run: a script run again would store a message twice).
    """
    options = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
    )
    if cluster_nodes:
        nodes = [ClusterNode(host, int(port)) for host, port in (node.rsplit(":", 1) for node in cluster_nodes)]
        return RedisCluster(startup_nodes=nodes, **options)
    return redis.Redis.from_url(url, **options)


def _redis_errors(method):
    """Redis's own failures leave a store call as StoreError (StoreUnavailableError: no answer)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UNANSWERED as error:
            raise StoreUnavailableError(f"Redis did not answer: {error}") from error
        except RedisError as error:
            raise StoreError(f"Redis failed: {error}") from error

    return call


@dataclass(slots=True)
class _Landed:
    """What the scripts storing one message did, recipient by recipient."""

    stored: list[StoredMessage] = field(default_factory=list)
    push_targets: list[PushTarget] = field(default_factory=list)
    waiting: int = 0  # deliveries now pending
    already: list[str] = field(default_factory=list)  # had it from an earlier try of the cid
    failed: list[str] = field(default_factory=list)  # their script failed, maybe half-way
    error: Exception | None = None  # the first script error


class RedisStore:
    """The Store interface on Redis; ``cluster_nodes`` ("host:port", ...) for Redis Cluster."""

    all_or_nothing = False

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        cluster_nodes: Sequence[str] | None = None,
        prefix: str = "dv:",
        socket_timeout: float = SOCKET_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ):
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must not contain a hash tag brace, got {prefix!r}")
        self.url = url
        self.cluster_nodes = tuple(cluster_nodes) if cluster_nodes else None
        self.prefix = prefix
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._client: redis.Redis | RedisCluster | None = None
        self._scripts: dict = {}
        self._batch = _Batch(self)
        self._ids = MessageIds()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._counts_changed = False  # since the last flush: a flush waits for news, not for a dead Redis
        # Users are never removed, so "exists" can be kept (bounded: forgotten wholesale).
        self._known_users: set[str] = set()
        self._users_key = f"{prefix}users"
        self._expiring_key = f"{prefix}expiring"
        self._stats_key = f"{prefix}stats"
        self._removals_seq_key = f"{prefix}{{removals}}:seq"
        self._removals_key = f"{prefix}{{removals}}:log"

    # -- lifecycle -----------------------------------------------------------

    @_redis_errors
    def open(self) -> None:
        client = connect(
            self.url, self.cluster_nodes, socket_timeout=self._socket_timeout, connect_timeout=self._connect_timeout
        )
        try:
            client.ping()
            scripts = {}
            for name in (*_USER_SCRIPTS, *_GLOBAL_SCRIPTS):
                script = client.register_script(_source(name))
                # Loaded now, so that pipelines can call them by digest alone.
                script.sha = _text(client.script_load(script.script))
                scripts[name] = script
        except BaseException:
            client.close()
            raise
        self._client = client
        self._scripts = scripts
        self._check_durability()

    def _check_durability(self) -> None:
        """Say so when Redis is not set to fsync every write: answers would come before durability."""
        try:
            config = {_text(k): _text(v) for k, v in self._client.config_get("append*").items()}
        except RedisError:
            return  # CONFIG is often disabled on managed Redis; nothing to learn then
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            log.warning(
                "Redis at %s has appendonly=%s appendfsync=%s: a crash of Redis loses what it had"
                " answered (set appendonly yes, appendfsync always)",
                self.cluster_nodes or self.url, config.get("appendonly"), config.get("appendfsync"),
            )

    def close(self) -> None:
        if self._client is not None:
            self._flush_counts(even_unchanged=True)
            self._client.close()
            self._client = None

    def checkpoint(self) -> None:
        """Nothing to do: Redis rewrites its append-only file on its own."""

    def batch(self) -> _Batch:
        return self._batch

    @property
    def _redis(self) -> redis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError(f"store {self.url} is not open")
        return self._client

    # -- delivery path -------------------------------------------------------

    @_redis_errors
    def append(
        self,
        sender: str,
        recipients: Sequence[str],
        message_json: bytes,
        cid: str | None,
        ttl_seconds: int,
        now_ms: int,
    ) -> Accepted:
        message_id = self._ids.new(now_ms)
        ts, expires = now_ms, now_ms + ttl_seconds * 1000
        ops = _Ops(self)
        if cid is not None:
            claim_key = self._user_key(sender, "cid:" + cid)
            claim = f"{message_id} {ts} {expires}".encode()
            ops.call(lambda pipe: pipe.set(claim_key, claim, nx=True, get=True, px=max(1, ttl_seconds * 1000)))
        unknown = self._unknown_users(recipients, ops)
        retried = False
        if cid is not None:
            earlier = ops.results[0]
            if earlier is not None:
                earlier_id, earlier_ts, earlier_expires = earlier.decode().split(" ")
                if int(earlier_expires) > now_ms:
                    # A retried send: the same answer, and whatever recipient the first
                    # try did not reach (it stopped half-way) gets it now.
                    retried = True
                    message_id, ts, expires = earlier_id, int(earlier_ts), int(earlier_expires)
                    recipients = [user for user in recipients if user not in unknown]
                elif not unknown:
                    self._redis.set(claim_key, claim, px=max(1, ttl_seconds * 1000))
            elif unknown:
                self._scripts["delete_if"](keys=[claim_key], args=[claim])
        if unknown and not retried:
            raise UnknownUserError(unknown)
        (landed,) = self._store_messages(
            [(sender, recipients, message_id, ts, expires, message_json, cid is not None)]
        )
        outcome = self._outcome(landed, message_id, ts, expires, retried=retried)
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    @_redis_errors
    def append_many(
        self, sends: Sequence[tuple], now_ms: int
    ) -> list[Accepted | UnknownUserError | StoreError]:
        """Store several sends in order; each (sender, recipients, message_json, cid, ttl_seconds).

        Sends without a ``cid`` to recipients known to exist (the common case)
        go together in one pipeline: one round trip, so one fsync in Redis, for
        all of them. The others are stored one by one, in their place in the
        order. An unknown recipient fails its own send, in its place; so does
        a failure of Redis (a StoreError), and once Redis did not answer, the
        sends left are not tried: each gets a StoreUnavailableError.
        """
        results: list = [None] * len(sends)
        together: list[tuple[int, tuple]] = []
        unanswered: StoreUnavailableError | None = None

        def store_together() -> StoreUnavailableError | None:
            entries = [
                (sender, recipients, self._ids.new(now_ms), now_ms, now_ms + ttl * 1000, body, False)
                for _, (sender, recipients, body, _cid, ttl) in together
            ]
            try:
                landed_all = self._store_messages(entries)
            except StoreError as error:
                for (index, _), entry in zip(together, entries):
                    results[index] = type(error)(str(error), recheck=tuple(entry[1]))
                together.clear()
                return error if isinstance(error, StoreUnavailableError) else None
            for (index, _), entry, landed in zip(together, entries, landed_all):
                results[index] = self._outcome(landed, entry[2], entry[3], entry[4], retried=False)
            together.clear()
            return None

        known = self._known_users
        for index, send in enumerate(sends):
            sender, recipients, body, cid, ttl = send
            if unanswered is None and together and not (cid is None and all(r in known for r in recipients)):
                unanswered = store_together()
            if unanswered is not None:
                results[index] = StoreUnavailableError(f"not tried, as Redis did not answer: {unanswered}")
                continue
            if cid is None and all(recipient in known for recipient in recipients):
                together.append((index, send))
                continue
            try:
                results[index] = self.append(sender, recipients, body, cid, ttl, now_ms)
            except (UnknownUserError, StoreError) as error:
                results[index] = error
                if isinstance(error, StoreUnavailableError):
                    unanswered = error
        if together and unanswered is None:
            store_together()
        return results

    def _outcome(self, landed: _Landed, message_id: str, ts: int, expires: int, *, retried: bool):
        """The Accepted for a message its scripts stored, or the StoreError of one they did not all store."""
        self._count(messages=len(landed.stored), pending=landed.waiting)
        if landed.failed:
            return StoreError(
                f"Redis failed to store a message for {len(landed.failed)} recipient(s): {landed.error}",
                messages=tuple(landed.stored),
                push_targets=tuple(landed.push_targets),
                recheck=(*landed.already, *landed.failed),  # a script may have failed half-way
            )
        return Accepted(
            id=message_id, ts=ts, expires=expires, messages=tuple(landed.stored),
            duplicate=retried and not landed.stored, push_targets=tuple(landed.push_targets),
            recheck=tuple(landed.already),
        )

    def _store_messages(self, entries: Sequence[tuple]) -> list[_Landed]:
        """Several messages, one script per recipient, all in one round trip.

        Each entry is (sender, recipients, message id, ts, expires, body, once).
        A pipeline Redis did not answer (or refused as a whole) raises a
        StoreError whose ``recheck`` names every recipient.
        """
        script = self._scripts["append"]
        expiring: dict[str, int] = {}
        for _, recipients, _, _, expires, _, _ in entries:
            for user in recipients:
                expiring[user] = min(expires, expiring.get(user, expires))
        if not expiring:
            return [_Landed() for _ in entries]
        ops = _Ops(self)
        # The expiry index is lowered before (so a crash half-way leaves no message
        # unindexed) and after (so a purge running meanwhile cannot drop the entry).
        ops.call(lambda pipe: pipe.zadd(self._expiring_key, expiring, lt=True))
        for sender, recipients, message_id, ts, expires, message_json, once in entries:
            record = _pack(message_id, sender, ts, expires, message_json)
            check = message_id if once else ""
            for recipient in recipients:
                ops.script(script, self._user_keys(recipient), (record, expires, check))
        ops.call(lambda pipe: pipe.zadd(self._expiring_key, expiring, lt=True))
        try:
            results = iter(ops.run(raise_on_error=False)[1:-1])
        except RedisError as error:
            if isinstance(error, UNANSWERED):
                raise StoreUnavailableError(
                    f"Redis did not answer a pipeline of sends: {error}", recheck=tuple(expiring)
                ) from error
            raise StoreError(f"Redis failed a pipeline of sends: {error}", recheck=tuple(expiring)) from error
        outcomes = []
        for sender, recipients, message_id, ts, expires, message_json, _ in entries:
            landed = _Landed()
            for recipient in recipients:
                result = next(results)
                if isinstance(result, Exception):
                    landed.failed.append(recipient)
                    landed.error = landed.error or result
                    continue
                if result[0] == -1:
                    # Only if the user's keys vanished under a running store (FLUSHDB).
                    self._known_users.discard(recipient)
                    log.warning("recipient %r disappeared while a message was stored for it", recipient)
                    landed.failed.append(recipient)
                    landed.error = landed.error or UnknownUserError([recipient])
                    continue
                if result[0] == 0:
                    landed.already.append(recipient)
                    continue
                seq, devices = int(result[0]), int(result[1])
                landed.waiting += devices
                landed.stored.append(StoredMessage(seq, message_id, sender, recipient, message_json, ts, expires))
                rest = result[2:]
                landed.push_targets.extend(
                    PushTarget(recipient, _text(rest[i]), _text(rest[i + 1]), _text(rest[i + 2]))
                    for i in range(0, len(rest), 3)
                )
            outcomes.append(landed)
        return outcomes

    @_redis_errors
    def attach_device(self, user: str, device: str, registration: str, now_ms: int) -> Attachment:
        result = self._user_script("attach", user, device, registration, now_ms)
        if result[0] == -1:
            raise UnknownUserError([user])
        if result[0] == -2:
            raise UnknownDeviceError(user, device)
        pending, copied = result
        self._count(pending=copied)
        return Attachment(pending=int(pending))

    @_redis_errors
    def load_pending(
        self, user: str, device: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        messages: list[StoredMessage] = []
        while len(messages) < limit:
            wanted = limit - len(messages)
            result = self._user_script("load", user, device, after_seq, wanted)
            for i in range(0, len(result), 2):
                record = result[i + 1]
                if record is not None:
                    message = _unpack(int(result[i]), user, record)
                    if message.expires > now_ms:
                        messages.append(message)
            if len(result) < 2 * wanted:
                break
            after_seq = int(result[-2])
        return messages

    @_redis_errors
    def ack(self, user: str, device: str, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        done, retired = self._user_script("ack", user, device, *(int(seq) for seq in seqs))
        self._count(pending=-done, messages=-retired)

    @_redis_errors
    def purge_expired(self, now_ms: int) -> int:
        purged = 0
        client = self._redis
        while True:
            due = [
                _text(user)
                for user in client.zrangebyscore(self._expiring_key, "-inf", now_ms, 0, PURGE_USERS_AT_ONCE)
            ]
            if not due:
                break
            ops = _Ops(self)
            for user in due:
                ops.script(self._scripts["purge"], self._user_keys(user), (now_ms, PURGE_MESSAGES_AT_ONCE))
            results = ops.run()
            messages = sum(result[0] for result in results)
            purged += messages
            self._count(messages=-messages, pending=-sum(result[1] for result in results))
            self._reindex({user: result[2] for user, result in zip(due, results)})
            if len(due) < PURGE_USERS_AT_ONCE:
                break
        self._scripts["trim_removals"](
            keys=[self._removals_key], args=[now_ms - REMOVALS_KEPT_MS, REMOVALS_TRIMMED_AT_ONCE]
        )
        return purged

    def _reindex(self, earliest: dict[str, int]) -> None:
        """Score purged users by what they have left, then look again.

        A message appended between a user's purge and this update would lose its
        entry, had its own ZADD LT (a no-op while the old, due score stood) come
        before it: asking each user again afterwards and only lowering closes that.
        """
        ops = _Ops(self)
        left = {user: expiry for user, expiry in earliest.items() if expiry >= 0}
        if left:
            ops.call(lambda pipe: pipe.zadd(self._expiring_key, left))
        empty = [user for user, expiry in earliest.items() if expiry < 0]
        if empty:
            ops.call(lambda pipe: pipe.zrem(self._expiring_key, *empty))
        ops.run()
        ops = _Ops(self)
        users = list(earliest)
        for user in users:
            ops.script(self._scripts["earliest"], self._user_keys(user), ())
        again = {user: expiry for user, expiry in zip(users, ops.run()) if expiry >= 0}
        if again:
            self._redis.zadd(self._expiring_key, again, lt=True)

    # -- operators -----------------------------------------------------------

    @_redis_errors
    def add_user(self, user: str, now_ms: int) -> bool:
        ops = _Ops(self)
        ops.script(self._scripts["add_user"], self._user_keys(user), (now_ms,))
        ops.call(lambda pipe: pipe.sadd(self._users_key, user))
        created = ops.run()[0] == 1
        self._remember_user(user)
        return created

    @_redis_errors
    def add_device(self, user: str, device: str, now_ms: int) -> str:
        registration = secrets.token_urlsafe(REGISTRATION_BYTES)
        result = self._user_script("add_device", user, device, now_ms, registration)
        if result[0] == -1:
            raise UnknownUserError([user])
        if result[0] == 1:
            self._count(devices=1)
        return _text(result[1])

    @_redis_errors
    def remove_device(self, user: str, device: str, now_ms: int) -> bool:
        # The removal is logged first: a crash in between makes servers drop the
        # connections of a device that is still there (it reconnects), never keep
        # those of a removed one.
        ops = _Ops(self)
        ops.script(
            self._scripts["log_removal"], [self._removals_seq_key, self._removals_key], (now_ms, user, device)
        )
        ops.script(self._scripts["remove_device"], self._user_keys(user), (device,))
        removal, result = ops.run()
        if result[0] == 0:
            self._redis.zremrangebyscore(self._removals_key, removal, removal)
            return False
        _, deliveries, retired, platform, token = result
        self._count(devices=-1, pending=-deliveries, messages=-retired)
        if token is not None:
            self._scripts["delete_if"](
                keys=[self._push_key(_text(platform), _text(token))], args=[self._holder(user, device)]
            )
        return True

    @_redis_errors
    def set_push_token(self, user: str, device: str, platform: str, token: str) -> bool:
        result = self._user_script("set_push", user, device, platform, token)
        if result[0] == 0:
            return False
        _, old_platform, old_token = result
        holder = self._holder(user, device)
        ops = _Ops(self)
        ops.call(lambda pipe: pipe.set(self._push_key(platform, token), holder, get=True))
        old = (_text(old_platform), _text(old_token))
        if old_token is not None and old != (platform, token):
            ops.script(self._scripts["delete_if"], [self._push_key(*old)], (holder,))
        previous = ops.run()[0]
        if previous is not None and previous.decode() != holder:
            # A token belongs to one device: the one that had it loses it.
            other_user, other_device = json.loads(previous)
            self._user_script("clear_push", other_user, other_device, platform, token)
        return True

    @_redis_errors
    def remove_push_token(self, user: str, device: str, platform: str, token: str) -> bool:
        ops = _Ops(self)
        ops.script(self._scripts["clear_push"], self._user_keys(user), (device, platform, token))
        ops.script(self._scripts["delete_if"], [self._push_key(platform, token)], (self._holder(user, device),))
        return ops.run()[0] == 1

    @_redis_errors
    def device_for_push_token(self, platform: str, token: str) -> tuple[str, str] | None:
        holder = self._redis.get(self._push_key(platform, token))
        if holder is None:
            return None
        user, device = json.loads(holder)
        return user, device

    @_redis_errors
    def removed_devices(self, after: int | None) -> RemovedDevices:
        client = self._redis
        if after is None:
            return RemovedDevices(int(client.get(self._removals_seq_key) or 0), ())
        rows = [json.loads(row) for row in client.zrangebyscore(self._removals_key, f"({int(after)}", "+inf")]
        if not rows:
            return RemovedDevices(after, ())
        return RemovedDevices(int(rows[-1][0]), tuple((user, device) for _, _, user, device in rows))

    @_redis_errors
    def backlog(self, user: str, now_ms: int) -> dict[str, tuple[int, int]]:
        """device -> (pending, ts of its first pending message: the oldest, as seq follows acceptance)."""
        result = self._user_script("backlog", user, now_ms)
        return {
            _text(result[i]): (int(result[i + 1]), _unpack(0, user, result[i + 2]).ts)
            for i in range(0, len(result), 3)
        }

    @_redis_errors
    def expire_user(self, user: str, now_ms: int) -> int:
        messages, deliveries = self._user_script("expire_user", user)
        self._count(messages=-messages, pending=-deliveries)
        return int(messages)

    @_redis_errors
    def stats(self) -> dict[str, int]:
        self._flush_counts(even_unchanged=True)
        ops = _Ops(self)
        ops.call(lambda pipe: pipe.scard(self._users_key))
        ops.call(lambda pipe: pipe.hmget(self._stats_key, _COUNTERS))
        users, counts = ops.run()
        return {"users": int(users), **{name: int(count or 0) for name, count in zip(_COUNTERS, counts)}}

    @_redis_errors
    def has_user(self, user: str) -> bool:
        return not self._unknown_users([user])

    @_redis_errors
    def list_users(self) -> list[str]:
        return sorted(_text(user) for user in self._redis.smembers(self._users_key))

    @_redis_errors
    def list_devices(self, user: str) -> list[DeviceRecord]:
        records = []
        for name, raw in self._redis.hgetall(self._user_key(user, "devices")).items():
            d = json.loads(raw)
            attached = d.get("attached")
            records.append(
                DeviceRecord(
                    _text(name),
                    int(d["created"]),
                    None if attached is None else int(attached),
                    d.get("platform"),
                    d.get("token"),
                )
            )
        return sorted(records, key=lambda record: record.device)

    # -- helpers -------------------------------------------------------------

    def _user_key(self, user: str, name: str) -> str:
        return user_key(self.prefix, user, name)

    def _user_keys(self, user: str) -> list[str]:
        return [user_key(self.prefix, user, name) for name in _USER_KEY_NAMES]

    def _push_key(self, platform: str, token: str) -> str:
        return f"{self.prefix}push:{platform}:{token}"

    @staticmethod
    def _holder(user: str, device: str) -> str:
        return json.dumps([user, device], separators=(",", ":"))

    def _user_script(self, name: str, user: str, *args):
        return self._scripts[name](keys=self._user_keys(user), args=args)

    def _unknown_users(self, users: Sequence[str], ops: _Ops | None = None) -> list[str]:
        """The users that do not exist, in order; asked in ``ops`` (run here) if given."""
        ops = ops or _Ops(self)
        asked = list(dict.fromkeys(user for user in users if user not in self._known_users))
        first = len(ops)
        for user in asked:
            ops.call(lambda pipe, user=user: pipe.exists(self._user_key(user, "user")))
        results = ops.run()[first:] if len(ops) else []
        missing = set()
        for user, exists in zip(asked, results):
            if exists:
                self._remember_user(user)
            else:
                missing.add(user)
        return [user for user in users if user in missing]

    def _remember_user(self, user: str) -> None:
        if len(self._known_users) >= KNOWN_USERS_KEPT:
            self._known_users.clear()
        self._known_users.add(user)

    def _count(self, **deltas: int) -> None:
        """Add to the counters: sent now outside a batch, else when the outermost batch ends."""
        counts = self._counts
        for name, delta in deltas.items():
            if delta:
                counts[name] += int(delta)
                self._counts_changed = True
        if self._batch.depth == 0:
            self._flush_counts()

    def _flush_counts(self, *, even_unchanged: bool = False) -> None:
        """Send the counters' deltas; those of a failed flush wait for the next change (or a read)."""
        changed = {name: delta for name, delta in self._counts.items() if delta}
        if not changed or self._client is None or not (self._counts_changed or even_unchanged):
            return
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._counts_changed = False
        ops = _Ops(self)
        for name, delta in changed.items():
            ops.call(lambda pipe, name=name, delta=delta: pipe.hincrby(self._stats_key, name, delta))
        try:
            ops.run()
        except RedisError as error:
            # Telemetry only, and Redis is failing the data calls too (the store
            # actor logs that): kept for the next flush.
            log.debug("store counters not updated (%s): %s", error, changed)
            for name, delta in changed.items():
                self._counts[name] += delta


class _Ops:
    """Commands and scripts sent in one pipeline (one round trip; not a transaction).

    Scripts go by digest alone (``Script`` objects would make the pipeline ask
    SCRIPT EXISTS first, a second round trip); one that Redis forgot (a restart
    without its scripts) is loaded and run again on its own.
    """

    __slots__ = ("_store", "_pipe", "_calls", "results")

    def __init__(self, store: RedisStore):
        self._store = store
        self._pipe = store._redis.pipeline(transaction=False)
        self._calls: list = []
        self.results: list = []

    def __len__(self) -> int:
        return len(self._calls)

    def call(self, queue) -> None:
        queue(self._pipe)
        self._calls.append(None)

    def script(self, script, keys: Sequence[str], args: Sequence) -> None:
        # By name: redis-py blocks the evalsha method in cluster pipelines, not the command.
        self._pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        self._calls.append((script, keys, args))

    def run(self, *, raise_on_error: bool = True) -> list:
        """The results in order; the first error raised, or left in its place."""
        if self.results or not self._calls:
            return self.results
        results = self._pipe.execute(raise_on_error=False)
        for i, (result, call) in enumerate(zip(results, self._calls)):
            if isinstance(result, NoScriptError) and call is not None:
                script, keys, args = call
                try:
                    results[i] = script(keys=keys, args=args)
                except UNANSWERED:
                    raise  # no answer: for the whole pipeline, as it would have been
                except RedisError as error:
                    results[i] = error
        self.results = results
        if raise_on_error:
            failure = next((result for result in results if isinstance(result, Exception)), None)
            if failure is not None:
                raise failure
        return results


class _Batch:
    """Calls inside one batch: each is durable already; the counters go when the outermost ends."""

    __slots__ = ("_store", "depth")

    def __init__(self, store: RedisStore):
        self._store = store
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._store._flush_counts()
