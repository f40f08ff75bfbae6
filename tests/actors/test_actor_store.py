"""Tests of the store actor on a real SQLite file and a real Redis: group commit, answers, errors.

A store failing in the middle of a group is answered truthfully: on SQLite
(one transaction) every request of the group fails and nothing is stored; on
Redis what landed is answered and committed, what did not is an error, and
what Redis did not answer asks for a recheck of its recipients.
"""
from __future__ import annotations

import sqlite3
import time

import pytest
import redis

from devastator.actors import StoreActor
from devastator.actors.messages import (
    Ack,
    Append,
    AttachDevice,
    CommitCountsQuery,
    Committed,
    DeviceAttached,
    DevicesRemoved,
    HealthQuery,
    LoadPending,
    PendingLoaded,
    PollRemovals,
    Register,
    Registered,
    SendResults,
    StoreStatsQuery,
)
from devastator.protocol.errors import FORBIDDEN, INTERNAL_ERROR, UNKNOWN_RECIPIENT
from devastator.actors.messages import MarkRead, ReadMarked
from devastator.store import MESSAGE, RECEIPT, RedisStore, SqliteStore, StoreError, StoreUnavailableError, receipt_id
from redis_server import (  # noqa: F401 (fixtures)
    RedisServer,
    ReplyCutter,
    new_redis_store,
    redis_server,
    require_redis_server,
)

from actor_fakes import Recorder

TTL = 3600


@pytest.fixture
def db_path(tmp_path):
    """A database where alice (device "phone"), bob and carol exist."""
    path = tmp_path / "store.db"
    store = SqliteStore(path, synchronous="NORMAL")
    store.open()
    try:
        now = int(time.time() * 1000)
        for user in ("alice", "bob", "carol"):
            store.add_user(user, now)
        store.add_device("alice", "phone", now)
    finally:
        store.close()
    return path


@pytest.fixture
def phone_registration(db_path) -> str:
    """The registration id of alice's phone (asking again returns the same one)."""
    store = SqliteStore(db_path, synchronous="NORMAL")
    store.open()
    try:
        return store.add_device("alice", "phone", int(time.time() * 1000))
    finally:
        store.close()


@pytest.fixture
def sender():
    return Recorder("sender")  # the device actor that sent msg.send


@pytest.fixture
def router():
    return Recorder("router")


@pytest.fixture
def start_store(db_path):
    def start(store_class=SqliteStore):
        ref = StoreActor.start(store=store_class(db_path, synchronous="NORMAL"))
        ref.ask(CommitCountsQuery())  # open and idle: what is told next arrives together
        return ref

    return start


def append(key: int, sender, router, *, to=("alice",), body: bytes | None = None, cid=None, by="bob"):
    return Append(by, tuple(to), body or b'{"n":%d}' % key, cid, TTL, key, sender.ref, router.ref)


def results(sender, count: int) -> dict:
    """The next ``count`` SendResults, by request key."""
    by_key = {}
    while len(by_key) < count:
        for result in sender.next(SendResults).results:
            assert result.request_key not in by_key
            by_key[result.request_key] = result
    return by_key


def committed(router, count: int) -> list:
    messages = []
    while len(messages) < count:
        messages.extend(router.next(Committed).messages)
    return messages


def test_an_append_is_answered_and_committed(start_store, sender, router):
    store = start_store()
    store.tell(append(1, sender, router, to=("alice", "carol"), body=b'{"text":"hi"}'))

    (result,) = sender.next(SendResults).results
    assert result.request_key == 1 and result.error is None
    assert isinstance(result.id, str) and isinstance(result.ts, int)
    (to_alice, to_carol) = router.next(Committed).messages
    assert (to_alice.recipient, to_carol.recipient) == ("alice", "carol")
    for message in (to_alice, to_carol):
        assert (message.id, message.ts, message.sender) == (result.id, result.ts, "bob")
        assert message.message_json == b'{"text":"hi"}'
        assert message.expires == result.ts + TTL * 1000
    assert to_alice.seq < to_carol.seq


