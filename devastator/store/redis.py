"""The clustered store: the Store interface on Redis, one server or a Redis Cluster.

Every key of one user carries the hash tag ``{u:<user>}``, so Redis Cluster
keeps a user's data on one shard, and each call that changes a user's data is
one Lua script over a fixed set of that user's keys, and the user's history keys
it writes, all named in KEYS (``prefix`` is ``dv:`` unless set; the tag follows it)::

    dv:{u:bob}:user      hash   created; seq (the mailbox counter); devno (device numbers)
    dv:{u:bob}:devices   hash   device -> JSON {n, created, attached, reg, platform, token}
    dv:{u:bob}:msgs      hash   seq (16 digits) -> the entry's record (below)
    dv:{u:bob}:expiry    zset   seq (16 digits) scored by its expiry: what is stored, by when it goes
    dv:{u:bob}:pending   zset   "<n>:<seq, 16 digits>" at score 0: device n's deliveries, in seq order
    dv:{u:bob}:refs      hash   seq (16 digits) -> how many devices still wait for it
    dv:{u:bob}:ids       zset   entry ids stored once, scored by their expiry: message ids (sends
                                with a ``cid``), receipt ids (always), "<id>.c" (the copy of a
                                send with a ``cid``)
    dv:{u:bob}:wanted    hash   message id -> JSON {s: sender, t: ttl ms, e: expires, d: 0/1}: a
                                message to bob that asked for receipts; d: its delivered receipt is
                                stored. Dropped once its read receipt is, or when the message expires
    dv:{u:bob}:wanted_expiry  zset  message id scored by its expiry: the receipt records, by when they go
    dv:{u:bob}:hist:<peer>    zset  the history of what peer sent bob, at score 0 (so in lexicographic
                                order, which is the order of the message ids, which is time order):
                                "<message id> NUL <ts, expires (>qq)> <body>". Each message is in
                                history once per recipient, on the recipient's side; a page of
                                bob's conversation with peer reads hist:<peer> of bob's and
                                hist:bob of peer's and merges them
    dv:{u:alice}:cid:<cid>  string  "<id> <ts> <expires>", the sender's idempotency record, with a TTL

A record in ``msgs`` is a MESSAGE's ``>qqII`` (ts, expires, lengths of id and
sender) then id, sender, body; its first byte is that of its ts (0), which tells
it from the other kinds: a RECEIPT is "r" then the same (the receipt id, the
user who made it, the ``msg.receipt`` params), a COPY is "c" then ``>qqIII``
(ts, expires, lengths of id, sender and "to") then id, sender, the "to" as sent,
body. Records written before kinds existed are MESSAGEs and read as such.

User ids are taken as the protocol allows them (no braces), so a user's tag
ends where its id does and no two users' keys meet.

Redis asks scripts to name every key they touch in KEYS ("scripts should never
access keys with programmatically-generated names"), so the pending deliveries
of all of a user's devices live in one sorted set, each device a lexicographic
range of it (its number, then the zero-padded seq), instead of a key per device.

Keys that belong to nobody in particular::

    dv:users             set    every user id (its size is the users count)
    dv:expiring          zset   user scored by the earliest expiry of its data (ZADD LT)
    dv:histories         zset   JSON [user, peer] (the key {u:user}:hist:peer) scored by when its
                                oldest entry leaves the history period (its ts plus the period; ZADD LT)
    dv:stats             hash   devices, messages, pending: counters for telemetry
    dv:{removals}:seq    string the removals cursor (INCR)
    dv:{removals}:log    zset   JSON [id, ts, user, device] scored by id
    dv:push:<platform>:<token>  string  JSON [user, device], the one device holding the token

``seq`` is per user (the mailbox counter): it only orders one recipient's
mailbox and is each of its devices' cursor.

A send claims its ``cid`` first (SET NX on the sender's tag), then runs one
script per recipient, all in one pipeline; each records the message id, so a
send retried after failing half-way (a shard down, a crash) stores the message
for the recipients it missed and for no other. A recipient's script also
stores the message's receipt record (when it asked) and its history entry,
trimming that key to the period. The same pipeline reads the sender's device
names (HKEYS, no script): only when the sender has a device but the sending
one is its COPY stored, by a script on the sender's slot in a second round
trip (recorded as "<id>.c" for a send with a ``cid``). A send from a user
with one device thus costs what it did before copies existed. A purge takes the users whose score in
``expiring`` is due and runs a script for each, then the conversations whose
score in ``histories`` is due and trims each: it never scans what has nothing
to drop. A history page is one ``ZRANGE ... BYLEX REV LIMIT`` on each side of
the conversation, merged: O(log n + page) however long the conversation.

Receipts cross from one user's slot to another's, so they are several
scripts, ordered so that stopping between any two (a crash, an answer lost)
loses no receipt and stores none twice. An ACK: (1) the ACK script on the
recipient's slot ACKs what needs no receipt and holds back (does not ACK) the
messages whose delivered receipt is due, naming them; (2) each receipt is
stored in its sender's mailbox under its one receipt id (``ids``: storing it
twice stores it once); (3) the ACK script again notes those records done and
ACKs the held messages. Stopped anywhere, the deliveries are still pending, the
device ACKs again, and only what is missing is done. ``mark_read`` reads the
records (1), stores the receipts (2), then drops the records (3). An ACK of
entries that asked for nothing is one script, as before.

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
from typing import NamedTuple, Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

import orjson

from .base import (
    COPY,
    MESSAGE,
    NO_RECEIPTS,
    RECEIPT,
    Accepted,
    Attachment,
    DeviceRecord,
    HistoryPage,
    MessageIds,
    PushTarget,
    Receipts,
    RemovedDevices,
    Send,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
    UnknownDeviceError,
    UnknownUserError,
    receipt_id,
    receipt_json,
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
# Conversations a purge takes from the history index at a time.
PURGE_HISTORIES_AT_ONCE = 500

# A message record: ts, expires, then the lengths of id and sender, then id, sender, body.
# Its first byte is that of a ts in ms (0): the other kinds begin with a tag instead.
_RECORD = struct.Struct(">qqII")
_RECEIPT_TAG = b"r"  # then a message record: the receipt id, its maker ("by"), the msg.receipt params
_COPY_TAG = b"c"  # then _COPY_RECORD, then id, sender, the "to" as sent, body
_COPY_RECORD = struct.Struct(">qqIII")
# A history entry (a member at score 0 of {u:<recipient>}:hist:<sender>, so ordered by its
# message id): id, NUL, then ts and expires, then the body.
_HISTORY_SEPARATOR = b"\x00"
_HISTORY_TIMES = struct.Struct(">qq")

_COUNTERS = ("devices", "messages", "pending")

# -- Lua --------------------------------------------------------------------------------
# Every per-user script gets the same KEYS, in this order (see _user_keys).
_USER_PRELUDE = """
local K_USER, K_DEVICES, K_MSGS, K_EXPIRY = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_PENDING, K_REFS, K_IDS = KEYS[5], KEYS[6], KEYS[7]
local K_WANTED, K_WANTED_EXPIRY = KEYS[8], KEYS[9]

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

