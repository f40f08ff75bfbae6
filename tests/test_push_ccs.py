"""The GCM CCS push provider actor against a fake CCS speaking XMPP over real TLS.

Tests wait on events, never on timers: the fake wakes waiters on every change
it records, the counters handed to the actor do the same on every increment,
recorder actors on every message, and a log handler on every warning.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import gevent.event
import pykka
import pytest

from devastator.actors.messages import PushProviderQuery
from devastator.push.base import PushCounters, PushRequest, PushTokenRejected, UpstreamMessage
from devastator.push.ccs import CcsConfig, GcmCcsProviderActor
from fake_ccs import API_KEY, DOMAIN, SENDER_ID, WAIT, FakeCcs, fake_ccs, wait_for  # noqa: F401

CCS_LOGGER = "devastator.push.ccs"


class WatchedCounters(PushCounters):
    """The actor's counters; every change it makes wakes ``wait_until``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_changed", gevent.event.Event())
        super().__init__()

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        self._changed.set()

    def wait_until(self, predicate, what: str, timeout: float = WAIT) -> None:
        wait_for(self._changed, lambda: predicate(self), f"counters: {what}", timeout)


class _Sync:
    """Asked of a recorder: answered once it has handled every earlier message."""


class _RecorderActor(pykka.ThreadingActor):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self._recorder = recorder

    def on_receive(self, message):
        if not isinstance(message, _Sync):
            self._recorder.messages.append(message)
            self._recorder.changed.set()


class Recorder:
    """A started actor standing in for a sink; keeps what it is told."""

    def __init__(self, name: str):
        self.name = name
        self.messages: list = []
        self.changed = gevent.event.Event()
        self.ref = _RecorderActor.start(self)

    def wait_for(self, count: int) -> list:
        wait_for(self.changed, lambda: len(self.messages) >= count, f"{self.name}: {count} messages")
        return list(self.messages)

    def sync(self) -> list:
        """Everything told so far (an ask queues behind every earlier tell)."""
        self.ref.ask(_Sync(), timeout=WAIT)
        return list(self.messages)


