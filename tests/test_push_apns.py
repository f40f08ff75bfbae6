"""The APNs provider actor against a fake APNs over real TLS and HTTP/2, plus Apple itself when configured.

Tests wait on gevent events (the counters and the token-sink recorder set one
whenever something changes) or on the fake's queue of accepted pushes, never
on sleeps. The conftest's autouse fixture stops every actor after each test.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import gevent
import gevent.event
import pykka
import pytest
from gevent.server import StreamServer

from devastator.actors.messages import PushProviderQuery
from devastator.push.apns import (
    PRODUCTION_HOST,
    SANDBOX_HOST,
    ApnsConfig,
    ApnsProviderActor,
    build_payload,
)
from devastator.push.base import PushCounters, PushRequest, PushTokenRejected
from fake_apns import FakeApns, fake_apns, fake_apns_cert, write_p8_key  # noqa: F401 (fixtures)

WAIT = 5.0  # seconds: a bound for a test that fails, never a pause
TOKEN = "a1" * 32
OTHER_TOKEN = "b2" * 32
LOGGER = "devastator.push.apns"

# hyper (under apns2) still uses ssl APIs that Python deprecates; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:hyper")


class WatchedCounters(PushCounters):
    """PushCounters that wake a waiting test whenever the actor counts something."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        changed = self.__dict__.get("changed")
        if changed is not None:
            changed.set()

    def __init__(self):
        self.__dict__["changed"] = gevent.event.Event()
        super().__init__()

    def wait_until(self, predicate, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            if predicate(self):
                return
            if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                pytest.fail(f"counters never got there within {timeout} s: {self.as_dict()}")


class _RecorderActor(pykka.ThreadingActor):
    def __init__(self, messages: list, arrived: gevent.event.Event):
        super().__init__()
        self._messages = messages
        self._arrived = arrived

    def on_receive(self, message):
        self._messages.append(message)
        self._arrived.set()


class Recorder:
    """A token sink that keeps what it is told."""

    def __init__(self):
        self.messages: list = []
        self._arrived = gevent.event.Event()
        self.ref = _RecorderActor.start(self.messages, self._arrived)

    def wait_for(self, count: int, timeout: float = WAIT) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            self._arrived.clear()
            if len(self.messages) >= count:
                break
            if not self._arrived.wait(max(0.0, deadline - time.monotonic())):
                pytest.fail(f"the token sink got {len(self.messages)} of {count} messages within {timeout} s")
        return list(self.messages)


def config_for(fake: FakeApns, **changes) -> ApnsConfig:
    """A config pointing at ``fake`` with its credentials, quick to retry."""
    if fake.auth == "token":
        values = dict(key_file=fake.key_file, key_id=fake.key_id, team_id=fake.team_id)
    else:
        values = dict(cert_file=fake.cert_file, cert_password=fake.cert_password)
    values.update(topic=fake.topic, host=fake.host, port=fake.port, ca_file=fake.ca_file,
                  retry_delay=0.01, timeout=WAIT)
    values.update(changes)
    return ApnsConfig(**values)


class Provider:
    """A started ApnsProviderActor with its counters and token sink."""

    def __init__(self, config: ApnsConfig):
        self.config = config
        self.counters = WatchedCounters()
        self.sink = Recorder()
        self.ref = ApnsProviderActor.start(config=config, token_sink=self.sink.ref, counters=self.counters)

    def push(self, token: str = TOKEN, *, pending: int = 3, preview: bytes | None = None,
             user: str = "alice", device: str = "phone") -> None:
        self.ref.tell(PushRequest(user=user, device=device, token=token, pending=pending, preview=preview))

    def inspect(self) -> dict:
        return self.ref.ask(PushProviderQuery(), timeout=WAIT)


@pytest.fixture
def start_provider():
    """Start Providers; they stop before fixtures set up earlier (a fake APNs) go away."""
    started: list[Provider] = []

    def start(config: ApnsConfig) -> Provider:
        provider = Provider(config)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.ref.stop(timeout=WAIT)  # False if it stopped already
        provider.sink.ref.stop(timeout=WAIT)


def apns_records(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


# -- sending ---------------------------------------------------------------------


def test_token_auth_push_arrives_with_apples_headers_and_no_message_text(fake_apns, start_provider):
    provider = start_provider(config_for(fake_apns))
    before = int(time.time())
    provider.push(pending=3)

    push = fake_apns.next_push()
    assert push.token == TOKEN
    assert push.headers["apns-topic"] == fake_apns.topic
    assert push.headers["apns-push-type"] == "alert"
    assert push.headers.get("apns-priority", "10") == "10"  # apns2 leaves out Apple's default
    assert push.headers["apns-collapse-id"] == "devastator"
    expires = int(push.headers["apns-expiration"])
    assert before + provider.config.expiration <= expires <= int(time.time()) + provider.config.expiration
    assert push.payload == {
        "aps": {
            "alert": {"loc-key": "DEVASTATOR_NEW_MESSAGES", "loc-args": ["3"]},
            "badge": 3,
            "sound": "default",
        },
        "devastator": {"pending": 3},
    }
    provider.counters.wait_until(lambda c: c.sent == 1)
    assert provider.counters.as_dict() == {"sent": 1, "failed": 0, "tokens_removed": 0, "retried": 0}


def test_preview_is_sent_only_when_given(fake_apns, start_provider):
    provider = start_provider(config_for(fake_apns))
    message = {"id": "m1", "from": "bob", "body": "lunch?"}
    provider.push(pending=1, preview=json.dumps(message).encode())

    push = fake_apns.next_push()
    assert push.payload["devastator"] == {"pending": 1, "preview": message}
    assert push.payload["aps"]["mutable-content"] == 1  # the app's extension may show it


def test_a_preview_too_large_for_apple_is_left_out():
    config = ApnsConfig(topic="com.example.app", key_file=Path("k.p8"), key_id="KEY1234567", team_id="TEAM123456")
    big = json.dumps({"body": "x" * 5000}).encode()
    payload = build_payload(config, PushRequest("alice", "phone", TOKEN, 2, big)).dict()
    assert payload["devastator"] == {"pending": 2}
    assert "mutable-content" not in payload["aps"]


def test_background_push_is_a_silent_wake_up_with_priority_5(fake_apns, start_provider):
    provider = start_provider(config_for(fake_apns, push_type="background", expiration=0, collapse_id=None))
    provider.push(pending=7)

    push = fake_apns.next_push()
    assert push.headers["apns-push-type"] == "background"
    assert push.headers["apns-priority"] == "5"
    assert push.headers["apns-expiration"] == "0"  # deliver once, never stored
    assert "apns-collapse-id" not in push.headers
    assert push.payload == {"aps": {"content-available": 1}, "devastator": {"pending": 7}}


def test_many_pushes_share_one_connection_within_apples_stream_limit(fake_apns, start_provider):
    provider = start_provider(config_for(fake_apns))
    for n in range(30):
        provider.push(device=f"d{n}", pending=n + 1)

    provider.counters.wait_until(lambda c: c.sent == 30)
    assert sorted(p.payload["devastator"]["pending"] for p in fake_apns.accepted) == list(range(1, 31))
    assert fake_apns.connections == 1
    # One stream until APNs has seen a valid token: the fake would have listed a violation.
    state = provider.inspect()
    assert state["connected"] is True and state["queued"] == 0 and state["in_flight"] == 0


def test_certificate_auth_push_arrives(fake_apns_cert, start_provider):
    provider = start_provider(config_for(fake_apns_cert))
    provider.push(pending=2)

    push = fake_apns_cert.next_push()
    assert push.token == TOKEN
    assert push.payload["aps"]["badge"] == 2
    provider.counters.wait_until(lambda c: c.sent == 1)


# -- refusals ------------------------------------------------------------------------


def test_a_wrong_signing_key_is_refused_counted_failed_and_logged_once(fake_apns, tmp_path, caplog, start_provider):
    wrong_key = tmp_path / "AuthKey_wrong.p8"
    write_p8_key(wrong_key)
    provider = start_provider(config_for(fake_apns, key_file=wrong_key))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        provider.push()
        provider.counters.wait_until(lambda c: c.failed == 1)
        provider.push(device="tablet")
        provider.counters.wait_until(lambda c: c.failed == 2)

    assert [a.reason for a in fake_apns.answered] == ["InvalidProviderToken", "InvalidProviderToken"]
    assert fake_apns.accepted == []
    assert provider.counters.as_dict() == {"sent": 0, "failed": 2, "tokens_removed": 0, "retried": 0}
    (logged,) = apns_records(caplog)
    assert logged.startswith("APNs push to alice/phone failed: InvalidProviderToken")


@pytest.mark.parametrize("mark, reason", [("unregister", "Unregistered"), ("mark_bad", "BadDeviceToken")])
def test_a_token_apple_rejects_is_told_to_the_sink_and_counted(fake_apns, mark, reason, start_provider):
    getattr(fake_apns, mark)(OTHER_TOKEN)
    provider = start_provider(config_for(fake_apns))
    provider.push(OTHER_TOKEN, user="bob", device="old-phone")

    (rejected,) = provider.sink.wait_for(1)
    assert rejected == PushTokenRejected(platform="apns", user="bob", device="old-phone",
                                         token=OTHER_TOKEN, reason=reason)
    provider.counters.wait_until(lambda c: c.tokens_removed == 1)
    assert provider.counters.as_dict() == {"sent": 0, "failed": 0, "tokens_removed": 1, "retried": 0}

    provider.push(TOKEN)  # other tokens still go through
    provider.counters.wait_until(lambda c: c.sent == 1)


def test_a_token_that_is_not_hex_is_rejected_without_asking_apple(fake_apns, start_provider):
    provider = start_provider(config_for(fake_apns))
    provider.push("../../3/device/x")

    (rejected,) = provider.sink.wait_for(1)
    assert rejected.reason == "BadDeviceToken"
    assert provider.counters.tokens_removed == 1
    assert fake_apns.answered == []


# -- retries and outages ----------------------------------------------------------------


def test_503_then_success_is_retried_and_counted(fake_apns, caplog, start_provider):
    fake_apns.fail_next(1, status=503)
    provider = start_provider(config_for(fake_apns))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        provider.push()
        push = fake_apns.next_push()
        provider.counters.wait_until(lambda c: c.sent == 1)

    assert push.token == TOKEN
    assert [a.status for a in fake_apns.answered] == [503, 200]
    assert provider.counters.as_dict() == {"sent": 1, "failed": 0, "tokens_removed": 0, "retried": 1}
    assert apns_records(caplog) == [f"APNs provider down: {fake_apns.host}:{fake_apns.port} answered ServiceUnavailable",
                                    "APNs provider back"]


def test_retries_are_bounded_then_counted_failed(fake_apns, start_provider):
    fake_apns.fail_next(10, status=500)
    provider = start_provider(config_for(fake_apns, max_retries=2))
    provider.push()

    provider.counters.wait_until(lambda c: c.failed == 1)
    assert provider.counters.as_dict() == {"sent": 0, "failed": 1, "tokens_removed": 0, "retried": 2}
    assert [a.status for a in fake_apns.answered] == [500, 500, 500]


def test_a_retry_waiting_out_its_backoff_holds_up_no_other_push(fake_apns, start_provider):
    fake_apns.fail_next(1, status=429)  # TooManyRequests: for that one device token
    provider = start_provider(config_for(fake_apns, retry_delay=60.0))
    provider.push(TOKEN)
    provider.counters.wait_until(lambda c: c.retried == 1)

    provider.push(OTHER_TOKEN, device="tablet")
    assert fake_apns.next_push().token == OTHER_TOKEN
    provider.counters.wait_until(lambda c: c.sent == 1)
    assert provider.inspect()["retrying"] == 1

    assert provider.ref.stop(timeout=WAIT)  # the waiting retry does not hold up stopping either


def test_the_actor_survives_apns_going_away_and_works_when_it_is_back(fake_apns, caplog, start_provider):
    provider = start_provider(config_for(fake_apns, max_retries=2))
    provider.push(pending=1)
    fake_apns.next_push()
    provider.counters.wait_until(lambda c: c.sent == 1)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        fake_apns.stop()
        provider.push(device="d1")
        provider.counters.wait_until(lambda c: c.failed == 1)
        provider.push(device="d2")
        provider.counters.wait_until(lambda c: c.failed == 2)
        state = provider.inspect()
        assert state["down"] is True and state["connected"] is False

        fake_apns.start()  # same port
        provider.push(device="d3", pending=9)
        assert fake_apns.next_push().payload["devastator"] == {"pending": 9}
        provider.counters.wait_until(lambda c: c.sent == 2)

    assert provider.ref.is_alive()
    records = apns_records(caplog)
    assert len(records) == 2, records
    assert records[0].startswith(f"APNs provider down: {fake_apns.host}:{fake_apns.port}: ")
    assert records[1] == "APNs provider back"
    assert provider.counters.failed == 2 and provider.counters.retried == 4
    assert provider.inspect()["down"] is False


def test_an_apns_that_never_answers_times_out_and_counts_failed(tmp_path, start_provider):
    silent = StreamServer(("127.0.0.1", 0), lambda sock, address: gevent.sleep(WAIT))
    silent.start()
    try:
        key = tmp_path / "AuthKey.p8"
        write_p8_key(key)
        config = ApnsConfig(topic="com.example.app", key_file=key, key_id="KEY1234567", team_id="TEAM123456",
                            host="127.0.0.1", port=silent.address[1], timeout=0.2, max_retries=0)
        provider = start_provider(config)
        provider.push()
        provider.counters.wait_until(lambda c: c.failed == 1)
        assert provider.inspect()["down"] is True
    finally:
        silent.stop(timeout=0)


def test_inspect_answers_with_state_and_counters(fake_apns, start_provider):
    provider = start_provider(config_for(fake_apns))
    assert provider.inspect() == {
        "platform": "apns", "host": "localhost", "port": fake_apns.port, "connected": False, "down": False,
        "queued": 0, "in_flight": 0, "retrying": 0, "sent": 0, "failed": 0, "tokens_removed": 0, "retried": 0,
    }


# -- configuration ----------------------------------------------------------------------

TOKEN_AUTH = dict(key_file="AuthKey.p8", key_id="KEY1234567", team_id="TEAM123456")


def test_production_and_sandbox_hosts_and_overrides():
    assert ApnsConfig(topic="com.example.app", **TOKEN_AUTH).address == (PRODUCTION_HOST, 443)
    assert ApnsConfig(topic="com.example.app", use_sandbox=True, **TOKEN_AUTH).address == (SANDBOX_HOST, 443)
    assert PRODUCTION_HOST == "api.push.apple.com" and SANDBOX_HOST == "api.sandbox.push.apple.com"
    override = ApnsConfig(topic="com.example.app", use_sandbox=True, host="localhost", port=8443, **TOKEN_AUTH)
    assert override.address == ("localhost", 8443)


def test_config_defaults_and_kinds():
    token = ApnsConfig(topic="com.example.app", **TOKEN_AUTH)
    assert token.auth == "token" and token.key_file == Path("AuthKey.p8")
    assert token.priority == 10 and token.push_type == "alert" and token.collapse_id == "devastator"
    assert ApnsConfig(topic="com.example.app", push_type="background", **TOKEN_AUTH).priority == 5
    assert ApnsConfig(topic="com.example.app", cert_file="push.pem").auth == "certificate"


@pytest.mark.parametrize("changes, setting", [
    ({}, "key_file"),
    ({**TOKEN_AUTH, "cert_file": "push.pem"}, "cert_file"),
    ({"key_file": "AuthKey.p8", "team_id": "TEAM123456"}, "key_id"),
    ({**TOKEN_AUTH, "key_id": "short"}, "key_id"),
    ({**TOKEN_AUTH, "team_id": "team123456"}, "team_id"),
    ({**TOKEN_AUTH, "cert_password": "x"}, "cert_password"),
    ({"cert_file": "push.pem", "team_id": "TEAM123456"}, "team_id"),
    ({**TOKEN_AUTH, "topic": ""}, "topic"),
    ({**TOKEN_AUTH, "push_type": "voip"}, "push_type"),
    ({**TOKEN_AUTH, "priority": 1}, "priority"),
    ({**TOKEN_AUTH, "push_type": "background", "priority": 10}, "priority"),
    ({**TOKEN_AUTH, "expiration": -1}, "expiration"),
    ({**TOKEN_AUTH, "collapse_id": "x" * 65}, "collapse_id"),
    ({**TOKEN_AUTH, "collapse_id": ""}, "collapse_id"),
    ({**TOKEN_AUTH, "host": "https://api.push.apple.com"}, "host"),
    ({**TOKEN_AUTH, "port": 0}, "port"),
    ({**TOKEN_AUTH, "timeout": 0}, "timeout"),
    ({**TOKEN_AUTH, "max_retries": -1}, "max_retries"),
    ({**TOKEN_AUTH, "retry_delay": 0}, "retry_delay"),
    ({**TOKEN_AUTH, "max_in_flight": 0}, "max_in_flight"),
])
def test_config_validation_names_the_setting(changes, setting):
    values = {"topic": "com.example.app", **changes}
    with pytest.raises(ValueError, match=f"APNs setting '{setting}': "):
        ApnsConfig(**values)


def test_a_missing_key_file_fails_the_start(tmp_path):
    config = ApnsConfig(topic="com.example.app", key_file=tmp_path / "missing.p8",
                        key_id="KEY1234567", team_id="TEAM123456")
    sink = Recorder()
    ref = ApnsProviderActor.start(config=config, token_sink=sink.ref, counters=PushCounters())
    with pytest.raises(pykka.ActorDeadError):
        ref.ask(PushProviderQuery(), timeout=WAIT)


# -- Apple itself ---------------------------------------------------------------------------

APPLE_ENV = ("APNS_KEY_FILE", "APNS_KEY_ID", "APNS_TEAM_ID", "APNS_TOPIC", "APNS_DEVICE_TOKEN")


@pytest.mark.skipif(not all(os.environ.get(name) for name in APPLE_ENV),
                    reason="set " + ", ".join(APPLE_ENV) + " (and APNS_USE_SANDBOX=0 for production) "
                           "to push to a real device through Apple")
def test_a_real_push_through_apple(start_provider):
    config = ApnsConfig(
        topic=os.environ["APNS_TOPIC"],
        key_file=os.environ["APNS_KEY_FILE"],
        key_id=os.environ["APNS_KEY_ID"],
        team_id=os.environ["APNS_TEAM_ID"],
        use_sandbox=os.environ.get("APNS_USE_SANDBOX", "1") != "0",  # development builds use the sandbox
        max_retries=1,
    )
    provider = start_provider(config)
    provider.push(os.environ["APNS_DEVICE_TOKEN"], pending=1, user="integration", device="test")
    provider.counters.wait_until(lambda c: c.sent + c.failed + c.tokens_removed == 1, timeout=30.0)
    assert provider.counters.sent == 1, (provider.counters.as_dict(), provider.sink.messages)
