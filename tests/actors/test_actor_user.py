"""Tests of the user actor: attachment, backlog pages, live delivery, ACKs, resends.

Most tests build the actor without starting it and call ``on_receive``
directly: its logic is then deterministic, and recorders stand in for the store
and the devices. A few start it to check the same behaviour through real tells.
"""
from __future__ import annotations

import pytest

from devastator.actors import UserActor
from devastator.actors.messages import (
    Ack,
    Acked,
    AttachDevice,
    Authenticated,
    AuthFailed,
    Committed,
    Deliver,
    DeviceAttached,
    DeviceOffline,
    DeviceOnline,
    DeviceRemoved,
    LoadPending,
    PendingLoaded,
    Replaced,
    Revoked,
    Tick,
    UserDevicesQuery,
)
from devastator.protocol.errors import Forbidden
from devastator.store import StoredMessage

from actor_fakes import Recorder

FAR = 10**15  # an expiry (ms since the epoch) no test reaches
KEY = 7  # the request key a device actor would pick for its auth.* call


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def stored(seq: int, *, expires: int = FAR) -> StoredMessage:
    return StoredMessage(seq, f"m{seq:04d}", "bob", "alice", b'{"n":%d}' % seq, 1_000 + seq, expires)


def page(first: int, last: int) -> tuple[StoredMessage, ...]:
    return tuple(stored(seq) for seq in range(first, last + 1))


def ids(messages) -> tuple[str, ...]:
    return tuple(m.id for m in messages)


@pytest.fixture
def store():
    return Recorder("store")


@pytest.fixture
def clock():
    return FakeClock(100.0)


@pytest.fixture
def wall():
    return FakeClock(1_000)


@pytest.fixture
def make_user(store, clock, wall):
    """A user actor for alice, built but not started."""

    def make(*, window: int = 100, window_bytes: int = 1 << 20, ack_timeout: float = 30.0) -> UserActor:
        return UserActor(
            user="alice", store=store.ref, ack_timeout=ack_timeout, delivery_window=window,
            delivery_window_bytes=window_bytes, clock=clock, wall_clock_ms=wall,
        )

    return make


def attach(user: UserActor, device: str, ref, *, pending: int = 0) -> None:
    user.on_receive(DeviceOnline("alice", device, "reg", ref, KEY))
    user.on_receive(DeviceAttached(device, ref, KEY, pending=pending))


def caught_up(user: UserActor, store, device: str, ref, *messages: StoredMessage) -> None:
    """Attach the device and answer its first page with ``messages``, the whole backlog."""
    attach(user, device, ref, pending=len(messages))
    load = [m for m in store.drain() if isinstance(m, LoadPending)][-1]
    user.on_receive(PendingLoaded(device, load.after_seq, messages, complete=True))


# -- coming online --------------------------------------------------------------------


def test_a_device_online_is_attached_authenticated_and_sent_its_backlog(store):
    phone = Recorder("phone")
    user = UserActor.start(user="alice", store=store.ref, ack_timeout=30.0, delivery_window=100)

    user.tell(DeviceOnline("alice", "phone", "reg", phone.ref, KEY))
    assert store.next(AttachDevice) == AttachDevice("alice", "phone", "reg", phone.ref, KEY, user)

    user.tell(DeviceAttached("phone", phone.ref, KEY, pending=3))
    assert phone.next(Authenticated) == Authenticated("alice", "phone", user, 3, KEY)
    assert store.next(LoadPending) == LoadPending("alice", "phone", 0, 100, user)

    user.tell(PendingLoaded("phone", 0, page(1, 3), complete=True))
    assert phone.next(Deliver) == Deliver(page(1, 3), as_batch=True)

    user.ask(UserDevicesQuery())
    assert phone.drain() == []
    assert store.drain() == []


def test_a_failed_attachment_is_told_to_the_device_and_nothing_is_loaded(make_user, store):
    user, phone = make_user(), Recorder("phone")
    user.on_receive(DeviceOnline("alice", "phone", "reg", phone.ref, KEY))
    error = Forbidden("user 'alice' does not exist")

    user.on_receive(DeviceAttached("phone", phone.ref, KEY, error=error))
    user.on_receive(Committed(page(1, 1)))

    assert phone.drain() == [AuthFailed(KEY, error)]
    assert [type(m) for m in store.drain()] == [AttachDevice]
    assert user.on_receive(UserDevicesQuery())["devices"] == {}


