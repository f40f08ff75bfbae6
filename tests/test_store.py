"""The store contract: what every Store implementation must do, run against each of them.

Each test gets a fresh, open store from the ``store`` fixture, which is
parametrised by implementation, so a clustered store passes exactly these.
"""
from __future__ import annotations

import orjson
import pytest

from devastator.store import (
    COPY,
    HistoryPage,
    MESSAGE,
    NO_RECEIPTS,
    RECEIPT,
    DeviceRecord,
    PushTarget,
    RedisStore,
    Send,
    SqliteStore,
    UnknownDeviceError,
    UnknownUserError,
    receipt_id,
    receipt_json,
)
from redis_server import new_redis_store, redis_server  # noqa: F401 (fixtures)

NOW = 1_800_000_000_000  # ms
TTL = 3600
PERIOD = 30 * 24 * 3600 * 1000  # the history period the stores are made with (the default), ms


def sqlite_store(request, tmp_path):
    return SqliteStore(tmp_path / "store.db", synchronous="NORMAL", history_period_ms=PERIOD)


def redis_store(request, tmp_path):
    # A fresh key prefix on the session's redis-server (skipped without one, failed under CI).
    return request.getfixturevalue("new_redis_store")(history_period_ms=PERIOD)


STORES = {"redis": redis_store, "sqlite": sqlite_store}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    store = STORES[request.param](request, tmp_path)
    store.open()
    yield store
    store.close()


def registered(store, user: str, device: str) -> str:
    store.add_user(user, NOW)
    return store.add_device(user, device, NOW)


def send(
    store, recipients, body=b'"hi"', *, cid=None, ttl=TTL, now=NOW, sender="alice", receipt=False, to_json=b"",
    origin=None,
):
    with store.batch():
        return store.append(
            sender, list(recipients), body, cid, ttl, now, receipt=receipt, to_json=to_json, origin_device=origin
        )


def pending(store, user, device, now=NOW):
    return store.load_pending(user, device, 0, 1000, now)


def ack(store, user, device, entries, now=NOW):
    """ACK these entries (StoredMessages or seqs) as the device; the Receipts it stored."""
    with store.batch():
        return store.ack(user, device, [getattr(e, "seq", e) for e in entries], now)


def read(store, user, ids, now=NOW):
    with store.batch():
        return store.mark_read(user, list(ids), now)


def history(store, user, peer, before=None, limit=100, now=NOW):
    return store.history(user, peer, before, limit, now)


def same_data(store, **options):
    """Another store on the same data, as the CLI opens it in another process."""
    options.setdefault("history_period_ms", store.history_period_ms)
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path, synchronous="NORMAL", **options)
    assert isinstance(store, RedisStore)
    return RedisStore(store.url, cluster_nodes=store.cluster_nodes, prefix=store.prefix, **options)


def with_period(store, period_ms: int):
    """The store closed and opened again on its data with another history period (set before open)."""
    store.close()
    store.history_period_ms = period_ms
    store.open()
    return store


# -- users and devices ---------------------------------------------------------------


def test_users_are_created_once(store):
    assert store.add_user("alice", NOW) is True
    assert store.add_user("alice", NOW) is False
    assert store.list_users() == ["alice"]


def test_a_device_keeps_its_registration_until_removed(store):
    first = registered(store, "bob", "phone")
    assert store.add_device("bob", "phone", NOW + 1) == first
    assert store.remove_device("bob", "phone", NOW) is True
    assert store.remove_device("bob", "phone", NOW) is False
    assert store.add_device("bob", "phone", NOW) != first


def test_a_device_of_an_unknown_user_is_refused(store):
    with pytest.raises(UnknownUserError):
        store.add_device("nobody", "phone", NOW)


def test_devices_are_listed_with_their_history(store):
    registration = registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    store.attach_device("bob", "phone", registration, NOW + 5)
    assert store.list_devices("bob") == [
        DeviceRecord("laptop", NOW, None),
        DeviceRecord("phone", NOW, NOW + 5),
    ]


def test_attaching_checks_user_device_and_registration(store):
    registration = registered(store, "bob", "phone")
    with pytest.raises(UnknownUserError):
        store.attach_device("nobody", "phone", registration, NOW)
    with pytest.raises(UnknownDeviceError):
        store.attach_device("bob", "tablet", registration, NOW)
    with pytest.raises(UnknownDeviceError):
        store.attach_device("bob", "phone", "stale", NOW)
    assert store.attach_device("bob", "phone", registration, NOW).pending == 0


# -- messages ----------------------------------------------------------------------------


def test_a_message_waits_for_every_device_in_order(store):
    phone, laptop = registered(store, "bob", "phone"), registered(store, "bob", "laptop")
    first = send(store, ["bob"], b'"one"')
    second = send(store, ["bob"], b'"two"')
    for device, registration in (("phone", phone), ("laptop", laptop)):
        assert store.attach_device("bob", device, registration, NOW).pending == 2
        assert [m.id for m in pending(store, "bob", device)] == [first.id, second.id]
    (message,) = first.messages
    assert (message.sender, message.recipient, message.message_json) == ("alice", "bob", b'"one"')
    assert message.expires == NOW + TTL * 1000