-- The id of a MESSAGE record (its first byte is that of its ts: 0); nil for a copy or receipt.
local function message_id(record)
    if not record or string.byte(record, 1) ~= 0 then return nil end
    local id_length = struct.unpack('>I4', record, 17)
    return string.sub(record, 25, 24 + id_length)
end

-- One history entry (member, at score 0: ordered by the message id it begins with), and
-- the key trimmed of what is older than the period (bound: the oldest id prefix kept).
local function add_history(key, member, bound)
    redis.call('ZADD', key, 0, member)
    if bound ~= '' then redis.call('ZREMRANGEBYLEX', key, '-', '(' .. bound) end
end

-- A new mailbox entry waiting for the devices numbered in `numbers`; its seq.
local function store_entry(record, expires, numbers)
    local seq = redis.call('HINCRBY', K_USER, 'seq', 1)
    local field = pad(seq)
    redis.call('HSET', K_MSGS, field, record)
    redis.call('ZADD', K_EXPIRY, expires, field)
    for _, n in ipairs(numbers) do redis.call('ZADD', K_PENDING, 0, entry(n, field)) end
    if #numbers > 0 then redis.call('HSET', K_REFS, field, #numbers) end
    return seq
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
    for _, key in ipairs({K_EXPIRY, K_IDS, K_WANTED_EXPIRY}) do
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
    # A message to its recipient, or a receipt to the sender of a message (no receipt record, no history).
    # KEYS: the first 7 of the user's keys, then its hist:<sender> if given a history member, then
    # its wanted and wanted_expiry if given a receipt record.
    # ARGV: record, expires, entry id to store once ('' for no check), then optionally the history
    # bound ('' for no trim) and member ('' for none), then the receipt record
    # -> {-1} unknown user, {0} stored before, {seq, devices waiting, [device, platform, token]...}
    "append": """
local member, wanted = ARGV[5] or '', ARGV[6] or ''
local next_key = 8
if member ~= '' then next_key = 9 end
K_WANTED, K_WANTED_EXPIRY = KEYS[next_key], KEYS[next_key + 1]
if redis.call('EXISTS', K_USER) == 0 then return {-1} end
if ARGV[3] ~= '' and redis.call('ZSCORE', K_IDS, ARGV[3]) then return {0} end
local result = {0, 0}
local numbers = {}
local devices = redis.call('HGETALL', K_DEVICES)
for i = 1, #devices, 2 do
    local d = cjson.decode(devices[i + 1])
    numbers[#numbers + 1] = d.n
    if d.token then
        result[#result + 1] = devices[i]
        result[#result + 1] = d.platform
        result[#result + 1] = d.token
    end
end
result[1] = store_entry(ARGV[1], ARGV[2], numbers)
result[2] = #numbers
if wanted ~= '' then
    local id = message_id(ARGV[1])
    redis.call('HSET', K_WANTED, id, wanted)
    redis.call('ZADD', K_WANTED_EXPIRY, ARGV[2], id)
end
if member ~= '' then add_history(KEYS[8], member, ARGV[4]) end
-- Last: a script that failed half-way must not have marked the message as stored.
if ARGV[3] ~= '' then redis.call('ZADD', K_IDS, ARGV[2], ARGV[3]) end
return result
""",
    # A message's COPY in its sender's mailbox, for the sender's devices but the sending one.
    # ARGV: record, expires, copy id to store once ('' for no check), sending device ('' for none)
    # -> {-3} no such device (nothing stored), {0} stored before, {seq, devices waiting}
    "copy": """
if ARGV[3] ~= '' and redis.call('ZSCORE', K_IDS, ARGV[3]) then return {0} end
local numbers = {}
local devices = redis.call('HGETALL', K_DEVICES)
for i = 1, #devices, 2 do
    if devices[i] ~= ARGV[4] then numbers[#numbers + 1] = cjson.decode(devices[i + 1]).n end
end
if #numbers == 0 then return {-3} end
local seq = store_entry(ARGV[1], ARGV[2], numbers)
if ARGV[3] ~= '' then redis.call('ZADD', K_IDS, ARGV[2], ARGV[3]) end
return {seq, #numbers}
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
    # ARGV: device, now, mode, seq... -> {deliveries done, messages retired, [seq, message id, sender, ttl]...}
    # Mode '1': a MESSAGE whose delivered receipt is still to be made is held back (not ACKed)
    # and listed, for the caller to store the receipt in its sender's mailbox first; mode '0':
    # those receipts are stored, each held message is noted so and ACKed.
    "ack": """