def test_a_second_connection_of_a_device_replaces_the_first_once_attached(make_user, store):
    user, old, new = make_user(), Recorder("old"), Recorder("new")
    user.on_receive(DeviceOnline("alice", "phone", "reg", old.ref, 1))
    user.on_receive(DeviceAttached("phone", old.ref, 1, pending=0))
    user.on_receive(DeviceOnline("alice", "phone", "reg", new.ref, 2))
    assert old.drain() == [Authenticated("alice", "phone", user.actor_ref, 0, 1)]  # not replaced yet

    user.on_receive(DeviceAttached("phone", new.ref, 2, pending=0))

    assert old.drain() == [Replaced()]
    assert new.drain() == [Authenticated("alice", "phone", user.actor_ref, 0, 2)]
    attaches = [m for m in store.drain() if isinstance(m, AttachDevice)]
    assert [(a.device_ref, a.request_key) for a in attaches] == [(old.ref, 1), (new.ref, 2)]


def test_a_connection_with_revoked_credentials_replaces_nobody(make_user, store):
    user, good, stolen = make_user(), Recorder("good"), Recorder("stolen")
    caught_up(user, store, "phone", good.ref)
    good.drain()
    user.on_receive(DeviceOnline("alice", "phone", "old-registration", stolen.ref, 2))
    error = Forbidden("these credentials were revoked: the device was removed")

    user.on_receive(DeviceAttached("phone", stolen.ref, 2, error=error))

    assert stolen.drain() == [AuthFailed(2, error)]
    assert good.drain() == []
    assert list(user.on_receive(UserDevicesQuery())["devices"]) == ["phone"]


def test_a_removed_device_is_revoked_and_forgotten(make_user, store):
    user, phone, tablet = make_user(), Recorder("phone"), Recorder("tablet")
    caught_up(user, store, "phone", phone.ref)
    caught_up(user, store, "tablet", tablet.ref)
    phone.drain()

    user.on_receive(DeviceRemoved("phone"))
    user.on_receive(Committed(page(1, 1)))

    assert phone.drain() == [Revoked()]
    assert list(user.on_receive(UserDevicesQuery())["devices"]) == ["tablet"]


def test_an_offline_while_attaching_drops_the_attachment(make_user, store):
    user, phone = make_user(), Recorder("phone")
    user.on_receive(DeviceOnline("alice", "phone", "reg", phone.ref, 1))
    user.on_receive(DeviceOffline("alice", "phone", phone.ref))
    user.on_receive(DeviceAttached("phone", phone.ref, 1, pending=0))
    assert phone.drain() == []
    assert user.on_receive(UserDevicesQuery())["devices"] == {}


def test_the_offline_of_a_replaced_connection_leaves_the_new_one_alone(make_user, store):
    user, old, new = make_user(), Recorder("old"), Recorder("new")
    caught_up(user, store, "phone", old.ref)
    caught_up(user, store, "phone", new.ref)

    user.on_receive(DeviceOffline("alice", "phone", old.ref))
    user.on_receive(Committed(page(1, 1)))

    assert new.drain()[-1] == Deliver(page(1, 1), as_batch=False)
    assert Deliver(page(1, 1), as_batch=False) not in old.drain()


def test_a_device_offline_gets_no_more_deliveries(make_user, store):
    user, phone = make_user(), Recorder("phone")
    caught_up(user, store, "phone", phone.ref)
    phone.drain()

    user.on_receive(DeviceOffline("alice", "phone", phone.ref))
    user.on_receive(Committed(page(1, 1)))
    user.on_receive(Tick(10_000.0))

    assert phone.drain() == []
    assert user.on_receive(UserDevicesQuery())["devices"] == {}


# -- the backlog and live messages ----------------------------------------------------