def test_appends_told_together_share_commits_and_are_all_answered(start_store, sender, router):
    store = start_store()
    count = 50
    for key in range(count):
        store.tell(append(key, sender, router, to=("alice",) if key % 2 else ("carol",)))

    by_key = results(sender, count)
    assert sorted(by_key) == list(range(count))
    assert all(result.error is None for result in by_key.values())

    messages = committed(router, count)
    assert [m.message_json for m in messages] == [b'{"n":%d}' % key for key in range(count)]
    assert [m.seq for m in messages] == sorted(m.seq for m in messages)
    assert [m.id for m in messages] == [by_key[key].id for key in range(count)]

    counters = store.ask(CommitCountsQuery())
    assert counters["committed_requests"] == count
    assert 1 <= counters["commits"] < count


def test_a_retried_cid_in_one_group_is_stored_once(start_store, sender, router):
    store = start_store()
    store.tell(append(1, sender, router, cid="c-1"))
    store.tell(append(2, sender, router, cid="c-1"))

    by_key = results(sender, 2)
    assert (by_key[1].id, by_key[1].ts) == (by_key[2].id, by_key[2].ts)
    store.ask(CommitCountsQuery())
    messages = [m for c in router.drain() for m in c.messages]
    assert [m.id for m in messages] == [by_key[1].id]


def test_a_retried_cid_in_a_later_group_is_stored_once(start_store, sender, router):
    store = start_store()
    store.tell(append(1, sender, router, cid="c-1"))
    first = results(sender, 1)[1]
    router.next(Committed)

    store.tell(append(2, sender, router, cid="c-1", body=b'"retried"'))
    again = results(sender, 1)[2]
    assert (again.id, again.ts, again.error) == (first.id, first.ts, None)

    # The same cid from another sender is another message.
    store.tell(append(3, sender, router, cid="c-1", by="carol"))
    other = results(sender, 1)[3]
    assert other.id != first.id
    (message,) = router.next(Committed).messages
    assert message.id == other.id
    store.ask(CommitCountsQuery())
    assert router.drain() == []


def test_an_unknown_recipient_is_refused_and_nothing_is_stored(start_store, sender, router):
    store = start_store()
    store.tell(append(1, sender, router, to=("alice", "mallory")))

    (result,) = sender.next(SendResults).results
    assert (result.id, result.ts) == (None, None)
    assert result.error.code == UNKNOWN_RECIPIENT
    assert result.error.data == {"unknown": ["mallory"]}

    user = Recorder("user")
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))
    assert user.next(PendingLoaded).messages == ()
    assert router.drain() == []


def test_a_new_device_gets_what_is_stored_and_pages_through_it(start_store, sender, router):
    store = start_store()
    for key in range(3):
        store.tell(append(key, sender, router))
    stored = committed(router, 3)
    user, tablet = Recorder("user"), Recorder("tablet")

    store.tell(Register("alice", "tablet", 8, tablet.ref))
    registered = tablet.next(Registered)
    assert (registered.request_key, registered.user, registered.device) == (8, "alice", "tablet")
    store.tell(AttachDevice("alice", "tablet", registered.registration, tablet.ref, 9, user.ref))
    assert user.next(DeviceAttached) == DeviceAttached("tablet", tablet.ref, 9, pending=3)

    store.tell(LoadPending("alice", "tablet", 0, 2, user.ref))
    assert user.next(PendingLoaded) == PendingLoaded("tablet", 0, tuple(stored[:2]), complete=False)
    store.tell(LoadPending("alice", "tablet", stored[1].seq, 2, user.ref))
    assert user.next(PendingLoaded) == PendingLoaded("tablet", stored[1].seq, (stored[2],), complete=True)
    store.tell(LoadPending("alice", "tablet", stored[2].seq, 2, user.ref))
    assert user.next(PendingLoaded) == PendingLoaded("tablet", stored[2].seq, (), complete=True)


