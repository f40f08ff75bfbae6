"""Tests of the store actor on a real SQLite file: group commit, answers, errors."""
from __future__ import annotations

import time

import pytest

from devastator.actors import StoreActor
from devastator.actors.messages import (
    Ack,
    Append,
    AttachDevice,
    Committed,
    DeviceAttached,
    DevicesRemoved,
    Inspect,
    LoadPending,
    PendingLoaded,
    PollRemovals,
    Register,
    Registered,
    SendResults,
)
from devastator.protocol.errors import FORBIDDEN, INTERNAL_ERROR, UNKNOWN_RECIPIENT
from devastator.store import SqliteStore

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
        ref.ask(Inspect())  # open and idle: what is told next arrives together
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

    counters = store.ask(Inspect())
    assert counters["committed_requests"] == count
    assert 1 <= counters["commits"] < count


def test_a_retried_cid_in_one_group_is_stored_once(start_store, sender, router):
    store = start_store()
    store.tell(append(1, sender, router, cid="c-1"))
    store.tell(append(2, sender, router, cid="c-1"))

    by_key = results(sender, 2)
    assert (by_key[1].id, by_key[1].ts) == (by_key[2].id, by_key[2].ts)
    store.ask(Inspect())
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
    store.ask(Inspect())
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

    def append(self, sender, recipients, message_json, cid, ttl_seconds, now_ms):
        if message_json == b'"boom"':
            raise OSError("disk full")
        return super().append(sender, recipients, message_json, cid, ttl_seconds, now_ms)


def test_a_failed_commit_answers_every_request_and_the_next_group_works(start_store, sender, router):
    store = start_store(_FailingStore)
    user, tablet = Recorder("user"), Recorder("tablet")
    before = store.ask(Inspect())

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
    assert store.ask(Inspect()) == before
    assert router.drain() == []

    store.tell(append(4, sender, router))
    assert results(sender, 1)[4].error is None
    (message,) = router.next(Committed).messages
    # The failed group was rolled back: only the new message is stored.
    store.tell(LoadPending("alice", "phone", 0, 10, user.ref))
    assert user.next(PendingLoaded).messages == (message,)


def test_an_inspect_behind_appends_does_not_hold_them_back(start_store, sender, router):
    """Requests wait in the group until the inbox is empty; a message the actor
    answers at once (Inspect, from the console) must not leave them waiting."""
    store = start_store()
    store.tell(append(1, sender, router))
    store.tell(append(2, sender, router))
    counters = store.ask(Inspect(), block=False)

    assert sorted(results(sender, 2)) == [1, 2]
    counters.get(timeout=2)