class LogWatch(logging.Handler):
    """The CCS provider's warnings, with an event for waiting on them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.changed = gevent.event.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    def lines(self, start: str) -> list[str]:
        return [record.getMessage() for record in self.records if record.getMessage().startswith(start)]

    def wait_for_line(self, start: str, count: int = 1, timeout: float = WAIT) -> None:
        wait_for(self.changed, lambda: len(self.lines(start)) >= count, f"log line {start!r}", timeout)


@pytest.fixture
def ccs_log():
    watch = LogWatch()
    logger = logging.getLogger(CCS_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


@dataclass
class Provider:
    ref: pykka.ActorRef
    counters: WatchedCounters
    tokens: Recorder
    upstream: Recorder

    def push(self, token: str, pending: int = 1, preview: bytes | None = None) -> None:
        self.ref.tell(PushRequest(user=f"user-{token}", device=f"device-{token}", token=token,
                                  pending=pending, preview=preview))

    def inspect(self) -> dict:
        return self.ref.ask(PushProviderQuery(), timeout=WAIT)


@pytest.fixture
def provider(fake_ccs):
    """Start a provider actor for the fake CCS, with fast backoff; settings may be changed."""
    started: list[pykka.ActorRef] = []

    def start(**changes) -> Provider:
        settings = dict(
            sender_id=SENDER_ID, api_key=API_KEY, host="localhost", port=fake_ccs.port,
            ca_file=fake_ccs.ca_file, retry_backoff_base=0.02, retry_backoff_max=0.1,
        )
        settings.update(changes)
        counters = WatchedCounters()
        tokens, upstream = Recorder("token sink"), Recorder("upstream sink")
        ref = GcmCcsProviderActor.start(
            config=CcsConfig(**settings), token_sink=tokens.ref, upstream_sink=upstream.ref, counters=counters,
        )
        started.append(ref)
        return Provider(ref, counters, tokens, upstream)

    yield start
    for ref in started:  # before the fake stops, so that no provider sees it go away
        ref.stop()


# -- configuration -------------------------------------------------------------------


def test_config_picks_the_documented_endpoints():
    assert CcsConfig(sender_id="1", api_key="k").address == ("fcm-xmpp.googleapis.com", 5235)
    assert CcsConfig(sender_id="1", api_key="k", preprod=True).address == ("fcm-xmpp.googleapis.com", 5236)
    assert CcsConfig(sender_id="1", api_key="k", preprod=True, port=9).address == ("fcm-xmpp.googleapis.com", 9)
    assert CcsConfig(sender_id="42", api_key="k").jid == "42@gcm.googleapis.com"
    assert "secret" not in repr(CcsConfig(sender_id="1", api_key="secret"))


@pytest.mark.parametrize("changes, setting", [
    ({"sender_id": "project-1"}, "sender_id"),
    ({"api_key": " "}, "api_key"),
    ({"port": 70000}, "port"),
    ({"ca_file": Path("/nonexistent/ca.pem")}, "ca_file"),
    ({"time_to_live": 2_419_201}, "time_to_live"),
    ({"collapse_key": ""}, "collapse_key"),
    ({"max_unacked": 101}, "max_unacked"),
    ({"max_retries": -1}, "max_retries"),
    ({"retry_backoff_base": 0}, "retry_backoff_base"),
    ({"retry_backoff_base": 5.0, "retry_backoff_max": 1.0}, "retry_backoff_max"),
    ({"priority": "urgent"}, "priority"),
])
def test_config_errors_name_the_setting(changes, setting):
    settings = {"sender_id": "1", "api_key": "k", **changes}
    with pytest.raises(ValueError, match=f"GCM CCS {setting}:"):
        CcsConfig(**settings)


# -- against the fake ------------------------------------------------------------------


def test_wrong_api_key_is_refused_counted_failed_and_logged_once(fake_ccs, provider, ccs_log):
    p = provider(api_key="not-the-key")
    p.push("tok-1")
    p.counters.wait_until(lambda c: c.failed == 1, "the push failed")
    # The actor keeps trying with backoff; each refusal is the same outage.
    fake_ccs.wait_until(lambda: fake_ccs.auth_failures >= 3, "three refused logins")
    p.push("tok-2")
    assert p.inspect()["failed"] == 2
    assert not fake_ccs.received
    down = ccs_log.lines("GCM CCS provider down")
    assert len(down) == 1 and "authentication refused" in down[0]
    assert ccs_log.lines("GCM CCS provider up") == []


def test_push_carries_the_fields_and_no_message_text(fake_ccs, provider):
    p = provider(time_to_live=3600, delivery_receipt_requested=True)
    p.push("tok-a", pending=3)
    p.push("tok-b", pending=1, preview=b'{"text":"hello <b> & bye"}')
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 2, "two deliveries")
    first, second = (record.payload for record in fake_ccs.delivered)
    assert first == {
        "to": "tok-a",
        "message_id": first["message_id"],
        "data": {"pending": "3"},
        "time_to_live": 3600,
        "collapse_key": "devastator",
        "delivery_receipt_requested": True,
        "priority": "high",
    }
    assert second["to"] == "tok-b"
    assert second["data"] == {"pending": "1", "preview": '{"text":"hello <b> & bye"}'}
    assert first["message_id"] != second["message_id"]
    p.counters.wait_until(lambda c: c.sent == 2, "two acks counted")
    state = p.inspect()
    assert (state["platform"], state["host"], state["port"]) == ("gcm", "localhost", fake_ccs.port)
    assert (state["connections"], state["unacked"], state["queued"], state["sent"]) == (1, 0, 0, 2)


def test_rejected_tokens_are_told_to_the_token_sink(fake_ccs, provider):
    fake_ccs.nack("tok-bad", "BAD_REGISTRATION")
    fake_ccs.nack("tok-gone", "DEVICE_UNREGISTERED")
    p = provider()
    for token in ("tok-bad", "tok-ok", "tok-gone"):
        p.push(token)
    rejected = p.tokens.wait_for(2)
    assert sorted(rejected, key=lambda r: r.token) == [
        PushTokenRejected(platform="gcm", user="user-tok-bad", device="device-tok-bad", token="tok-bad",
                          reason="BAD_REGISTRATION"),
        PushTokenRejected(platform="gcm", user="user-tok-gone", device="device-tok-gone", token="tok-gone",
                          reason="DEVICE_UNREGISTERED"),
    ]
    p.counters.wait_until(lambda c: c.sent == 1 and c.tokens_removed == 2, "one sent, two tokens removed")
    assert (p.counters.failed, p.counters.retried) == (0, 0)


def test_service_unavailable_is_retried_with_the_same_message_id(fake_ccs, provider):
    fake_ccs.nack("tok-1", "SERVICE_UNAVAILABLE", times=1)
    p = provider()
    p.push("tok-1")
    p.counters.wait_until(lambda c: c.sent == 1, "the retry acked")
    assert p.counters.retried == 1 and p.counters.failed == 0
    attempts = [record.message_id for record in fake_ccs.received]
    assert len(attempts) == 2 and attempts[0] == attempts[1]
    assert [record.message_id for record in fake_ccs.delivered] == attempts[:1]


def test_retries_are_bounded(fake_ccs, provider):
    fake_ccs.nack("tok-1", "INTERNAL_SERVER_ERROR", times=None)
    p = provider(max_retries=2)
    p.push("tok-1")
    p.counters.wait_until(lambda c: c.failed == 1, "the push given up")
    assert p.counters.retried == 2
    assert len(fake_ccs.received) == 3
    assert p.inspect()["retrying"] == 0


def test_a_nack_that_is_our_mistake_fails_without_retry_and_logs_once(fake_ccs, provider, ccs_log):
    fake_ccs.nack("tok-1", "INVALID_JSON", times=None)
    p = provider()
    p.push("tok-1")
    p.push("tok-1")
    p.counters.wait_until(lambda c: c.failed == 2, "both pushes failed")
    assert p.counters.retried == 0 and len(fake_ccs.received) == 2
    assert len([line for line in ccs_log.lines("GCM CCS refused a push") if "INVALID_JSON" in line]) == 1


def test_a_stanza_error_fails_the_push_and_logs_once(fake_ccs, provider, ccs_log):
    fake_ccs.refuse_stanza("tok-1")
    p = provider()
    p.push("tok-1")
    p.push("tok-1")
    p.push("tok-2")
    p.counters.wait_until(lambda c: c.failed == 2 and c.sent == 1, "two refused, one sent")
    assert p.counters.retried == 0
    assert ccs_log.lines("GCM CCS rejected a push stanza") == ["GCM CCS rejected a push stanza: bad-request"]


def test_never_more_than_100_unacked_on_a_connection(fake_ccs, provider):
    fake_ccs.hold_acks()
    p = provider()
    for n in range(150):
        p.push(f"tok-{n}")
    connection = fake_ccs.connection(1)
    fake_ccs.wait_until(lambda: len(fake_ccs.received) == 100, "100 pushes received")
    # The ask queues behind all 150 pushes: the actor has sent what it will send.
    state = p.inspect()
    assert (state["unacked"], state["queued"]) == (100, 50)
    fake_ccs.hold_acks(False)
    fake_ccs.release_held()
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 150, "150 deliveries")
    assert connection.max_pending == 100
    assert len({record.message_id for record in fake_ccs.delivered}) == 150
    p.counters.wait_until(lambda c: c.sent == 150, "150 acks counted")


def test_connection_draining_moves_new_pushes_to_a_new_connection(fake_ccs, provider):
    fake_ccs.hold_acks()
    p = provider()
    old_tokens = [f"old-{n}" for n in range(30)]
    new_tokens = [f"new-{n}" for n in range(20)]
    for token in old_tokens:
        p.push(token)
    first = fake_ccs.connection(1)
    fake_ccs.wait_until(lambda: len(fake_ccs.received) == 30, "30 pushes in flight")

    fake_ccs.drain(first)
    second = fake_ccs.connection(2)
    fake_ccs.hold_acks(False)
    for token in new_tokens:
        p.push(token)
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 20, "the new pushes delivered")
    assert {record.token for record in fake_ccs.delivered} == set(new_tokens)
    assert all(record.connection == second.number for record in fake_ccs.delivered)
    assert not first.closed.is_set()  # still open while its pushes wait for acks

    # The old connection gets its acks, then the provider closes it.
    fake_ccs.release_held(first)
    fake_ccs.wait_until(lambda: first.closed.is_set(), "the drained connection closed")
    assert first.closed_by_client
    p.counters.wait_until(lambda c: c.sent == 50, "50 acks counted")
    delivered_ids = [record.message_id for record in fake_ccs.delivered]
    assert len(delivered_ids) == len(set(delivered_ids)) == 50
    assert sorted(record.token for record in fake_ccs.delivered) == sorted(old_tokens + new_tokens)
    assert {record.token for record in fake_ccs.received_on(first)} == set(old_tokens)
    assert p.inspect()["connections"] == 1


def test_a_draining_nack_sends_the_push_again_on_a_new_connection(fake_ccs, provider):
    fake_ccs.nack("tok-1", "CONNECTION_DRAINING", times=1)
    p = provider()
    p.push("tok-1")
    first = fake_ccs.connection(1)
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 1, "the push delivered")
    assert fake_ccs.delivered[0].connection == 2
    assert fake_ccs.delivered[0].message_id == fake_ccs.received[0].message_id
    fake_ccs.wait_until(lambda: first.closed.is_set(), "the draining connection closed")
    p.counters.wait_until(lambda c: c.sent == 1, "the ack counted")
    assert p.counters.retried == 1


def test_dropped_connection_resends_what_was_unacked_exactly_once(fake_ccs, provider, ccs_log):
    p = provider()
    for n in range(10):
        p.push(f"acked-{n}")
    first = fake_ccs.connection(1)
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 10, "the first 10 delivered")
    p.counters.wait_until(lambda c: c.sent == 10, "their acks counted")

    fake_ccs.hold_acks()
    for n in range(30):
        p.push(f"held-{n}")
    fake_ccs.wait_until(lambda: len(fake_ccs.received_on(first)) == 40, "30 more in flight")
    held_ids = {record.message_id for record in fake_ccs.received_on(first)[10:]}
    fake_ccs.hold_acks(False)
    fake_ccs.drop(first)

    second = fake_ccs.connection(2)
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 40, "all 40 delivered")
    resent = [record.message_id for record in fake_ccs.received_on(second)]
    assert sorted(resent) == sorted(held_ids)  # same ids, each once, nothing acked resent
    delivered_ids = [record.message_id for record in fake_ccs.delivered]
    assert len(set(delivered_ids)) == 40
    p.counters.wait_until(lambda c: c.sent == 40, "40 acks counted")
    assert p.inspect()["unacked"] == 0
    ccs_log.wait_for_line("GCM CCS provider up again")
    assert len(ccs_log.lines("GCM CCS provider down")) == 1


def test_a_connection_silent_about_its_pushes_is_abandoned(fake_ccs, provider):
    fake_ccs.hold_acks()
    p = provider(ack_timeout=0.3)
    for n in range(5):
        p.push(f"tok-{n}")
    first = fake_ccs.connection(1)
    fake_ccs.wait_until(lambda: len(fake_ccs.received) == 5, "5 pushes in flight")
    fake_ccs.hold_acks(False)
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 5, "the 5 resent and delivered")
    assert first.closed.is_set()
    assert {record.connection for record in fake_ccs.delivered} == {2}


def test_unreachable_server_then_recovery(tmp_path, ccs_log):
    with socket.socket() as probe:  # a port that nothing listens on, until the fake does
        probe.bind((FakeCcs.host, 0))
        port = probe.getsockname()[1]
    fake = FakeCcs(tmp_path / "late-ccs", port=port)
    counters = WatchedCounters()
    sink = Recorder("sink")
    ref = GcmCcsProviderActor.start(
        config=CcsConfig(sender_id=SENDER_ID, api_key=API_KEY, host="localhost", port=port, ca_file=fake.ca_file,
                         retry_backoff_base=0.02, retry_backoff_max=0.1),
        token_sink=sink.ref, upstream_sink=sink.ref, counters=counters,
    )
    try:
        ccs_log.wait_for_line("GCM CCS provider down")
        for n in range(3):
            ref.tell(PushRequest(user="u", device=f"d{n}", token=f"tok-{n}", pending=1))
        state = ref.ask(PushProviderQuery(), timeout=WAIT)
        assert (state["down"], state["queued"], state["failed"]) == (True, 3, 0)
        fake.start()
        fake.wait_until(lambda: len(fake.delivered) == 3, "the queued pushes delivered")
        counters.wait_until(lambda c: c.sent == 3, "3 acks counted")
        ccs_log.wait_for_line("GCM CCS provider up again")
        assert len(ccs_log.lines("GCM CCS provider down")) == 1
    finally:
        ref.stop()
        fake.stop()


def test_upstream_messages_and_receipts_are_acked(fake_ccs, provider):
    p = provider()
    p.push("tok-1")
    connection = fake_ccs.connection(1)
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 1, "a delivery")

    fake_ccs.send_upstream(connection, token="device-token", message_id="up-1", data={"hello": "world"})
    assert fake_ccs.upstream_ack("up-1") == {"to": "device-token", "message_id": "up-1", "message_type": "ack"}
    assert p.upstream.wait_for(1) == [
        UpstreamMessage(platform="gcm", token="device-token", message_id="up-1", data={"hello": "world"}),
    ]

    receipt_id = fake_ccs.send_receipt(connection, original=fake_ccs.delivered[0])
    assert fake_ccs.upstream_ack(receipt_id) == {"to": DOMAIN, "message_id": receipt_id, "message_type": "ack"}
    assert len(p.upstream.sync()) == 1  # receipts are not upstream messages
    assert len(fake_ccs.upstream_acks) == 2


def test_stopping_closes_the_connection_and_frees_the_event_loop(fake_ccs, provider):
    p = provider()
    connection = fake_ccs.connection(1)
    p.ref.stop()
    fake_ccs.wait_until(lambda: connection.closed.is_set(), "the connection closed")
    assert connection.closed_by_client
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # no loop left running in this thread
    again = provider()  # a new provider can run its own loop
    fake_ccs.connection(2)
    again.push("tok-1")
    again.counters.wait_until(lambda c: c.sent == 1, "a push through the new provider")


# -- against Google --------------------------------------------------------------------

_GOOGLE = ("GOOGLE_API_KEY", "GOOGLE_SENDER_ID", "GCM_TEST_TOKEN")


@pytest.mark.skipif(not all(os.environ.get(name) for name in _GOOGLE),
                    reason="needs GOOGLE_API_KEY, GOOGLE_SENDER_ID and GCM_TEST_TOKEN")
def test_a_push_through_google():
    counters = WatchedCounters()
    sink = Recorder("sink")
    ref = GcmCcsProviderActor.start(
        config=CcsConfig(sender_id=os.environ["GOOGLE_SENDER_ID"], api_key=os.environ["GOOGLE_API_KEY"]),
        token_sink=sink.ref, upstream_sink=sink.ref, counters=counters,
    )
    ref.tell(PushRequest(user="integration", device="test", token=os.environ["GCM_TEST_TOKEN"], pending=1))
    counters.wait_until(lambda c: c.sent + c.failed + c.tokens_removed >= 1, "Google's answer", timeout=30)
    assert (counters.sent, counters.failed, counters.tokens_removed) == (1, 0, 0)