local d = device(ARGV[1])
if not d then return {0, 0} end
local now, storing = tonumber(ARGV[2]), ARGV[3] == '0'
local checking = not storing and redis.call('HLEN', K_WANTED) > 0
local out = {0, 0}
local done, retired = 0, 0
for i = 4, #ARGV do
    local field = pad(ARGV[i])
    local hold = false
    if checking or storing then
        local id = message_id(redis.call('HGET', K_MSGS, field))
        local raw = id and redis.call('HGET', K_WANTED, id)
        if raw then
            local w = cjson.decode(raw)
            if w.d == 0 then
                if storing then
                    w.d = 1
                    redis.call('HSET', K_WANTED, id, cjson.encode(w))
                elseif tonumber(w.e) > now then
                    hold = true
                    out[#out + 1] = ARGV[i]
                    out[#out + 1] = id
                    out[#out + 1] = w.s
                    out[#out + 1] = w.t
                end
            end
        end
    end
    if not hold and redis.call('ZREM', K_PENDING, entry(d.n, field)) == 1 then
        done = done + 1
        if redis.call('HINCRBY', K_REFS, field, -1) <= 0 then
            retire(field)
            retired = retired + 1
        end
    end
end
out[1], out[2] = done, retired
return out
""",
    # ARGV: now, message id... -> {message id, sender, ttl, delivered (0/1), ...}: the receipt
    # records of those messages, unexpired
    "read_check": _READ_ONLY + """
local now = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
    local raw = redis.call('HGET', K_WANTED, ARGV[i])
    if raw then
        local w = cjson.decode(raw)
        if tonumber(w.e) > now then
            out[#out + 1] = ARGV[i]
            out[#out + 1] = w.s
            out[#out + 1] = w.t
            out[#out + 1] = w.d
        end
    end
end
return out
""",
    # ARGV: message id... -> records dropped: their read receipts are stored, the last they make
    "read_done": """
local dropped = 0
for i = 1, #ARGV do
    dropped = dropped + redis.call('HDEL', K_WANTED, ARGV[i])
    redis.call('ZREM', K_WANTED_EXPIRY, ARGV[i])
end
return dropped
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
local wanted = redis.call('ZRANGE', K_WANTED_EXPIRY, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
for _, id in ipairs(wanted) do
    redis.call('HDEL', K_WANTED, id)
    redis.call('ZREM', K_WANTED_EXPIRY, id)
end
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
    # KEYS: a history key; ARGV: the oldest id prefix kept ('' for none) -> ts of its oldest entry left, or -1
    "trim_history": """
if ARGV[1] == '' then
    redis.call('DEL', KEYS[1])
    return -1
end
redis.call('ZREMRANGEBYLEX', KEYS[1], '-', '(' .. ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if not first[1] then return -1 end
return tonumber(string.sub(first[1], 1, 12), 16)
""",
    # KEYS: a history key -> ts of its oldest entry, or -1
    "history_oldest": _READ_ONLY + """
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if not first[1] then return -1 end
return tonumber(string.sub(first[1], 1, 12), 16)
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


def _pack_copy(message_id: str, sender: str, ts: int, expires: int, to_json: bytes, body: bytes) -> bytes:
    id_bytes, sender_bytes = message_id.encode(), sender.encode()
    return b"".join((
        _COPY_TAG, _COPY_RECORD.pack(ts, expires, len(id_bytes), len(sender_bytes), len(to_json)),
        id_bytes, sender_bytes, to_json, body,
    ))


def _unpack(seq: int, recipient: str, record: bytes) -> StoredMessage:
    """The mailbox entry of ``recipient`` (its owner) a record holds, whatever its kind."""
    tag = record[:1]
    if tag == _COPY_TAG:
        ts, expires, id_length, sender_length, to_length = _COPY_RECORD.unpack_from(record, 1)
        start = 1 + _COPY_RECORD.size
        sender_start = start + id_length
        to_start = sender_start + sender_length
        body_start = to_start + to_length
        return StoredMessage(
            seq, record[start:sender_start].decode(), record[sender_start:to_start].decode(), recipient,
            record[body_start:], ts, expires, COPY, record[to_start:body_start],
        )
    offset, kind = (1, RECEIPT) if tag == _RECEIPT_TAG else (0, MESSAGE)
    ts, expires, id_length, sender_length = _RECORD.unpack_from(record, offset)
    start = offset + _RECORD.size
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
        kind,
    )


def _history_member(message_id: str, ts: int, expires: int, body: bytes) -> bytes:
    return b"".join((message_id.encode(), _HISTORY_SEPARATOR, _HISTORY_TIMES.pack(ts, expires), body))


def _history_entry(sender: str, recipient: str, member: bytes) -> StoredMessage:
    """A member of {u:<recipient>}:hist:<sender> as the message its recipient got."""
    message_id, rest = member.split(_HISTORY_SEPARATOR, 1)
    ts, expires = _HISTORY_TIMES.unpack_from(rest)
    return StoredMessage(0, message_id.decode(), sender, recipient, rest[_HISTORY_TIMES.size:], ts, expires)


def _history_bound(now_ms: int, period_ms: int) -> str:
    """The oldest id prefix the history keeps: ids begin with their ms, 12 hex digits (MessageIds)."""
    return f"{max(0, now_ms - period_ms):012x}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# The keys every per-user script is given, in this order.
_USER_KEY_NAMES = ("user", "devices", "msgs", "expiry", "pending", "refs", "ids", "wanted", "wanted_expiry")


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


def _lower(index: dict[str, int], member: str, score: int) -> None:
    index[member] = min(score, index.get(member, score))


def _reached(message: _Message) -> tuple[str, ...]:
    """The users whose mailboxes storing the message may change: its recipients, and its sender (a copy)."""
    if message.sender in message.recipients:
        return tuple(message.recipients)
    return (*message.recipients, message.sender)


class _Message(NamedTuple):
    """A message to store: one script per recipient, then one on the sender's side."""

    sender: str
    recipients: Sequence[str]
    id: str
    ts: int
    expires: int
    body: bytes
    once: bool  # stored at most once per recipient (a send with a cid)
    receipt: bool = False
    to_json: bytes = b""
    origin_device: str | None = None


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
        history_period_ms: int = 0,
    ):
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must not contain a hash tag brace, got {prefix!r}")
        self.url = url
        self.cluster_nodes = tuple(cluster_nodes) if cluster_nodes else None
        self.prefix = prefix
        self.history_period_ms = history_period_ms
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
        self._keys_of: dict[str, tuple] = {}  # user -> (_user_keys, _mailbox_keys), bounded
        self._history_pairs: dict[tuple[str, str], tuple[str, str]] = {}
        self._users_key = f"{prefix}users"
        self._expiring_key = f"{prefix}expiring"
        self._histories_key = f"{prefix}histories"
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
        *,
        receipt: bool = False,
        to_json: bytes = b"",
        origin_device: str | None = None,
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
        message = _Message(
            sender, recipients, message_id, ts, expires, message_json, cid is not None, receipt, to_json, origin_device
        )
        (landed,) = self._store_messages([message], now_ms)
        outcome = self._outcome(landed, message_id, ts, expires, retried=retried)
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    @_redis_errors
    def append_many(
        self, sends: Sequence[Send], now_ms: int
    ) -> list[Accepted | UnknownUserError | StoreError]:
        """Store several sends in order.

        Sends without a ``cid`` to recipients known to exist (the common case)
        go together in one pipeline: one round trip, so one fsync in Redis, for
        all of them. The others are stored one by one, in their place in the
        order. An unknown recipient fails its own send, in its place; so does
        a failure of Redis (a StoreError), and once Redis did not answer, the
        sends left are not tried: each gets a StoreUnavailableError.
        """
        results: list = [None] * len(sends)
        together: list[tuple[int, Send]] = []
        unanswered: StoreUnavailableError | None = None

        def store_together() -> StoreUnavailableError | None:
            messages = [
                _Message(
                    send.sender, send.recipients, self._ids.new(now_ms), now_ms, now_ms + send.ttl_seconds * 1000,
                    send.message_json, False, send.receipt, send.to_json, send.origin_device,
                )
                for _, send in together
            ]
            try:
                landed_all = self._store_messages(messages, now_ms)
            except StoreError as error:
                for (index, _), message in zip(together, messages):
                    results[index] = type(error)(str(error), recheck=_reached(message))
                together.clear()
                return error if isinstance(error, StoreUnavailableError) else None
            unanswered = None
            for (index, _), message, landed in zip(together, messages, landed_all):
                results[index] = self._outcome(landed, message.id, message.ts, message.expires, retried=False)
                if isinstance(results[index], StoreUnavailableError):
                    unanswered = results[index]
            together.clear()
            return unanswered

        known = self._known_users
        for index, send in enumerate(sends):
            if type(send) is not Send:
                send = Send(*send)
            simple = send.cid is None and all(recipient in known for recipient in send.recipients)
            if unanswered is None and together and not simple:
                unanswered = store_together()
            if unanswered is not None:
                results[index] = StoreUnavailableError(f"not tried, as Redis did not answer: {unanswered}")
                continue
            if simple:
                together.append((index, send))
                continue
            try:
                results[index] = self.append(
                    send.sender, send.recipients, send.message_json, send.cid, send.ttl_seconds, now_ms,
                    receipt=send.receipt, to_json=send.to_json, origin_device=send.origin_device,
                )
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
            failure = StoreUnavailableError if isinstance(landed.error, StoreUnavailableError) else StoreError
            return failure(
                f"Redis failed to store a message for {len(landed.failed)} user(s): {landed.error}",
                messages=tuple(landed.stored),
                push_targets=tuple(landed.push_targets),
                recheck=(*landed.already, *landed.failed),  # a script may have failed half-way
            )
        return Accepted(
            id=message_id, ts=ts, expires=expires, messages=tuple(landed.stored),
            duplicate=retried and not landed.stored, push_targets=tuple(landed.push_targets),
            recheck=tuple(landed.already),
        )

    def _store_messages(self, messages: Sequence[_Message], now_ms: int) -> list[_Landed]:
        """Several messages, one script per recipient, all in one round trip; then the copies.

        A recipient's script stores its entry, its receipt record and its
        history entry (in its own slot: the history of a pair of users is
        what each sent the other, each on the side of its recipient). The same
        round trip reads each sender's devices (HKEYS, no script): only a
        sender with a device but the sending one needs a COPY, stored in a
        second round trip. A pipeline Redis did not answer (or refused as a
        whole) raises a StoreError whose ``recheck`` names every user it may
        have reached; an unanswered second one fails the sends it carried.
        """
        append = self._scripts["append"]
        period = self.history_period_ms
        bound = _history_bound(now_ms, period) if period else ""
        expiring: dict[str, int] = {}
        histories: dict[str, int] = {}
        for message in messages:
            for recipient in message.recipients:
                if expiring.get(recipient, message.expires) >= message.expires:
                    expiring[recipient] = message.expires
                if period:
                    _lower(histories, self._history_pair(recipient, message.sender)[1], message.ts + period)
        if not expiring:
            return [_Landed() for _ in messages]
        ops = _Ops(self)
        # The indexes are lowered before (so a crash half-way leaves nothing unindexed) and
        # after (so a purge running meanwhile cannot drop the entry).
        indexes = [(key, index) for key, index in ((self._expiring_key, expiring), (self._histories_key, histories))
                   if index]
        for key, index in indexes:
            ops.call(lambda pipe, key=key, index=index: pipe.zadd(key, index, lt=True))
        for message in messages:
            sender, ttl_ms = message.sender, message.expires - message.ts
            record = _pack(message.id, sender, message.ts, message.expires, message.body)
            check = message.id if message.once else ""
            member = _history_member(message.id, message.ts, message.expires, message.body) if period else b""
            wanted = ""
            if message.receipt:
                wanted = json.dumps({"s": sender, "t": str(ttl_ms), "e": str(message.expires), "d": 0})
            for recipient in message.recipients:
                # Only the keys and arguments the script uses: each one costs on both sides.
                keys = self._mailbox_keys(recipient)
                args = (record, message.expires, check)
                if period:
                    keys += (self._history_pair(recipient, sender)[0],)
                    args += (bound, member)
                if wanted and recipient != sender:
                    keys += self._user_keys(recipient)[7:]
                    args += ("", "", wanted)[len(args) - 3:]
                ops.script(append, keys, args)
        senders = list(dict.fromkeys(m.sender for m in messages if m.recipients and m.sender not in m.recipients))
        for sender in senders:
            ops.call(lambda pipe, sender=sender: pipe.hkeys(self._user_key(sender, "devices")))
        for key, index in indexes:
            ops.call(lambda pipe, key=key, index=index: pipe.zadd(key, index, lt=True))
        try:
            results = ops.run(raise_on_error=False)[len(indexes):len(ops) - len(indexes)]
        except RedisError as error:
            reached = tuple(dict.fromkeys(user for message in messages for user in _reached(message)))
            if isinstance(error, UNANSWERED):
                raise StoreUnavailableError(
                    f"Redis did not answer a pipeline of sends: {error}", recheck=reached
                ) from error
            raise StoreError(f"Redis failed a pipeline of sends: {error}", recheck=reached) from error
        devices_of = {
            sender: devices if isinstance(devices, Exception) else {_text(device) for device in devices}
            for sender, devices in zip(senders, results[len(results) - len(senders):])
        }
        results = iter(results)
        outcomes = []
        copies = []  # (landed, message) for senders with a device but the sending one
        for message in messages:
            sender = message.sender
            landed = _Landed()
            for recipient in message.recipients:
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
                landed.stored.append(
                    StoredMessage(seq, message.id, sender, recipient, message.body, message.ts, message.expires)
                )
                rest = result[2:]
                landed.push_targets.extend(
                    PushTarget(recipient, _text(rest[i]), _text(rest[i + 1]), _text(rest[i + 2]))
                    for i in range(0, len(rest), 3)
                )
            if sender in devices_of:
                devices = devices_of[sender]
                if isinstance(devices, Exception):
                    landed.failed.append(sender)
                    landed.error = landed.error or devices
                elif len(devices) > 1 or (devices and message.origin_device not in devices):
                    copies.append((landed, message))  # a device but the sending one
            outcomes.append(landed)
        if copies:
            self._store_copies(copies)
        return outcomes

    def _store_copies(self, copies: list[tuple[_Landed, _Message]]) -> None:
        """The COPY of each message in its sender's mailbox (one round trip), told in its _Landed."""
        script = self._scripts["copy"]
        expiring: dict[str, int] = {}
        for _, message in copies:
            _lower(expiring, message.sender, message.expires)
        ops = _Ops(self)
        ops.call(lambda pipe: pipe.zadd(self._expiring_key, expiring, lt=True))
        to_jsons = []
        for _, message in copies:
            to_json = message.to_json or orjson.dumps(list(message.recipients))
            to_jsons.append(to_json)
            record = _pack_copy(message.id, message.sender, message.ts, message.expires, to_json, message.body)
            check = message.id + ".c" if message.once else ""
            ops.script(
                script, self._mailbox_keys(message.sender),
                (record, message.expires, check, message.origin_device or ""),
            )
        ops.call(lambda pipe: pipe.zadd(self._expiring_key, expiring, lt=True))
        try:
            results = ops.run(raise_on_error=False)[1:-1]
        except RedisError as error:
            unanswered = isinstance(error, UNANSWERED)
            failure = (StoreUnavailableError if unanswered else StoreError)(f"Redis failed to store copies: {error}")
            results = [failure] * len(copies)
        for (landed, message), to_json, result in zip(copies, to_jsons, results):
            sender = message.sender
            if isinstance(result, Exception):
                landed.failed.append(sender)
                landed.error = landed.error or result
            elif result[0] == 0:
                landed.already.append(sender)  # its copy, from an earlier try
            elif result[0] > 0:
                seq, devices = int(result[0]), int(result[1])
                landed.waiting += devices
                landed.stored.append(StoredMessage(
                    seq, message.id, sender, sender, message.body, message.ts, message.expires, COPY,
                    to_json, message.origin_device,
                ))

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
    def ack(self, user: str, device: str, seqs: Sequence[int], now_ms: int) -> Receipts:
        """ACK the entries; a MESSAGE whose delivered receipt is due gets it stored first.

        Three steps, each safe to stop after: the ACK script ACKs what needs no
        receipt and holds back (and names) the messages that do; their receipts
        are stored in their senders' mailboxes (each under its one receipt id,
        stored once however often this is tried); then the held messages are
        noted as receipted and ACKed. A crash, or an answer lost, between the
        steps leaves those deliveries pending: the device ACKs them again and
        only what is missing is done.
        """
        seqs = list(dict.fromkeys(int(seq) for seq in seqs))
        if not seqs:
            return NO_RECEIPTS
        result = self._user_script("ack", user, device, now_ms, 1, *seqs)
        self._count(pending=-result[0], messages=-result[1])
        rest = result[2:]
        if not rest:
            return NO_RECEIPTS
        held = [
            (int(rest[i]), _text(rest[i + 1]), _text(rest[i + 2]), int(rest[i + 3])) for i in range(0, len(rest), 4)
        ]
        receipts, stored, error = self._store_receipts(
            user, [("delivered", message_id, sender, ttl_ms) for _, message_id, sender, ttl_ms in held], now_ms
        )
        receipted = [seq for (seq, *_), done in zip(held, stored) if done]
        if receipted:
            done, retired, *_ = self._user_script("ack", user, device, now_ms, 0, *receipted)
            self._count(pending=-done, messages=-retired)
        if error is not None:
            raise StoreError(
                f"Redis failed to store a receipt: {error}", messages=receipts.messages,
                push_targets=receipts.push_targets,
            )
        return receipts

    @_redis_errors
    def mark_read(self, user: str, message_ids: Sequence[str], now_ms: int) -> Receipts:
        """Read receipts (and delivered ones not made yet, first), stored before their records are dropped."""
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return NO_RECEIPTS
        result = self._user_script("read_check", user, now_ms, *ids)
        wanted = [
            (_text(result[i]), _text(result[i + 1]), int(result[i + 2]), int(result[i + 3]))
            for i in range(0, len(result), 4)
        ]
        if not wanted:
            return NO_RECEIPTS
        receipts_wanted = []
        for message_id, sender, ttl_ms, delivered in wanted:
            if not delivered:  # read implies delivered: a message read before any device ACKed it gets both
                receipts_wanted.append(("delivered", message_id, sender, ttl_ms))
            receipts_wanted.append(("read", message_id, sender, ttl_ms))
        receipts, stored, error = self._store_receipts(user, receipts_wanted, now_ms)
        missing = {item[1] for item, done in zip(receipts_wanted, stored) if not done}
        done_ids = [message_id for message_id, *_ in wanted if message_id not in missing]
        if done_ids:
            self._user_script("read_done", user, *done_ids)
        if error is not None:
            raise StoreError(
                f"Redis failed to store a receipt: {error}", messages=receipts.messages,
                push_targets=receipts.push_targets,
            )
        return receipts

    def _store_receipts(
        self, by: str, wanted: Sequence[tuple[str, str, str, int]], now_ms: int
    ) -> tuple[Receipts, list[bool], Exception | None]:
        """Store a receipt by ``by`` for each (type, message id, sender, ttl ms), in its sender's mailbox.

        Returns the receipts stored now, whether each is stored (now or by an
        earlier try: its id is stored once), and the first script error. A
        pipeline Redis did not answer raises.
        """
        script = self._scripts["append"]
        expiring: dict[str, int] = {}
        made = []
        for kind, message_id, sender, ttl_ms in wanted:
            receipt = receipt_id(message_id, kind, by)
            body = receipt_json(receipt, kind, message_id, by, now_ms)
            expires = now_ms + ttl_ms
            expiring[sender] = min(expires, expiring.get(sender, expires))
            made.append((receipt, sender, body, expires))
        ops = _Ops(self)
        ops.call(lambda pipe: pipe.zadd(self._expiring_key, expiring, lt=True))
        for receipt, sender, body, expires in made:
            record = _RECEIPT_TAG + _pack(receipt, by, now_ms, expires, body)
            ops.script(script, self._mailbox_keys(sender), (record, expires, receipt))
        ops.call(lambda pipe: pipe.zadd(self._expiring_key, expiring, lt=True))
        results = ops.run(raise_on_error=False)[1:-1]
        messages, push_targets, stored = [], [], []
        error = None
        waiting = 0
        for (receipt, sender, body, expires), result in zip(made, results):
            if isinstance(result, Exception):
                error = error or result
                stored.append(False)
                continue
            stored.append(True)  # or stored before (0), or its sender is gone (-1): nobody to tell
            if result[0] <= 0:
                continue
            waiting += int(result[1])
            messages.append(StoredMessage(int(result[0]), receipt, by, sender, body, now_ms, expires, RECEIPT))
            rest = result[2:]
            push_targets.extend(
                PushTarget(sender, _text(rest[i]), _text(rest[i + 1]), _text(rest[i + 2]))
                for i in range(0, len(rest), 3)
            )
        self._count(messages=len(messages), pending=waiting)
        return Receipts(tuple(messages), tuple(push_targets)), stored, error

    @_redis_errors
    def history(self, user: str, peer: str, before: str | None, limit: int, now_ms: int) -> HistoryPage:
        """What each sent the other, one lexicographic range on each side, merged: O(log n + limit)."""
        if self._unknown_users([peer]):
            raise UnknownUserError([peer])
        period = self.history_period_ms
        if not period or limit <= 0:
            return HistoryPage((), False)
        newest = b"+" if before is None else b"(" + before.encode()
        oldest = b"[" + _history_bound(now_ms, period).encode()
        sides = [(peer, user)] if peer == user else [(peer, user), (user, peer)]  # (sender, recipient)
        ops = _Ops(self)
        for sender, recipient in sides:
            key = self._history_key(recipient, sender)
            ops.call(lambda pipe, key=key: pipe.execute_command(
                "ZRANGE", key, newest, oldest, "BYLEX", "REV", "LIMIT", 0, limit + 1
            ))
        found = [
            (member, sender, recipient)
            for (sender, recipient), members in zip(sides, ops.run())
            for member in members
        ]
        found.sort(key=lambda item: item[0].split(_HISTORY_SEPARATOR, 1)[0], reverse=True)
        return HistoryPage(
            tuple(_history_entry(sender, recipient, member) for member, sender, recipient in found[:limit]),
            more=len(found) > limit,
        )

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
        self._purge_histories(now_ms)
        self._scripts["trim_removals"](
            keys=[self._removals_key], args=[now_ms - REMOVALS_KEPT_MS, REMOVALS_TRIMMED_AT_ONCE]
        )
        return purged

    def _purge_histories(self, now_ms: int) -> None:
        """Trim the conversations whose oldest entry is past the period (all of them when history is off).

        ``histories`` scores each conversation by when its oldest entry goes
        (its ts plus the period), so a purge visits only those with something to drop.
        """
        period = self.history_period_ms
        bound = _history_bound(now_ms, period) if period else ""
        due_by = f"({now_ms}" if period else "+inf"
        while True:
            due = [
                _text(member)
                for member in self._redis.zrangebyscore(self._histories_key, "-inf", due_by, 0, PURGE_HISTORIES_AT_ONCE)
            ]
            if not due:
                break
            ops = _Ops(self)
            for member in due:
                ops.script(self._scripts["trim_history"], [self._history_key(*json.loads(member))], (bound,))
            oldest = dict(zip(due, ops.run()))
            self._reindex_histories(oldest, period)
            if len(due) < PURGE_HISTORIES_AT_ONCE:
                break

    def _reindex(self, earliest: dict[str, int]) -> None:
        """Score purged users by what they have left, then look again.

        A message appended between a user's purge and this update would lose its
        entry, had its own ZADD LT (a no-op while the old, due score stood) come
        before it: asking each user again afterwards and only lowering closes that.
        """
        self._rescore(
            self._expiring_key, earliest,
            lambda ops, user: ops.script(self._scripts["earliest"], self._user_keys(user), ()),
        )

    def _reindex_histories(self, oldest: dict[str, int], period: int) -> None:
        """Score trimmed conversations by their oldest entry left, then look again (as ``_reindex``)."""
        self._rescore(
            self._histories_key,
            {member: ts + period if ts >= 0 else -1 for member, ts in oldest.items()},
            lambda ops, member: ops.script(
                self._scripts["history_oldest"], [self._history_key(*json.loads(member))], ()
            ),
            again=lambda ts: ts + period if ts >= 0 else -1,
        )

    def _rescore(self, key: str, scores: dict[str, int], ask, again=lambda score: score) -> None:
        ops = _Ops(self)
        left = {member: score for member, score in scores.items() if score >= 0}
        if left:
            ops.call(lambda pipe: pipe.zadd(key, left))
        empty = [member for member, score in scores.items() if score < 0]
        if empty:
            ops.call(lambda pipe: pipe.zrem(key, *empty))
        ops.run()
        ops = _Ops(self)
        members = list(scores)
        for member in members:
            ask(ops, member)
        rescored = {member: again(score) for member, score in zip(members, ops.run())}
        rescored = {member: score for member, score in rescored.items() if score >= 0}
        if rescored:
            self._redis.zadd(key, rescored, lt=True)

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

    def _user_keys(self, user: str) -> tuple[str, ...]:
        """The keys every per-user script is given (_USER_KEY_NAMES)."""
        return self._keys(user)[0]

    def _mailbox_keys(self, user: str) -> tuple[str, ...]:
        """The first seven: those of the scripts storing an entry (append, copy), which need no more."""
        return self._keys(user)[1]

    def _keys(self, user: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        keys = self._keys_of.get(user)
        if keys is None:
            if len(self._keys_of) >= KNOWN_USERS_KEPT:
                self._keys_of.clear()
            every = tuple(user_key(self.prefix, user, name) for name in _USER_KEY_NAMES)
            keys = self._keys_of[user] = (every, every[:7])
        return keys

    def _history_key(self, user: str, peer: str) -> str:
        """The history of what ``peer`` sent the user, under the user's tag."""
        return user_key(self.prefix, user, "hist:" + peer)

    @staticmethod
    def _history_member_key(user: str, peer: str) -> str:
        """The member of ``histories`` standing for the user's history key with ``peer``."""
        return json.dumps([user, peer], separators=(",", ":"))

    def _history_pair(self, user: str, peer: str) -> tuple[str, str]:
        """(history key, its member in ``histories``), kept for the pairs seen lately (bounded)."""
        pair = self._history_pairs.get((user, peer))
        if pair is None:
            if len(self._history_pairs) >= KNOWN_USERS_KEPT:
                self._history_pairs.clear()
            pair = self._history_pairs[user, peer] = (
                self._history_key(user, peer), self._history_member_key(user, peer)
            )
        return pair

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