def test_unknown_recipients_fail_the_whole_send(store):
    registered(store, "bob", "phone")
    with pytest.raises(UnknownUserError) as unknown:
        send(store, ["bob", "carol"])
    assert unknown.value.args[0] == ["carol"]
    assert pending(store, "bob", "phone") == []


def test_a_retried_cid_is_stored_once_with_the_same_answer(store):
    registered(store, "bob", "phone")
    first = send(store, ["bob"], cid="c-1")
    again = send(store, ["bob"], cid="c-1", now=NOW + 10)
    assert (again.id, again.ts, again.duplicate, again.messages) == (first.id, first.ts, True, ())
    assert len(pending(store, "bob", "phone")) == 1
    other_sender = send(store, ["bob"], cid="c-1", sender="carol")
    assert other_sender.id != first.id


def test_pages_follow_the_cursor(store):
    registered(store, "bob", "phone")
    ids = [send(store, ["bob"], b"%d" % n).id for n in range(5)]
    page = store.load_pending("bob", "phone", 0, 2, NOW)
    assert [m.id for m in page] == ids[:2]
    rest = store.load_pending("bob", "phone", page[-1].seq, 10, NOW)
    assert [m.id for m in rest] == ids[2:]


def test_a_message_is_retired_once_every_device_acked(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    (message,) = send(store, ["bob"]).messages
    with store.batch():
        store.ack("bob", "phone", [message.seq], NOW)
    assert pending(store, "bob", "phone") == []
    assert [m.id for m in pending(store, "bob", "laptop")] == [message.id]
    with store.batch():
        store.ack("bob", "laptop", [message.seq], NOW)
    assert pending(store, "bob", "laptop") == []


def test_seqs_only_grow_once_a_mailbox_is_empty_after_a_rollback_and_after_reopening(store):
    # A device's "after seq" cursor stays right only if no seq is ever given again.
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    (first,) = send(store, ["bob"]).messages
    ack(store, "bob", "phone", [first])  # the mailbox is empty: nothing holds the last seq
    (second,) = send(store, ["bob"]).messages
    assert second.seq > first.seq
    if store.all_or_nothing:  # a transaction rolled back leaves nothing behind that later seqs could meet
        with pytest.raises(ZeroDivisionError), store.batch():
            store.append("alice", ["bob"], b'"lost"', None, TTL, NOW)
            1 / 0
    ack(store, "bob", "phone", [second])
    store.close()
    store.open()
    results = store.append_many([Send("alice", ["bob", "carol"], b'"after"', None, TTL),
                                 Send("alice", ["carol"], b'"again"', None, TTL)], NOW)
    seqs = [(m.recipient, m.seq) for accepted in results for m in accepted.messages]
    assert [recipient for recipient, _ in seqs] == ["bob", "carol", "carol"]
    bob_seq = seqs[0][1]
    assert bob_seq > second.seq
    assert [m.seq for m in pending(store, "bob", "phone")] == [bob_seq]
    assert [m.message_json for m in pending(store, "carol", "phone")] == [b'"after"', b'"again"']


def test_expired_messages_are_not_loaded_and_are_purged(store):
    registered(store, "bob", "phone")
    send(store, ["bob"], ttl=1)
    kept = send(store, ["bob"], ttl=TTL)
    later = NOW + 2000
    assert [m.id for m in pending(store, "bob", "phone", now=later)] == [kept.id]
    with store.batch():
        assert store.purge_expired(later) == 1
    assert [m.id for m in pending(store, "bob", "phone", now=later)] == [kept.id]


def test_a_first_attachment_gets_what_is_still_stored(store):
    registered(store, "bob", "phone")
    sent = send(store, ["bob"])
    tablet = store.add_device("bob", "tablet", NOW)
    assert store.attach_device("bob", "tablet", tablet, NOW).pending == 1
    assert [m.id for m in pending(store, "bob", "tablet")] == [sent.id]


def test_a_user_with_no_device_keeps_messages_for_the_first(store):
    store.add_user("carol", NOW)
    sent = send(store, ["carol"])
    first = store.add_device("carol", "first", NOW)
    assert store.attach_device("carol", "first", first, NOW).pending == 1
    assert [m.id for m in pending(store, "carol", "first")] == [sent.id]


# -- removing devices ----------------------------------------------------------------------


def test_removing_a_device_retires_what_only_it_waited_for(store):
    registered(store, "bob", "phone")
    laptop = registered(store, "bob", "laptop")
    (message,) = send(store, ["bob"]).messages
    with store.batch():
        store.ack("bob", "laptop", [message.seq], NOW)
    store.remove_device("bob", "phone", NOW)
    # Nobody waits for it now: a device attaching for the first time does not get it.
    tablet = store.add_device("bob", "tablet", NOW)
    assert store.attach_device("bob", "tablet", tablet, NOW).pending == 0
    assert store.attach_device("bob", "laptop", laptop, NOW).pending == 0


def test_removing_the_last_device_keeps_messages_for_the_next(store):
    registered(store, "bob", "phone")
    sent = send(store, ["bob"])
    store.remove_device("bob", "phone", NOW)
    tablet = store.add_device("bob", "tablet", NOW)
    assert store.attach_device("bob", "tablet", tablet, NOW).pending == 1
    assert [m.id for m in pending(store, "bob", "tablet")] == [sent.id]


def test_removals_are_read_from_a_cursor(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    start = store.removed_devices(None)
    assert start.devices == ()
    store.remove_device("bob", "phone", NOW)
    store.remove_device("bob", "laptop", NOW)
    removed = store.removed_devices(start.cursor)
    assert removed.devices == (("bob", "phone"), ("bob", "laptop"))
    assert store.removed_devices(removed.cursor).devices == ()
    assert store.removed_devices(None).cursor == removed.cursor


# -- push tokens ---------------------------------------------------------------------------


def test_a_push_token_is_kept_with_its_device_and_named_at_each_send(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    assert store.set_push_token("bob", "phone", "fcm", "t-1") is True
    assert store.set_push_token("bob", "ghost", "fcm", "t-2") is False
    accepted = send(store, ["bob"])
    assert accepted.push_targets == (PushTarget("bob", "phone", "fcm", "t-1"),)
    assert store.device_for_push_token("fcm", "t-1") == ("bob", "phone")
    assert store.device_for_push_token("apns", "t-1") is None


def test_a_push_token_belongs_to_one_device(store):
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    store.set_push_token("bob", "phone", "fcm", "t-1")
    store.set_push_token("carol", "phone", "fcm", "t-1")
    assert store.device_for_push_token("fcm", "t-1") == ("carol", "phone")
    assert send(store, ["bob"]).push_targets == ()


def test_a_dead_token_is_removed_only_if_the_device_still_has_it(store):
    registered(store, "bob", "phone")
    store.set_push_token("bob", "phone", "fcm", "t-1")
    store.set_push_token("bob", "phone", "fcm", "t-2")  # the app got a new token meanwhile
    assert store.remove_push_token("bob", "phone", "fcm", "t-1") is False
    assert store.device_for_push_token("fcm", "t-2") == ("bob", "phone")
    assert store.remove_push_token("bob", "phone", "fcm", "t-2") is True
    assert send(store, ["bob"]).push_targets == ()


# -- operators' views ------------------------------------------------------------------------


def test_the_backlog_counts_pending_deliveries_per_device(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    send(store, ["bob"], now=NOW)
    (later,) = send(store, ["bob"], now=NOW + 5).messages
    with store.batch():
        store.ack("bob", "laptop", [later.seq], NOW)
    assert store.backlog("bob", NOW + 10) == {"phone": (2, NOW), "laptop": (1, NOW)}
    assert store.backlog("nobody", NOW) == {}


def test_expiring_a_user_s_messages_empties_every_device(store):
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    send(store, ["bob", "carol"])
    send(store, ["bob"])
    assert store.expire_user("bob", NOW) == 2
    assert pending(store, "bob", "phone") == []
    assert len(pending(store, "carol", "phone")) == 1
    assert store.stats() == {"users": 2, "devices": 2, "messages": 1, "pending": 1}


def test_the_counts_follow_every_change(store):
    counts = {"users": 0, "devices": 0, "messages": 0, "pending": 0}

    def changed(**deltas):
        for name, delta in deltas.items():
            counts[name] += delta
        assert store.stats() == counts

    changed()
    phone = registered(store, "bob", "phone")
    registered(store, "bob", "phone")  # nothing new
    store.add_user("carol", NOW)  # no device yet
    changed(users=2, devices=1)
    first = send(store, ["bob", "carol"]).messages[0]
    (second,) = send(store, ["bob"], cid="c-1").messages
    send(store, ["bob"], cid="c-1")  # a retry stores nothing
    changed(messages=3, pending=2)
    laptop = store.add_device("bob", "laptop", NOW)
    store.attach_device("bob", "laptop", laptop, NOW)  # a first attachment: bob's two messages
    store.attach_device("bob", "phone", phone, NOW)
    changed(devices=1, pending=2)
    with store.batch():
        store.ack("bob", "phone", [first.seq, second.seq], NOW)
        store.ack("bob", "phone", [first.seq], NOW)  # again: nothing more
    changed(pending=-2)
    with store.batch():
        store.ack("bob", "laptop", [first.seq], NOW)  # nobody waits for it now
    changed(messages=-1, pending=-1)
    store.remove_device("bob", "laptop", NOW)  # the second was only the laptop's
    changed(devices=-1, messages=-1, pending=-1)
    assert store.remove_device("bob", "laptop", NOW) is False
    changed()
    assert store.expire_user("carol", NOW) == 1
    changed(messages=-1)
    send(store, ["bob"], ttl=1)
    changed(messages=1, pending=1)
    with store.batch():
        store.purge_expired(NOW + 1000)
    changed(messages=-1, pending=-1)
    assert counts == {"users": 2, "devices": 1, "messages": 0, "pending": 0}


def test_the_counts_include_what_another_process_changed(store):
    other = same_data(store)
    other.open()
    try:
        registered(other, "bob", "phone")
        send(other, ["bob"])
    finally:
        other.close()
    assert store.stats() == {"users": 1, "devices": 1, "messages": 1, "pending": 1}
    (message,) = pending(store, "bob", "phone")
    with store.batch():
        store.ack("bob", "phone", [message.seq], NOW)
    other.open()
    try:
        assert other.stats() == {"users": 1, "devices": 1, "messages": 0, "pending": 0}
    finally:
        other.close()


def test_several_sends_at_once_keep_their_order_and_their_own_failures(store):
    registered(store, "bob", "phone")
    store.add_user("carol", NOW)
    sends = [
        Send("alice", ["bob"], b'"one"', None, TTL),
        Send("alice", ["bob", "nobody"], b'"lost"', None, TTL),
        Send("alice", ["bob", "carol"], b'"two"', "c-1", TTL),
        Send("alice", ["bob"], b'"three"', None, TTL),
        Send("alice", ["bob"], b'"two again"', "c-1", TTL),
    ]
    with store.batch():
        results = store.append_many(sends, NOW)
    assert isinstance(results[1], UnknownUserError) and results[1].args[0] == ["nobody"]
    assert results[4].duplicate and results[4].id == results[2].id
    assert [m.message_json for m in pending(store, "bob", "phone")] == [b'"one"', b'"two"', b'"three"']
    seqs = [results[i].messages[0].seq for i in (0, 2, 3)]
    assert seqs == sorted(seqs)


def test_several_sends_at_once_carry_receipts_and_copies(store):
    registered(store, "alice", "phone")
    registered(store, "alice", "laptop")
    registered(store, "bob", "phone")
    sends = [
        Send("alice", ["bob"], b'"one"', None, TTL, receipt=True, to_json=b'"bob"', origin_device="phone"),
        Send("alice", ["bob"], b'"two"', "c-2", TTL, origin_device="laptop"),
    ]
    with store.batch():
        first, second = store.append_many(sends, NOW)
    assert [m.kind for m in first.messages] == [MESSAGE, COPY]
    assert first.messages[1].to_json == b'"bob"'
    assert [m.id for m in pending(store, "alice", "laptop")] == [first.id]
    assert [m.id for m in pending(store, "alice", "phone")] == [second.id]
    to_bob = pending(store, "bob", "phone")
    assert [m.message_json for m in to_bob] == [b'"one"', b'"two"']
    (receipt,) = ack(store, "bob", "phone", to_bob).messages  # only the first asked
    assert receipt.id == receipt_id(first.id, "delivered", "bob")


# -- copies to the sender's other devices ------------------------------------------------------


def test_a_copy_waits_for_each_of_the_sender_s_devices_but_the_one_that_sent(store):
    registered(store, "alice", "phone")
    registered(store, "alice", "laptop")
    registered(store, "bob", "phone")
    store.set_push_token("alice", "laptop", "fcm", "t-alice")
    store.set_push_token("bob", "phone", "fcm", "t-bob")
    accepted = send(store, ["bob"], b'"hi"', to_json=b'"bob"', origin="phone")
    to_bob, copy = accepted.messages
    assert (to_bob.kind, to_bob.recipient, to_bob.to_json) == (MESSAGE, "bob", b"")
    assert (copy.kind, copy.id, copy.sender, copy.recipient) == (COPY, accepted.id, "alice", "alice")
    assert (copy.message_json, copy.to_json, copy.origin_device) == (b'"hi"', b'"bob"', "phone")
    assert (copy.ts, copy.expires) == (NOW, NOW + TTL * 1000)
    # A copy wakes nobody: only the recipients' devices are push targets.
    assert accepted.push_targets == (PushTarget("bob", "phone", "fcm", "t-bob"),)
    assert pending(store, "alice", "phone") == []
    (loaded,) = pending(store, "alice", "laptop")
    assert (loaded.seq, loaded.kind, loaded.id, loaded.sender, loaded.to_json) == (
        copy.seq, COPY, accepted.id, "alice", b'"bob"'
    )
    assert loaded.message_json == b'"hi"' and loaded.origin_device is None


def test_a_copy_without_an_origin_goes_to_every_device_and_names_the_recipients(store):
    registered(store, "alice", "phone")
    registered(store, "alice", "laptop")
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    accepted = send(store, ["bob", "carol"])  # the server API: no sending device, no "to" as sent
    assert [m.recipient for m in accepted.messages] == ["bob", "carol", "alice"]
    copy = accepted.messages[-1]
    assert copy.kind == COPY and orjson.loads(copy.to_json) == ["bob", "carol"]
    for device in ("phone", "laptop"):
        (loaded,) = pending(store, "alice", device)
        assert loaded.kind == COPY and orjson.loads(loaded.to_json) == ["bob", "carol"]


def test_no_copy_when_the_sender_is_a_recipient_or_has_no_other_device(store):
    registered(store, "alice", "phone")
    registered(store, "bob", "phone")
    alone = send(store, ["bob"], origin="phone")
    assert [m.kind for m in alone.messages] == [MESSAGE]
    registered(store, "alice", "laptop")
    to_self = send(store, ["alice", "bob"], origin="phone")
    assert [(m.recipient, m.kind) for m in to_self.messages] == [("alice", MESSAGE), ("bob", MESSAGE)]
    assert [(m.id, m.kind) for m in pending(store, "alice", "laptop")] == [(to_self.id, MESSAGE)]
    assert [m.id for m in pending(store, "alice", "phone")] == [to_self.id]
    # A sender with no device at all (a backend sending as "system") gets no copy either.
    store.add_user("system", NOW)
    assert [m.kind for m in send(store, ["bob"], sender="system").messages] == [MESSAGE]


def test_a_device_attaching_first_later_gets_the_copies_still_pending(store):
    registered(store, "alice", "phone")
    registered(store, "alice", "laptop")
    registered(store, "bob", "phone")
    accepted = send(store, ["bob"], to_json=b'"bob"', origin="phone")
    tablet = store.add_device("alice", "tablet", NOW + 5)
    assert store.attach_device("alice", "tablet", tablet, NOW + 5).pending == 1
    (copy,) = pending(store, "alice", "tablet")
    assert (copy.kind, copy.id, copy.to_json) == (COPY, accepted.id, b'"bob"')


def test_a_copy_is_retired_by_the_acks_of_the_devices_it_waited_for(store):
    registered(store, "alice", "phone")
    registered(store, "alice", "laptop")
    registered(store, "bob", "phone")
    copy = send(store, ["bob"], origin="phone", receipt=True).messages[-1]
    assert ack(store, "alice", "laptop", [copy]) == NO_RECEIPTS  # a copy makes no receipt
    assert pending(store, "alice", "laptop") == []
    assert store.stats()["messages"] == 1  # bob's entry only


# -- receipts ----------------------------------------------------------------------------------


def receipt_senders(store, sender="alice"):
    """The sender (alice) with two devices, a push token on the laptop; bob with two devices, carol one."""
    registered(store, sender, "phone")
    registered(store, sender, "laptop")
    store.set_push_token(sender, "laptop", "apns", "t-laptop")
    registered(store, "bob", "phone")
    registered(store, "bob", "tablet")
    registered(store, "carol", "phone")


def test_the_first_ack_of_a_recipient_stores_one_delivered_receipt_for_the_sender(store):
    receipt_senders(store)
    accepted = send(store, ["bob"], b'"hi"', receipt=True, origin="phone")
    (to_bob,) = pending(store, "bob", "phone")
    receipts = ack(store, "bob", "phone", [to_bob], now=NOW + 5)
    (receipt,) = receipts.messages
    rid = receipt_id(accepted.id, "delivered", "bob")
    assert (receipt.kind, receipt.id, receipt.sender, receipt.recipient) == (RECEIPT, rid, "bob", "alice")
    assert orjson.loads(receipt.message_json) == {
        "id": rid, "type": "delivered", "message": accepted.id, "by": "bob", "ts": NOW + 5
    }
    assert receipt.message_json == receipt_json(rid, "delivered", accepted.id, "bob", NOW + 5)
    assert receipt.ts == NOW + 5
    # The sender's devices with push tokens are returned, to be woken as for a message.
    assert receipts.push_targets == (PushTarget("alice", "laptop", "apns", "t-laptop"),)
    # Waiting for every device of the sender, after what was there before.
    (stored,) = pending(store, "alice", "phone")
    assert stored == receipt
    assert [m.kind for m in pending(store, "alice", "laptop")] == [COPY, RECEIPT]
    # The user's other device, and the same device again, make no second one.
    (on_tablet,) = pending(store, "bob", "tablet")
    assert ack(store, "bob", "tablet", [on_tablet], now=NOW + 6) == NO_RECEIPTS
    assert ack(store, "bob", "phone", [to_bob], now=NOW + 7) == NO_RECEIPTS
    assert [m.id for m in pending(store, "alice", "phone")] == [rid]


def test_no_receipt_for_a_message_that_did_not_ask(store):
    receipt_senders(store)
    accepted = send(store, ["bob"], origin="phone")
    assert ack(store, "bob", "phone", pending(store, "bob", "phone")) == NO_RECEIPTS
    assert read(store, "bob", [accepted.id]) == NO_RECEIPTS
    assert [m.kind for m in pending(store, "alice", "laptop")] == [COPY]
    assert pending(store, "alice", "phone") == []


def test_no_receipt_for_the_sender_s_own_entries(store):
    receipt_senders(store)
    accepted = send(store, ["alice", "bob"], receipt=True, origin="phone")
    # Sent to oneself (and to bob): alice's devices get it as a recipient and ACK it.
    for device in ("phone", "laptop"):
        (entry,) = pending(store, "alice", device)
        assert entry.kind == MESSAGE
        assert ack(store, "alice", device, [entry]) == NO_RECEIPTS
    assert read(store, "alice", [accepted.id]) == NO_RECEIPTS
    (receipt,) = ack(store, "bob", "phone", pending(store, "bob", "phone")).messages
    assert (receipt.recipient, receipt.sender) == ("alice", "bob")


def test_each_recipient_of_a_group_message_makes_its_own_receipts(store):
    receipt_senders(store)
    accepted = send(store, ["bob", "carol"], receipt=True, origin="phone")
    by_bob = ack(store, "bob", "tablet", pending(store, "bob", "tablet")).messages
    by_carol = ack(store, "carol", "phone", pending(store, "carol", "phone")).messages
    assert [m.id for m in by_bob + by_carol] == [
        receipt_id(accepted.id, "delivered", "bob"), receipt_id(accepted.id, "delivered", "carol")
    ]
    read_by_carol = read(store, "carol", [accepted.id], now=NOW + 10).messages
    assert [m.id for m in read_by_carol] == [receipt_id(accepted.id, "read", "carol")]
    assert [orjson.loads(m.message_json)["type"] for m in pending(store, "alice", "phone")] == [
        "delivered", "delivered", "read"
    ]


def test_a_read_receipt_is_stored_once_for_messages_sent_to_the_reader_that_asked(store):
    receipt_senders(store)
    asked = send(store, ["bob"], receipt=True, origin="phone")
    not_asked = send(store, ["bob"], origin="phone")
    to_carol = send(store, ["carol"], receipt=True, origin="phone")
    ack(store, "bob", "phone", pending(store, "bob", "phone"))
    receipts = read(store, "bob", [asked.id, not_asked.id, to_carol.id, "no-such-id", asked.id], now=NOW + 9)
    (receipt,) = receipts.messages
    rid = receipt_id(asked.id, "read", "bob")
    assert (receipt.kind, receipt.id, receipt.sender, receipt.recipient) == (RECEIPT, rid, "bob", "alice")
    assert receipt.message_json == receipt_json(rid, "read", asked.id, "bob", NOW + 9)
    assert receipts.push_targets == (PushTarget("alice", "laptop", "apns", "t-laptop"),)
    assert read(store, "bob", [asked.id], now=NOW + 10) == NO_RECEIPTS
    assert read(store, "bob", [], now=NOW + 10) == NO_RECEIPTS
    assert [m.id for m in pending(store, "alice", "phone")] == [receipt_id(asked.id, "delivered", "bob"), rid]


def test_a_message_read_before_any_ack_gets_its_delivered_receipt_first_and_once(store):
    receipt_senders(store)
    accepted = send(store, ["bob"], receipt=True, origin="phone")
    receipts = read(store, "bob", [accepted.id])
    assert [m.id for m in receipts.messages] == [
        receipt_id(accepted.id, "delivered", "bob"), receipt_id(accepted.id, "read", "bob")
    ]
    assert ack(store, "bob", "phone", pending(store, "bob", "phone")) == NO_RECEIPTS
    assert len(pending(store, "alice", "phone")) == 2


def test_a_receipt_lives_for_the_message_s_ttl_counted_from_when_it_is_made(store):
    receipt_senders(store)
    send(store, ["bob"], receipt=True, ttl=10, origin="phone")
    made = NOW + 8000
    (receipt,) = ack(store, "bob", "phone", pending(store, "bob", "phone"), now=made).messages
    assert receipt.expires == made + 10_000
    # The message has expired, its receipt has not.
    assert [m.id for m in pending(store, "alice", "phone", now=NOW + 12_000)] == [receipt.id]
    with store.batch():
        store.purge_expired(NOW + 12_000)
    assert [m.id for m in pending(store, "alice", "phone", now=NOW + 12_000)] == [receipt.id]
    assert pending(store, "alice", "phone", now=made + 10_000) == []


def test_no_receipt_once_the_message_expired_and_its_record_is_purged(store):
    receipt_senders(store)
    expired = send(store, ["bob"], receipt=True, ttl=1, origin="phone")
    kept = send(store, ["bob"], receipt=True, ttl=TTL, origin="phone")
    assert read(store, "bob", [expired.id], now=NOW + 1000) == NO_RECEIPTS  # expired
    with store.batch():
        store.purge_expired(NOW + 1000)
    # Asked as if earlier: the record is gone, not only out of date.
    assert read(store, "bob", [expired.id], now=NOW + 500) == NO_RECEIPTS
    assert [m.id for m in read(store, "bob", [kept.id], now=NOW + 500).messages] == [
        receipt_id(kept.id, "delivered", "bob"), receipt_id(kept.id, "read", "bob")
    ]


def test_receipts_are_retired_by_the_sender_s_acks(store):
    receipt_senders(store)
    send(store, ["bob"], receipt=True, origin="phone")
    ack(store, "bob", "phone", pending(store, "bob", "phone"))
    for device in ("phone", "laptop"):
        assert ack(store, "alice", device, pending(store, "alice", device)) == NO_RECEIPTS
        assert pending(store, "alice", device) == []
    assert store.stats()["messages"] == 1  # bob's tablet still waits for the message


def test_the_counts_follow_copies_and_receipts(store):
    receipt_senders(store)
    base = store.stats()
    assert (base["messages"], base["pending"]) == (0, 0)

    def counted(messages, pending_):
        stats = store.stats()
        assert (stats["messages"], stats["pending"]) == (messages, pending_)

    accepted = send(store, ["bob"], receipt=True, origin="phone")
    counted(2, 3)  # bob's entry for 2 devices, the copy for the laptop
    ack(store, "bob", "phone", pending(store, "bob", "phone"))
    counted(3, 4)  # -1 delivery, +1 receipt for 2 devices
    read(store, "bob", [accepted.id])
    counted(4, 6)
    ack(store, "alice", "laptop", pending(store, "alice", "laptop"))  # the copy and both receipts
    counted(3, 3)
    ack(store, "alice", "phone", pending(store, "alice", "phone"))
    counted(1, 1)
    ack(store, "bob", "tablet", pending(store, "bob", "tablet"))
    counted(0, 0)
    history_kept = history(store, "alice", "bob").messages
    assert [m.id for m in history_kept] == [accepted.id]  # history is not counted


# -- history -----------------------------------------------------------------------------------


def conversation(store):
    for user in ("alice", "bob", "carol"):
        registered(store, user, "phone")


def test_history_holds_both_directions_newest_first_acked_or_not(store):
    conversation(store)
    first = send(store, ["bob"], b'"one"', now=NOW)
    second = send(store, ["alice"], b'"two"', sender="bob", now=NOW + 1, ttl=60)
    third = send(store, ["bob"], b'"three"', now=NOW + 2)
    ack(store, "bob", "phone", pending(store, "bob", "phone"))  # ACKed: still history
    page = history(store, "alice", "bob", now=NOW + 3)
    assert page.more is False
    assert [(m.id, m.sender, m.recipient, m.message_json, m.ts, m.kind, m.seq) for m in page.messages] == [
        (third.id, "alice", "bob", b'"three"', NOW + 2, MESSAGE, 0),
        (second.id, "bob", "alice", b'"two"', NOW + 1, MESSAGE, 0),
        (first.id, "alice", "bob", b'"one"', NOW, MESSAGE, 0),
    ]
    assert [m.expires for m in page.messages] == [third.expires, NOW + 1 + 60_000, first.expires]
    assert history(store, "bob", "alice", now=NOW + 3) == page


def test_history_pages_are_complete_with_no_gap_or_duplicate(store):
    conversation(store)
    sent = []
    for n in range(250):
        sender, recipient = ("alice", "bob") if n % 3 else ("bob", "alice")
        sent.append(send(store, [recipient], b"%d" % n, sender=sender, now=NOW + n // 4).id)
    seen, mores, before = [], [], None
    while True:
        page = history(store, "alice", "bob", before=before, limit=100, now=NOW + 100)
        seen.extend(m.id for m in page.messages)
        mores.append(page.more)
        if not page.more:
            break
        before = page.messages[-1].id
    assert seen == sent[::-1]
    assert mores == [True, True, False]
    assert [len(history(store, "bob", "alice", before=sent[150], limit=100, now=NOW + 100).messages)] == [100]
    last = history(store, "bob", "alice", before=sent[100], limit=100, now=NOW + 100)
    assert (len(last.messages), last.more) == (100, False)
    assert [m.message_json for m in history(store, "bob", "alice", limit=2, now=NOW + 100).messages] == [
        b"249", b"248"
    ]


def test_history_before_an_id_from_elsewhere_is_older_than_where_it_would_be(store):
    conversation(store)
    old = send(store, ["bob"], now=NOW)
    elsewhere = send(store, ["carol"], now=NOW + 5)
    new = send(store, ["bob"], now=NOW + 10)
    assert [m.id for m in history(store, "alice", "bob", before=elsewhere.id, now=NOW + 20).messages] == [old.id]
    assert [m.id for m in history(store, "alice", "bob", before=new.id, now=NOW + 20).messages] == [old.id]
    assert history(store, "alice", "bob", before=old.id, now=NOW + 20).messages == ()


def test_history_keeps_messages_past_their_ttl_and_their_acks(store):
    conversation(store)
    accepted = send(store, ["bob"], ttl=1)
    ack(store, "bob", "phone", pending(store, "bob", "phone"))
    with store.batch():
        store.purge_expired(NOW + 5000)
    assert [m.id for m in history(store, "bob", "alice", now=NOW + 5000).messages] == [accepted.id]


def test_history_stops_at_the_period_and_a_purge_drops_what_is_past_it(store):
    conversation(store)
    with_period(store, 10_000)
    old = send(store, ["bob"], now=NOW)
    young = send(store, ["alice"], sender="bob", now=NOW + 6000)
    assert [m.id for m in history(store, "alice", "bob", now=NOW + 9000).messages] == [young.id, old.id]
    page = history(store, "alice", "bob", now=NOW + 12_000)
    assert ([m.id for m in page.messages], page.more) == ([young.id], False)
    assert history(store, "bob", "alice", now=NOW + 17_000).messages == ()
    with store.batch():
        store.purge_expired(NOW + 12_000)
    # Asked as if earlier: the old message is gone, not only out of the period.
    for user, peer in (("alice", "bob"), ("bob", "alice")):
        assert [m.id for m in history(store, user, peer, now=NOW + 7000).messages] == [young.id]
    with store.batch():
        store.purge_expired(NOW + 17_000)
    assert history(store, "alice", "bob", now=NOW + 7000).messages == ()
    # Messages sent since are kept, and trimmed in their turn.
    later = send(store, ["bob"], now=NOW + 20_000)
    assert [m.id for m in history(store, "alice", "bob", now=NOW + 20_000).messages] == [later.id]


def test_copies_and_receipts_are_not_history(store):
    receipt_senders(store)
    accepted = send(store, ["bob"], receipt=True, origin="phone")
    ack(store, "bob", "phone", pending(store, "bob", "phone"))
    read(store, "bob", [accepted.id])
    for user, peer in (("alice", "bob"), ("bob", "alice")):
        (only,) = history(store, user, peer).messages
        assert (only.id, only.kind, only.sender, only.recipient) == (accepted.id, MESSAGE, "alice", "bob")
    assert history(store, "alice", "alice").messages == ()
    assert history(store, "bob", "bob").messages == ()


def test_a_group_message_is_in_each_pairwise_conversation(store):
    conversation(store)
    accepted = send(store, ["bob", "carol"], b'"all"')
    for user, peer, recipient in (
        ("alice", "bob", "bob"), ("bob", "alice", "bob"), ("alice", "carol", "carol"), ("carol", "alice", "carol")
    ):
        (entry,) = history(store, user, peer).messages
        assert (entry.id, entry.sender, entry.recipient, entry.message_json) == (
            accepted.id, "alice", recipient, b'"all"'
        )
    assert history(store, "bob", "carol").messages == ()


def test_a_user_never_sees_a_conversation_it_is_not_part_of(store):
    conversation(store)
    send(store, ["bob"], b'"private"')
    send(store, ["alice"], b'"reply"', sender="bob")
    for peer in ("alice", "bob", "carol"):
        assert history(store, "carol", peer).messages == ()
    assert len(history(store, "alice", "bob").messages) == 2


def test_the_history_with_oneself_holds_one_s_messages_to_oneself(store):
    conversation(store)
    to_self = send(store, ["alice"], b'"note"')
    both = send(store, ["alice", "bob"], b'"both"')
    assert [(m.id, m.sender, m.recipient) for m in history(store, "alice", "alice").messages] == [
        (both.id, "alice", "alice"), (to_self.id, "alice", "alice")
    ]
    assert [m.id for m in history(store, "alice", "bob").messages] == [both.id]
    assert [m.id for m in history(store, "bob", "alice").messages] == [both.id]


def test_the_history_of_an_unknown_peer_is_refused(store):
    conversation(store)
    with pytest.raises(UnknownUserError) as unknown:
        history(store, "alice", "nobody")
    assert unknown.value.args[0] == ["nobody"]


def test_a_period_of_0_keeps_no_history(store):
    conversation(store)
    send(store, ["bob"], now=NOW)
    with_period(store, 0)
    assert history(store, "alice", "bob", now=NOW + 1) == HistoryPage((), False)
    with pytest.raises(UnknownUserError):
        history(store, "alice", "nobody")
    send(store, ["bob"], now=NOW + 1)
    with store.batch():
        store.purge_expired(NOW + 2)  # history off: what was kept goes
    with_period(store, PERIOD)
    assert history(store, "alice", "bob", now=NOW + 3).messages == ()
    assert history(store, "bob", "alice", now=NOW + 3).messages == ()