def test_acked_messages_are_no_longer_pending(start_store, sender, router, phone_registration):
    store = start_store()
    for key in range(3):
        store.tell(append(key, sender, router))
    stored = committed(router, 3)
    user, phone = Recorder("user"), Recorder("phone")

    store.tell(Ack("alice", "phone", (stored[0].seq, stored[2].seq)))
    store.tell(AttachDevice("alice", "phone", phone_registration, phone.ref, 1, user.ref))
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))

    assert user.next(DeviceAttached).pending == 1
    assert user.next(PendingLoaded).messages == (stored[1],)


def _stored_asking_receipts(store, sender, router):
    """bob's message to alice, which asks for receipts, stored and answered."""
    store.tell(Append("bob", ("alice",), b'"1"', None, TTL, 1, sender.ref, router.ref, receipt=True))
    (stored,) = router.next(Committed).messages
    sender.next(SendResults)
    return stored


def test_an_ack_alone_waits_for_the_next_send_and_they_share_one_commit(db_path, sender, router):
    # One message at a time, a device's ACK comes just before its sender's next msg.send.
    store = StoreActor.start(store=SqliteStore(db_path, synchronous="NORMAL"), hold=60.0)
    try:
        stored = _stored_asking_receipts(store, sender, router)
        before = store.ask(CommitCountsQuery())

        store.tell(Ack("alice", "phone", (stored.seq,), router.ref))
        store.tell(append(2, sender, router))

        assert sender.next(SendResults).results[0].request_key == 2
        told = committed(router, 2)  # the receipt the ACK made, and the new message
        assert sorted(message.kind for message in told) == sorted([RECEIPT, MESSAGE])
        after = store.ask(CommitCountsQuery())
        assert after["commits"] == before["commits"] + 1
        assert after["committed_requests"] == before["committed_requests"] + 2
    finally:
        store.stop()


def test_an_ack_alone_is_committed_once_the_hold_is_over(db_path, sender, router):
    store = StoreActor.start(store=SqliteStore(db_path, synchronous="NORMAL"), hold=0.05)
    try:
        stored = _stored_asking_receipts(store, sender, router)
        told_at = time.monotonic()

        store.tell(Ack("alice", "phone", (stored.seq,), router.ref))

        (delivered,) = router.next(Committed).messages  # told after the commit the hold's end made
        assert delivered.kind == RECEIPT and delivered.recipient == "bob"
        assert time.monotonic() - told_at >= 0.05
    finally:
        store.stop()


def test_a_question_after_an_ack_sees_it_committed_without_waiting_for_the_hold(db_path, sender, router):
    store = StoreActor.start(store=SqliteStore(db_path, synchronous="NORMAL"), hold=60.0)
    try:
        store.tell(append(1, sender, router))
        (stored,) = committed(router, 1)
        store.tell(Ack("alice", "phone", (stored.seq,)))
        assert store.ask(StoreStatsQuery())["pending"] == 0
    finally:
        store.stop()


def test_a_stop_commits_a_held_ack(db_path, sender, router):
    store = StoreActor.start(store=SqliteStore(db_path, synchronous="NORMAL"), hold=60.0)
    store.tell(append(1, sender, router))
    (stored,) = committed(router, 1)
    store.tell(Ack("alice", "phone", (stored.seq,)))
    store.stop()
    reopened = SqliteStore(db_path)
    reopened.open()
    try:
        assert reopened.stats()["pending"] == 0
    finally:
        reopened.close()


def test_attaching_a_device_of_an_unknown_user_is_forbidden(start_store):
    store = start_store()
    user, phone = Recorder("user"), Recorder("phone")
    store.tell(AttachDevice("mallory", "phone", "any", phone.ref, 4, user.ref))

    attached = user.next(DeviceAttached)
    assert (attached.device, attached.device_ref, attached.request_key) == ("phone", phone.ref, 4)
    assert attached.error.code == FORBIDDEN


@pytest.mark.parametrize("device, registration", [("phone", "stale"), ("never-registered", "any")])
def test_attaching_with_a_wrong_registration_is_forbidden(start_store, device, registration):
    store = start_store()
    user, phone = Recorder("user"), Recorder("phone")
    store.tell(AttachDevice("alice", device, registration, phone.ref, 4, user.ref))

    attached = user.next(DeviceAttached)
    assert attached.error.code == FORBIDDEN and "revoked" in attached.error.message