def test_live_messages_after_the_backlog_go_one_by_one_in_order(make_user, store):
    user, phone = make_user(), Recorder("phone")
    caught_up(user, store, "phone", phone.ref, *page(1, 2))
    assert phone.drain()[-1] == Deliver(page(1, 2), as_batch=True)

    user.on_receive(Committed(page(3, 5)))
    # Already handed to the device (seq <= cursor): not sent again.
    user.on_receive(Committed(page(2, 3)))
    user.on_receive(Committed((stored(4), stored(6))))

    assert phone.drain() == [
        Deliver(page(3, 5), as_batch=False),
        Deliver((stored(6),), as_batch=False),
    ]
    assert user.on_receive(UserDevicesQuery())["devices"]["phone"]["cursor"] == 6


def test_a_message_committed_while_a_page_loads_is_loaded_next(make_user, store):
    user, phone = make_user(), Recorder("phone")
    attach(user, "phone", phone.ref, pending=3)
    first = [m for m in store.drain() if isinstance(m, LoadPending)]
    assert [(m.after_seq, m.limit) for m in first] == [(0, 100)]

    # The store committed seq 4 after it read the page of 1..3.
    user.on_receive(Committed(page(4, 4)))
    assert [m for m in phone.drain() if isinstance(m, Deliver)] == []

    user.on_receive(PendingLoaded("phone", 0, page(1, 3), complete=True))
    assert phone.drain() == [Deliver(page(1, 3), as_batch=True)]
    assert store.drain() == [LoadPending("alice", "phone", 3, 97, user.actor_ref)]

    user.on_receive(PendingLoaded("phone", 3, page(4, 4), complete=True))
    user.on_receive(Committed(page(5, 5)))
    assert phone.drain() == [Deliver(page(4, 4), as_batch=True), Deliver(page(5, 5), as_batch=False)]
    assert store.drain() == []


def test_messages_committed_before_the_attachment_wait_for_the_first_page(make_user, store):
    user, phone = make_user(), Recorder("phone")
    user.on_receive(DeviceOnline("alice", "phone", "reg", phone.ref, KEY))
    user.on_receive(Committed(page(1, 1)))
    assert phone.drain() == []


def test_a_failed_page_is_loaded_again_on_the_next_tick(make_user, store):
    user, phone = make_user(), Recorder("phone")
    attach(user, "phone", phone.ref)
    store.drain()

    user.on_receive(PendingLoaded("phone", 0, (), complete=False, failed=True))
    assert store.drain() == []
    user.on_receive(Tick(101.0))
    assert store.drain() == [LoadPending("alice", "phone", 0, 100, user.actor_ref)]


# -- the window -----------------------------------------------------------------------


def test_the_window_bounds_what_is_in_flight_and_acks_load_more(make_user, store):
    user, phone = make_user(window=4), Recorder("phone")
    attach(user, "phone", phone.ref, pending=10)
    assert [m for m in store.drain() if isinstance(m, LoadPending)] == [
        LoadPending("alice", "phone", 0, 4, user.actor_ref)
    ]

    user.on_receive(PendingLoaded("phone", 0, page(1, 4), complete=False))
    # A live message while the window is full stays in the store for the next page.
    user.on_receive(Committed(page(11, 11)))
    user.on_receive(Tick(100.0))
    assert [m for m in phone.drain() if isinstance(m, Deliver)] == [Deliver(page(1, 4), as_batch=True)]
    assert store.drain() == []

    user.on_receive(Acked("phone", phone.ref, ids(page(1, 4))))
    assert store.drain() == [
        Ack("alice", "phone", (1, 2, 3, 4)),
        LoadPending("alice", "phone", 4, 4, user.actor_ref),
    ]

    user.on_receive(PendingLoaded("phone", 4, page(5, 8), complete=False))
    assert phone.drain() == [Deliver(page(5, 8), as_batch=True)]
    assert user.on_receive(UserDevicesQuery())["devices"]["phone"]["in_flight"] == 4


def test_live_messages_beyond_the_window_are_left_to_the_next_page(make_user, store):
    user, phone = make_user(window=4), Recorder("phone")
    caught_up(user, store, "phone", phone.ref, *page(1, 2))
    phone.drain()

    user.on_receive(Committed(page(3, 6)))
    assert phone.drain() == [Deliver(page(3, 4), as_batch=False)]

    user.on_receive(Acked("phone", phone.ref, ids(page(1, 1))))
    assert store.drain() == [Ack("alice", "phone", (1,)), LoadPending("alice", "phone", 4, 1, user.actor_ref)]


