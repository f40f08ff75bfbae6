"""Tests of the push dispatcher: whom to wake, how often, and dead tokens."""
from __future__ import annotations

import pytest

from devastator.actors.messages import (
    Append,
    DeviceReachable,
    FindPushDevice,
    PushDeviceFound,
    PushDispatchQuery,
    RemovePushToken,
    WakeDevices,
)
from devastator.actors.push import PushDispatcherActor
from devastator.push import PushRequest, PushTokenRejected, UpstreamMessage
from devastator.store import PushTarget, StoredMessage

from actor_fakes import Recorder

QUIET = 300.0


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def stored(n: int, recipient: str = "bob") -> StoredMessage:
    return StoredMessage(n, f"m{n}", "alice", recipient, b'{"text":"hello %d"}' % n, 1000 + n, 9_000_000)


PHONE = PushTarget("bob", "phone", "fcm", "token-1")
TABLET = PushTarget("bob", "tablet", "apns", "token-2")


@pytest.fixture
def clock():
    return FakeClock(1000.0)


@pytest.fixture
def providers():
    return {"fcm": Recorder("fcm"), "apns": Recorder("apns")}


@pytest.fixture
def store():
    return Recorder("store")


@pytest.fixture
def router():
    return Recorder("router")


def start(providers, store, router, clock, **options):
    return PushDispatcherActor.start(
        start_providers={platform: (lambda sink, r=recorder: r.ref) for platform, recorder in providers.items()},
        store=store.ref, router=router.ref, quiet_period=QUIET, clock=clock, **options,
    )


def test_one_push_per_offline_device_until_the_quiet_period_ends(providers, store, router, clock):
    dispatcher = start(providers, store, router, clock)
    dispatcher.tell(WakeDevices(((PHONE, stored(1)), (TABLET, stored(1)))))
    dispatcher.tell(WakeDevices(((PHONE, stored(2)),)))
    dispatcher.ask(PushDispatchQuery())
    clock.now += QUIET
    dispatcher.tell(WakeDevices(((PHONE, stored(3)),)))
    dispatcher.ask(PushDispatchQuery())

    assert providers["fcm"].drain() == [
        PushRequest("bob", "phone", "token-1", pending=1),
        PushRequest("bob", "phone", "token-1", pending=2),  # messages 2 and 3, since the last push
    ]
    assert providers["apns"].drain() == [PushRequest("bob", "tablet", "token-2", pending=1)]


def test_a_device_that_connected_is_pushed_to_again_at_once(providers, store, router, clock):
    dispatcher = start(providers, store, router, clock)
    dispatcher.tell(WakeDevices(((PHONE, stored(1)),)))
    dispatcher.tell(DeviceReachable("bob", "phone"))
    dispatcher.tell(WakeDevices(((PHONE, stored(2)),)))
    dispatcher.ask(PushDispatchQuery())
    assert len(providers["fcm"].drain()) == 2


def test_content_goes_along_only_when_turned_on(providers, store, router, clock):
    dispatcher = start(providers, store, router, clock, content=True)
    dispatcher.tell(WakeDevices(((PHONE, stored(1)),)))
    assert providers["fcm"].next(PushRequest).preview == b'{"text":"hello 1"}'


def test_a_rejected_token_is_removed_and_skipped(providers, store, router, clock):
    dispatcher = start(providers, store, router, clock)
    dispatcher.tell(PushTokenRejected("fcm", "bob", "phone", "token-1", "UNREGISTERED"))
    dispatcher.tell(WakeDevices(((PHONE, stored(1)),)))  # computed before the store forgot it
    dispatcher.ask(PushDispatchQuery())
    assert store.drain() == [RemovePushToken(PHONE)]
    assert providers["fcm"].drain() == []


def test_a_platform_without_provider_is_skipped(providers, store, router, clock):
    dispatcher = start({"fcm": providers["fcm"]}, store, router, clock)
    dispatcher.tell(WakeDevices(((TABLET, stored(1)),)))
    assert dispatcher.ask(PushDispatchQuery())["pushes"] == 0


def test_an_upstream_message_becomes_a_send_from_the_token_s_device(providers, store, router, clock):
    dispatcher = start(providers, store, router, clock)
    dispatcher.tell(UpstreamMessage("gcm", "token-9", "up-7", {"to": "alice", "message": '{"a": 1}'}))
    find = store.next(FindPushDevice)
    assert (find.platform, find.token) == ("gcm", "token-9")
    dispatcher.tell(PushDeviceFound(find.request_key, "bob", "phone"))
    append = store.next(Append)
    assert (append.sender, append.recipients, append.message_json, append.cid) == (
        "bob", ("alice",), b'{"a":1}', "gcm:up-7"
    )
    assert append.notify == router.ref


@pytest.mark.parametrize("data", [{"message": "no recipient"}, {"to": "not a valid id!", "message": "x"}])
def test_an_upstream_message_that_is_no_send_is_dropped(providers, store, router, clock, data):
    dispatcher = start(providers, store, router, clock)
    dispatcher.tell(UpstreamMessage("gcm", "token-9", "up-8", data))
    dispatcher.tell(PushDeviceFound(store.next(FindPushDevice).request_key, "bob", "phone"))
    dispatcher.ask(PushDispatchQuery())
    assert store.drain() == []