def test_removals_are_polled_from_the_cursor_of_now(start_store, db_path):
    store = start_store()
    router = Recorder("router")
    store.tell(PollRemovals(None, router.ref))
    first = router.next(DevicesRemoved)
    assert first.devices == ()
    other = SqliteStore(db_path, synchronous="NORMAL")  # the CLI, in another process
    other.open()
    assert other.remove_device("alice", "phone", int(time.time() * 1000))
    other.close()

    store.tell(PollRemovals(first.cursor, router.ref))
    second = router.next(DevicesRemoved)
    assert second.devices == (("alice", "phone"),) and second.cursor > first.cursor
    store.tell(PollRemovals(second.cursor, router.ref))
    assert router.next(DevicesRemoved) == DevicesRemoved(second.cursor, ())


class _FailingStore(SqliteStore):
    """Fails any append of the message "boom", as a full disk would."""

    def append(self, sender, recipients, message_json, cid, ttl_seconds, now_ms, **options):
        if message_json == b'"boom"':
            raise OSError("disk full")
        return super().append(sender, recipients, message_json, cid, ttl_seconds, now_ms, **options)


def test_a_failed_commit_answers_every_request_and_the_next_group_works(start_store, sender, router):
    store = start_store(_FailingStore)
    user, tablet = Recorder("user"), Recorder("tablet")
    before = store.ask(CommitCountsQuery())

    store.tell(append(1, sender, router))
    store.tell(append(2, sender, router, body=b'"boom"'))
    store.tell(append(3, sender, router))
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))
    store.tell(AttachDevice("alice", "tablet", "any", tablet.ref, 5, user.ref))

    by_key = results(sender, 3)
    assert {key: (r.id, r.error.code) for key, r in by_key.items()} == {
        1: (None, INTERNAL_ERROR), 2: (None, INTERNAL_ERROR), 3: (None, INTERNAL_ERROR)
    }
    assert user.next(PendingLoaded) == PendingLoaded("phone", 0, (), complete=False, failed=True)
    attached = user.next(DeviceAttached)
    assert (attached.request_key, attached.error.code) == (5, INTERNAL_ERROR)
    assert store.ask(CommitCountsQuery()) == before
    assert router.drain() == []

    store.tell(append(4, sender, router))
    assert results(sender, 1)[4].error is None
    (message,) = router.next(Committed).messages
    # The failed group was rolled back: only the new message is stored.
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))
    assert user.next(PendingLoaded).messages == (message,)


def test_an_inspect_behind_appends_does_not_hold_them_back(start_store, sender, router):
    """Requests wait in the group until the inbox is empty; a message the actor
    answers at once (a query, from the console) must not leave them waiting."""
    store = start_store()
    store.tell(append(1, sender, router))
    store.tell(append(2, sender, router))
    counters = store.ask(CommitCountsQuery(), block=False)

    assert sorted(results(sender, 2)) == [1, 2]
    counters.get(timeout=2)


# -- a store failing in the middle of a group ----------------------------------------------------

POSITIONS = {"first": 0, "middle": 1, "last": 2}


def group_with_a_failure(at: int, sender, router, *, key0: int = 1):
    """Three sends with cids, to alice, bob and carol, the one at ``at`` the message "boom"."""
    return [
        append(key0 + n, sender, router, to=(user,), body=b'"boom"' if n == at else None, cid=f"c-{n}")
        for n, user in enumerate(("alice", "bob", "carol"))
    ]