def big(seq: int, size: int) -> StoredMessage:
    return StoredMessage(seq, f"m{seq:04d}", "bob", "alice", b'"' + b"x" * size + b'"', 1_000 + seq, FAR)


def test_the_window_in_bytes_bounds_a_backlog_of_big_messages(make_user, store):
    # 1,000-byte messages (1,200 with their envelope) in a 2,500-byte window: two at a time.
    user, phone = make_user(window=100, window_bytes=2_500), Recorder("phone")
    attach(user, "phone", phone.ref, pending=5)
    store.drain()
    backlog = tuple(big(seq, 998) for seq in range(1, 6))
    user.on_receive(PendingLoaded("phone", 0, backlog, complete=True))
    assert phone.drain()[-1] == Deliver(backlog[:2], as_batch=True)
    assert store.drain() == []  # no room for another page yet

    user.on_receive(Acked("phone", phone.ref, ids(backlog[:2])))
    assert store.drain() == [Ack("alice", "phone", (1, 2)), LoadPending("alice", "phone", 2, 100, user.actor_ref)]


def test_one_message_bigger_than_the_byte_window_still_goes_alone(make_user, store):
    user, phone = make_user(window_bytes=100), Recorder("phone")
    caught_up(user, store, "phone", phone.ref)
    phone.drain()
    user.on_receive(Committed((big(1, 5_000), big(2, 5_000))))
    assert phone.drain() == [Deliver((big(1, 5_000),), as_batch=False)]


def test_acks_of_unknown_ids_are_not_told_to_the_store(make_user, store):
    user, phone = make_user(), Recorder("phone")
    caught_up(user, store, "phone", phone.ref, *page(1, 2))
    store.drain()

    # Ids of another user's messages, of nothing, and from a device not online.
    user.on_receive(Acked("phone", phone.ref, ("0000beefcafe", "m9999")))
    user.on_receive(Acked("tablet", phone.ref, ids(page(1, 2))))

    assert store.drain() == []
    assert user.on_receive(UserDevicesQuery())["devices"]["phone"]["in_flight"] == 2


def test_an_ack_of_known_and_unknown_ids_acks_the_known_ones(make_user, store):
    user, phone = make_user(), Recorder("phone")
    caught_up(user, store, "phone", phone.ref, *page(1, 3))
    store.drain()

    user.on_receive(Acked("phone", phone.ref, ("m0002", "nope", "m0002")))
    assert store.drain() == [Ack("alice", "phone", (2,))]


# -- ACK timeout and expiry -----------------------------------------------------------


def test_unacked_deliveries_are_sent_again_after_the_ack_timeout(make_user, store, clock):
    user, phone = make_user(ack_timeout=30.0), Recorder("phone")
    caught_up(user, store, "phone", phone.ref, *page(1, 3))  # sent at 100.0
    user.on_receive(Acked("phone", phone.ref, ("m0002",)))
    phone.drain()

    user.on_receive(Tick(129.0))
    assert phone.drain() == []

    user.on_receive(Tick(130.0))
    assert phone.drain() == [Deliver((stored(1), stored(3)), as_batch=False)]

    # Sent again at 130.0: the next resend is due at 160.0, not before.
    user.on_receive(Tick(159.0))
    assert phone.drain() == []
    user.on_receive(Tick(160.0))
    assert phone.drain() == [Deliver((stored(1), stored(3)), as_batch=False)]


def test_expired_deliveries_are_dropped_not_sent_again(make_user, store, wall):
    user, phone = make_user(ack_timeout=30.0), Recorder("phone")
    short = stored(2, expires=5_000)
    caught_up(user, store, "phone", phone.ref, stored(1), short, stored(3))
    phone.drain()
    store.drain()

    wall.now = 5_000  # ``expires`` is the first instant the message is no longer valid
    user.on_receive(Tick(200.0))

    assert phone.drain() == [Deliver((stored(1), stored(3)), as_batch=False)]
    assert user.on_receive(UserDevicesQuery())["devices"]["phone"]["in_flight"] == 2
    # The store's purge retires it: no Ack for an expired message.
    user.on_receive(Acked("phone", phone.ref, (short.id,)))
    assert store.drain() == []


def test_a_live_delivery_is_timed_from_when_it_was_sent(make_user, store, clock):
    user, phone = make_user(ack_timeout=30.0), Recorder("phone")
    caught_up(user, store, "phone", phone.ref, *page(1, 1))  # sent at 100.0
    clock.now = 120.0
    user.on_receive(Committed(page(2, 2)))
    phone.drain()

    user.on_receive(Tick(140.0))
    assert phone.drain() == [Deliver(page(1, 1), as_batch=False)]
    user.on_receive(Tick(150.0))
    assert phone.drain() == [Deliver(page(2, 2), as_batch=False)]


# -- several devices ------------------------------------------------------------------


def test_each_device_has_its_own_deliveries_and_acks(make_user, store):
    user, phone, tablet = make_user(), Recorder("phone"), Recorder("tablet")
    caught_up(user, store, "phone", phone.ref, *page(1, 2))
    caught_up(user, store, "tablet", tablet.ref, *page(1, 2))
    user.on_receive(Committed(page(3, 3)))

    assert [m for m in phone.drain() if isinstance(m, Deliver)] == [
        Deliver(page(1, 2), as_batch=True), Deliver(page(3, 3), as_batch=False)
    ]
    assert [m for m in tablet.drain() if isinstance(m, Deliver)] == [
        Deliver(page(1, 2), as_batch=True), Deliver(page(3, 3), as_batch=False)
    ]
    store.drain()

    user.on_receive(Acked("phone", phone.ref, ids(page(1, 2))))
    assert store.drain() == [Ack("alice", "phone", (1, 2))]

    user.on_receive(Tick(1_000.0))
    assert phone.drain() == [Deliver(page(3, 3), as_batch=False)]
    assert tablet.drain() == [Deliver(page(1, 3), as_batch=False)]
    devices = user.on_receive(UserDevicesQuery())["devices"]
    assert (devices["phone"]["in_flight"], devices["tablet"]["in_flight"]) == (1, 3)


def test_two_devices_through_a_started_actor(store):
    phone, tablet = Recorder("phone"), Recorder("tablet")
    user = UserActor.start(user="alice", store=store.ref, ack_timeout=30.0, delivery_window=100)
    for device, probe in (("phone", phone), ("tablet", tablet)):
        user.tell(DeviceOnline("alice", device, "reg", probe.ref, KEY))
        user.tell(DeviceAttached(device, probe.ref, KEY, pending=0))
        probe.next(Authenticated)
        user.tell(PendingLoaded(device, 0, (), complete=True))

    user.tell(Committed(page(1, 1)))
    assert phone.next(Deliver) == Deliver(page(1, 1), as_batch=False)
    assert tablet.next(Deliver) == Deliver(page(1, 1), as_batch=False)

    user.tell(Acked("tablet", tablet.ref, ("m0001",)))
    user.ask(UserDevicesQuery())
    assert Ack("alice", "tablet", (1,)) in store.drain()
    assert user.ask(UserDevicesQuery())["devices"]["phone"]["in_flight"] == 1


# -- robustness -----------------------------------------------------------------------


def test_a_device_actor_that_is_gone_does_not_bring_the_user_actor_down(store):
    """A device actor stops on ConnectionLost before its DeviceOffline reaches the
    user actor (it goes through the router), so the user actor may still tell it
    Authenticated, Deliver or a resend: that must not fail the user actor."""
    phone, tablet = Recorder("phone"), Recorder("tablet")
    user = UserActor.start(user="alice", store=store.ref, ack_timeout=30.0, delivery_window=100)
    for device, probe in (("phone", phone), ("tablet", tablet)):
        user.tell(DeviceOnline("alice", device, "reg", probe.ref, KEY))
        user.tell(DeviceAttached(device, probe.ref, KEY, pending=0))
        probe.next(Authenticated)
        user.tell(PendingLoaded(device, 0, (), complete=True))
    user.ask(UserDevicesQuery())

    phone.ref.stop()
    user.tell(Committed(page(1, 1)))

    assert tablet.next(Deliver) == Deliver(page(1, 1), as_batch=False)
    assert user.is_alive()
    assert user.ask(UserDevicesQuery(), timeout=2)["devices"]["tablet"]["in_flight"] == 1