@pytest.mark.parametrize("position", POSITIONS)
def test_on_sqlite_a_failure_mid_group_fails_the_whole_group_and_a_retry_stores_each_once(
    db_path, start_store, sender, router, position, caplog
):
    db = sqlite3.connect(db_path)
    db.execute(  # SQLite itself refusing one statement of the transaction, as a full disk would
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN CAST(NEW.body AS TEXT) = '\"boom\"'"
        " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    db.commit()
    store = start_store()
    for request in group_with_a_failure(POSITIONS[position], sender, router):
        store.tell(request)

    by_key = results(sender, 3)
    assert {key: (r.id, r.error.code) for key, r in by_key.items()} == {k: (None, INTERNAL_ERROR) for k in (1, 2, 3)}
    assert all("not stored" in r.error.message for r in by_key.values())  # one transaction: none of it was
    assert router.drain() == []
    assert store.ask(StoreStatsQuery())["messages"] == 0
    assert [r.levelname for r in caplog.records if r.name == "devastator.actors.store"] == ["ERROR"]

    db.execute("DROP TRIGGER boom")  # the disk has room again
    db.commit()
    db.close()
    for request in group_with_a_failure(-1, sender, router, key0=11):
        store.tell(request)
    retried = results(sender, 3)
    assert all(r.error is None for r in retried.values())
    assert [m.id for m in committed(router, 3)] == [retried[k].id for k in (11, 12, 13)]
    assert store.ask(StoreStatsQuery())["messages"] == 3
    assert caplog.records[-1].message.startswith("the message store is answering again")


# -- on Redis: each request its own outcome --------------------------------------------------------

@pytest.fixture
def redis_store(new_redis_store):
    """A Redis store (not open) where alice (device "phone"), bob and carol exist."""
    store = new_redis_store()
    store.open()
    for user in ("alice", "bob", "carol"):
        store.add_user(user, int(time.time() * 1000))
    store.add_device("alice", "phone", int(time.time() * 1000))
    store.close()
    return store


@pytest.fixture
def raw(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def start_on(store, **options):
    ref = StoreActor.start(store=store, **options)
    ref.ask(CommitCountsQuery())  # open and idle: what is told next arrives together
    return ref


@pytest.mark.parametrize("position", POSITIONS)
def test_on_redis_what_landed_is_answered_and_committed_and_what_did_not_is_an_error(
    redis_store, raw, sender, router, position
):
    at = POSITIONS[position]
    failing = ("alice", "bob", "carol")[at]
    raw.set(redis_store._user_key(failing, "msgs"), b"broken")  # its script fails, the others' run
    store = start_on(redis_store)
    for request in group_with_a_failure(at, sender, router):
        store.tell(request)

    by_key = results(sender, 3)
    for n, key in enumerate((1, 2, 3)):
        if n == at:
            assert (by_key[key].id, by_key[key].error.code) == (None, INTERNAL_ERROR)
            assert "same cid" in by_key[key].error.message
        else:
            assert by_key[key].error is None
    told = router.next(Committed)
    assert [m.id for m in told.messages] == [by_key[k].id for k in (1, 2, 3) if by_key[k].error is None]
    assert told.recheck == (failing,)  # its script may have run half-way: its mailbox is read again
    assert store.ask(StoreStatsQuery())["messages"] == 2

    raw.delete(redis_store._user_key(failing, "msgs"))
    for request in group_with_a_failure(-1, sender, router, key0=11):  # the client retries all three
        store.tell(request)
    retried = results(sender, 3)
    for n, key in enumerate((11, 12, 13)):
        assert retried[key].error is None
        if n != at:
            assert retried[key].id == by_key[key - 10].id  # the same answer as the first time
    retold = router.next(Committed)
    assert [m.recipient for m in retold.messages] == [failing]
    assert store.ask(StoreStatsQuery())["messages"] == 3  # each stored once


@pytest.fixture
def cutter(redis_server):
    proxy = ReplyCutter(redis_server.port).start()
    yield proxy
    proxy.stop()


def test_on_redis_a_group_redis_did_not_answer_asks_for_a_recheck_and_the_rest_waits_a_moment(
    redis_store, sender, router, cutter, caplog
):
    cut = RedisStore(cutter.url, prefix=redis_store.prefix)
    store = start_on(cut, retry_interval=60.0)
    user = Recorder("user")
    store.tell(append(1, sender, router, to=("alice", "bob")))
    store.ask(CommitCountsQuery())  # alice and bob known to the store now
    router.next(Committed)
    results(sender, 1)

    cutter.arm()
    store.tell(append(2, sender, router, to=("alice", "bob")))
    store.tell(append(3, sender, router, to=("carol",), cid="c-3"))
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))
    by_key = results(sender, 2)
    cutter.armed = False
    assert (by_key[2].error.code, by_key[3].error.code) == (INTERNAL_ERROR, INTERNAL_ERROR)
    assert "may have been stored" in by_key[2].error.message
    assert "not stored" in by_key[3].error.message  # not tried: Redis had stopped answering
    assert router.next(Committed) == Committed((), (), recheck=("alice", "bob"))
    assert user.next(PendingLoaded).failed
    assert cutter.cut == 1

    # Within the retry interval, a new group is answered at once, without a try.
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))
    assert user.next(PendingLoaded).failed
    assert "the message store has been failing" in store.ask(HealthQuery())["failing"]
    with pytest.raises(StoreUnavailableError):
        store.ask(StoreStatsQuery())
    assert cutter.cut == 1
    store_records = [r for r in caplog.records if r.name == "devastator.actors.store"]
    assert [(r.levelname, r.exc_info) for r in store_records] == [("ERROR", None)]


def test_on_redis_an_outage_is_logged_when_it_starts_and_when_it_ends(tmp_path, sender, router, caplog):
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        redis_store = RedisStore(server.url)
        store = start_on(redis_store, retry_interval=0.0)
        store.tell(Register("alice", "phone", 1, sender.ref))
        sender.next(Registered)
        server.kill()
        for key in range(10, 15):  # one group after another, each failing
            store.tell(append(key, sender, router))
            assert results(sender, 1)[key].error.code == INTERNAL_ERROR
        assert "Redis did not answer" in store.ask(HealthQuery())["failing"]
        server.start()
        store.tell(append(20, sender, router))
        assert results(sender, 1)[20].error is None
        assert store.ask(HealthQuery()) == {"failing": None}
    finally:
        server.stop()
    lines = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "devastator.actors.store"]
    assert len(lines) == 2, lines
    (started, ended) = lines
    assert started[0] == "ERROR" and "the message store is failing: Redis did not answer" in started[1]
    assert ended[0] == "WARNING" and "answering again" in ended[1] and "commits 5, requests 5" in ended[1]
    assert started[2] is None and ended[2] is None  # no traceback


class _AckFailsAfterReceipts(SqliteStore):
    """A store that is not all or nothing (as Redis): its ACK stores receipts, then fails."""

    all_or_nothing = False

    def ack(self, user, device, seqs, now_ms):
        receipts = super().ack(user, device, seqs, now_ms)
        raise StoreError("the shard went away", messages=receipts.messages, push_targets=receipts.push_targets)

    def mark_read(self, user, message_ids, now_ms):
        receipts = super().mark_read(user, message_ids, now_ms)
        raise StoreError("the shard went away", messages=receipts.messages, push_targets=receipts.push_targets)


def test_receipts_stored_by_an_ack_or_a_read_that_then_failed_are_told_all_the_same(start_store, sender, router):
    store = start_store(_AckFailsAfterReceipts)
    store.tell(Append("bob", ("alice",), b'"ticks"', None, TTL, 1, sender.ref, router.ref, receipt=True))
    (stored,) = router.next(Committed).messages
    sender.next(SendResults)
    store.tell(Ack("alice", "phone", (stored.seq,), router.ref))
    (delivered,) = router.next(Committed).messages
    assert (delivered.kind, delivered.recipient, delivered.sender) == (RECEIPT, "bob", "alice")
    store.tell(MarkRead("alice", (stored.id,), 7, sender.ref, router.ref))
    (read,) = router.next(Committed).messages
    assert read.id == receipt_id(stored.id, "read", "alice")
    answer = sender.next(ReadMarked)
    assert answer.request_key == 7 and answer.error.code == INTERNAL_ERROR
