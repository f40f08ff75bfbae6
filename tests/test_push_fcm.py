"""Tests of the FCM provider actor, against a fake Google token endpoint and FCM over real TLS.

The last test talks to Google itself, and runs only when FCM_SERVICE_ACCOUNT_FILE
and FCM_TEST_TOKEN name a service account and a device's registration token.
"""
from __future__ import annotations

import datetime
import email.utils
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import gevent.event
import pykka
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devastator.actors.messages import PushProviderQuery
from devastator.push import PushCounters, PushRequest, PushTokenRejected
from devastator.push.fcm import (
    FcmConfig,
    FcmProviderActor,
    fcm_message,
    load_service_account,
    parse_retry_after,
)
from fake_fcm import FakeFcm, error_body, fake_fcm, fake_fcm_key, write_service_account  # noqa: F401  (fixtures)

WAIT = 5.0  # seconds: a bound for a test that fails, never a pause
FCM_LOGGER = "devastator.push.fcm"


def wait_until(changed: gevent.event.Event, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Return once ``condition()`` holds, checking each time ``changed`` is set."""
    deadline = time.monotonic() + timeout
    while not condition():
        changed.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not changed.wait(remaining):
            if condition():
                return
            pytest.fail(f"{what} within {timeout} s")


class _RecorderActor(pykka.ThreadingActor):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self._recorder = recorder

    def on_receive(self, message):
        self._recorder.messages.append(message)
        self._recorder.arrived.set()


class Recorder:
    """A started actor that keeps what it is told: the provider's token sink."""

    def __init__(self):
        self.messages: list = []
        self.arrived = gevent.event.Event()
        self.ref = _RecorderActor.start(self)

    def wait(self, count: int = 1, timeout: float = WAIT) -> list:
        wait_until(
            self.arrived, lambda: len(self.messages) >= count, timeout, f"the sink was not told {count} messages"
        )
        return self.messages


class WatchedCounters(PushCounters):
    """PushCounters that wake a waiting test whenever a count changes."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        changed = self.__dict__.get("_changed")
        if changed is not None:
            changed.set()

    def wait_for(self, condition: Callable[[PushCounters], bool], timeout: float = WAIT) -> None:
        changed = self.__dict__.setdefault("_changed", gevent.event.Event())
        wait_until(changed, lambda: condition(self), timeout, f"counters never got there: {self.as_dict()}")


class FakeClock:
    """The provider's monotonic clock, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Provider:
    ref: pykka.ActorRef
    sink: Recorder
    counters: WatchedCounters

    def push(self, token: str = "token-1", pending: int = 1, preview: bytes | None = None) -> None:
        self.ref.tell(PushRequest(user="alice", device="phone", token=token, pending=pending, preview=preview))

    def inspect(self) -> dict:
        return self.ref.ask(PushProviderQuery(), timeout=WAIT)


@pytest.fixture
def base_config(fake_fcm: FakeFcm) -> FcmConfig:
    # Short backoffs keep the retry tests fast; each test widens what it needs.
    return FcmConfig(
        service_account_file=fake_fcm.service_account_file,
        endpoint=fake_fcm.endpoint,
        ca_file=fake_fcm.ca_file,
        ttl=60,
        retry_backoff_base=0.01,
        retry_backoff_max=0.05,
        max_retries=3,
        timeout=2.0,
    )


@pytest.fixture
def start_provider(base_config: FcmConfig):
    def start(*, clock: Callable[[], float] = time.monotonic, **changes) -> Provider:
        sink = Recorder()
        counters = WatchedCounters()
        ref = FcmProviderActor.start(
            config=replace(base_config, **changes), token_sink=sink.ref, counters=counters, clock=clock
        )
        return Provider(ref, sink, counters)

    return start


def log_lines(caplog, text: str) -> list[str]:
    lines = [record.getMessage() for record in caplog.records if record.name == FCM_LOGGER]
    return [line for line in lines if text in line]


# -- what goes out -------------------------------------------------------------------


def test_a_push_is_a_data_message_without_text(fake_fcm, start_provider):
    provider = start_provider()
    provider.push(token="token-1", pending=3)
    provider.counters.wait_for(lambda c: c.sent == 1)
    assert fake_fcm.accepted == [
        {
            "token": "token-1",
            "data": {"pending": "3"},
            "android": {"priority": "HIGH", "ttl": "60s", "collapse_key": "devastator"},
        }
    ]


def test_a_preview_goes_only_when_set_and_small_enough(fake_fcm, start_provider):
    provider = start_provider(priority="normal", collapse_key="inbox")
    preview = json.dumps({"text": "héllo"}).encode()
    provider.push(token="token-1", pending=1, preview=preview)
    provider.push(token="token-2", pending=2, preview=b'{"text": "' + b"x" * 4000 + b'"}')
    provider.counters.wait_for(lambda c: c.sent == 2)
    by_token = {message["token"]: message for message in fake_fcm.accepted}
    assert by_token["token-1"]["data"] == {"pending": "1", "preview": preview.decode()}
    assert by_token["token-1"]["android"] == {"priority": "NORMAL", "ttl": "60s", "collapse_key": "inbox"}
    # Too big for FCM's 4 KB: the wake-up goes without it rather than not at all.
    assert by_token["token-2"]["data"] == {"pending": "2"}


def test_fcm_message_is_built_without_an_actor(base_config):
    request = PushRequest(user="u", device="d", token="t", pending=7)
    assert fcm_message(request, base_config)["data"] == {"pending": "7"}
    assert "notification" not in fcm_message(request, base_config)


# -- the access token ------------------------------------------------------------------


def test_one_access_token_serves_many_pushes(fake_fcm, start_provider):
    provider = start_provider(connections=4)
    for index in range(20):
        provider.push(token=f"token-{index}", pending=index + 1)
    provider.counters.wait_for(lambda c: c.sent == 20)
    assert fake_fcm.token_requests == 1
    assert len(fake_fcm.accepted) == 20
    assert provider.inspect() == {
        "platform": "fcm",
        "project": fake_fcm.project_id,
        "token_expires_in": pytest.approx(3600, abs=5),
        "retrying": 0,
        "queued": 0,
        "down": None,
        "sent": 20,
        "failed": 0,
        "tokens_removed": 0,
        "retried": 0,
    }


def test_the_access_token_is_replaced_before_it_expires(fake_fcm, start_provider):
    clock = FakeClock()
    provider = start_provider(clock=clock)
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)
    clock.now += 3000  # 10 minutes left: still good
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 2)
    assert fake_fcm.token_requests == 1
    assert provider.inspect()["token_expires_in"] == 600

    clock.now += 301  # under 5 minutes left: replaced before use
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 3)
    assert fake_fcm.token_requests == 2
    assert provider.inspect()["token_expires_in"] == 3600
    assert fake_fcm.statuses() == [200, 200, 200]


def test_a_401_gets_a_new_token_and_the_push_again(fake_fcm, start_provider):
    provider = start_provider()
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)
    fake_fcm.expire_access_tokens()
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 2)
    assert fake_fcm.statuses() == [200, 401, 200]
    assert fake_fcm.token_requests == 2
    assert provider.counters.failed == 0


def test_a_second_401_fails_the_push_without_a_loop(fake_fcm, start_provider, caplog):
    fake_fcm.accept_tokens = False
    provider = start_provider()
    provider.push()
    provider.counters.wait_for(lambda c: c.failed == 1)
    assert fake_fcm.statuses() == [401, 401]
    assert fake_fcm.token_requests == 2
    assert len(log_lines(caplog, "FCM refused a push to alice/phone: 401")) == 1


def test_the_token_uri_setting_overrides_the_file(fake_fcm, start_provider, tmp_path):
    # The assertion's audience must follow the override: the fake checks it.
    account = tmp_path / "account.json"
    original = json.loads(fake_fcm.service_account_file.read_text())
    account.write_text(json.dumps({**original, "token_uri": "https://oauth2.googleapis.com/token"}))
    provider = start_provider(service_account_file=account, token_uri=fake_fcm.token_uri)
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)


def test_refused_credentials_fail_pushes_without_retries(fake_fcm, start_provider, tmp_path, caplog):
    # Same account, another key: the fake's check of the signature fails.
    account = tmp_path / "stolen.json"
    write_service_account(
        account,
        project_id=fake_fcm.project_id,
        token_uri=fake_fcm.token_uri,
        client_email=fake_fcm.client_email,
        private_key_id=fake_fcm.private_key_id,
    )
    provider = start_provider(service_account_file=account, retry_backoff_max=30.0)
    provider.push(token="token-1")
    provider.push(token="token-2")
    provider.counters.wait_for(lambda c: c.failed == 2)
    assert provider.counters.retried == 0
    # The second push did not ask again: a bad key is not fixed by asking at push rate.
    assert fake_fcm.token_requests == 1
    assert fake_fcm.statuses("/token") == [400]
    [line] = log_lines(caplog, "FCM provider down")
    assert "invalid_grant" in line
    assert provider.inspect()["down"] is not None


# -- tokens FCM turns down -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mark", "reason"), [("unregistered", "UNREGISTERED"), ("invalid", "INVALID_ARGUMENT")]
)
def test_a_rejected_token_goes_to_the_sink(fake_fcm, start_provider, mark, reason):
    getattr(fake_fcm, mark).add("token-gone")
    provider = start_provider()
    provider.push(token="token-gone")
    provider.push(token="token-good")
    [rejected] = provider.sink.wait(1)
    assert rejected == PushTokenRejected(
        platform="fcm", user="alice", device="phone", token="token-gone", reason=reason
    )
    provider.counters.wait_for(lambda c: c.sent == 1)
    assert provider.counters.as_dict() == {"sent": 1, "failed": 0, "tokens_removed": 1, "retried": 0}


def test_a_payload_error_does_not_remove_the_token(fake_fcm, start_provider, caplog):
    # FCM marks payload errors INVALID_ARGUMENT too; only the field says it is not the token.
    fake_fcm.respond_next(
        400,
        error_body(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.android.ttl'",
            fcm_error="INVALID_ARGUMENT",
            fields=["message.android.ttl"],
        ),
    )
    provider = start_provider()
    provider.push()
    provider.counters.wait_for(lambda c: c.failed == 1)
    assert provider.counters.tokens_removed == 0
    assert provider.sink.messages == []
    [line] = log_lines(caplog, "FCM refused a push")
    assert "400 INVALID_ARGUMENT" in line and "token-1" not in line


def test_a_sender_id_mismatch_fails_the_push_only(fake_fcm, start_provider, caplog):
    fake_fcm.other_sender.add("token-1")
    provider = start_provider()
    provider.push(token="token-1")
    provider.counters.wait_for(lambda c: c.failed == 1)
    assert provider.counters.as_dict() == {"sent": 0, "failed": 1, "tokens_removed": 0, "retried": 0}
    assert provider.sink.messages == []
    assert len(log_lines(caplog, "403 SENDER_ID_MISMATCH")) == 1
    assert log_lines(caplog, "FCM provider down") == []


# -- retries ------------------------------------------------------------------------------


def test_a_503_is_retried_after_retry_after(fake_fcm, start_provider, caplog):
    fake_fcm.fail_next(1, 503, retry_after="1")
    provider = start_provider(retry_backoff_max=2.0)
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)
    first, second = (seen for seen in fake_fcm.seen if "messages:send" in seen.path)
    assert (first.status, second.status) == (503, 200)
    assert second.at - first.at >= 0.9
    assert provider.counters.retried == 1
    assert len(log_lines(caplog, "FCM provider down: FCM answered 503 UNAVAILABLE")) == 1
    assert len(log_lines(caplog, "FCM provider up again")) == 1


def test_retry_after_is_bounded_by_the_longest_backoff(fake_fcm, start_provider):
    fake_fcm.fail_next(1, 429, retry_after="3600")
    provider = start_provider(retry_backoff_max=0.1)
    started = time.monotonic()
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)
    assert time.monotonic() - started < 2.0
    assert fake_fcm.statuses() == [429, 200]


def test_500s_back_off_then_succeed_with_one_log_line_each_way(fake_fcm, start_provider, caplog):
    fake_fcm.fail_next(3, 500)
    provider = start_provider()
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)
    assert fake_fcm.statuses() == [500, 500, 500, 200]
    assert provider.counters.retried == 3
    assert len(log_lines(caplog, "FCM provider down")) == 1
    assert len(log_lines(caplog, "FCM provider up again")) == 1


def test_retries_are_bounded(fake_fcm, start_provider):
    fake_fcm.fail_next(10, 503)
    provider = start_provider(max_retries=2)
    provider.push()
    provider.counters.wait_for(lambda c: c.failed == 1)
    assert provider.counters.as_dict() == {"sent": 0, "failed": 1, "tokens_removed": 0, "retried": 2}
    assert fake_fcm.statuses() == [503, 503, 503]
    assert provider.inspect()["retrying"] == 0


def test_a_push_waiting_to_retry_does_not_hold_up_others(fake_fcm, start_provider):
    fake_fcm.fail_next(1, 503, retry_after="1")
    provider = start_provider(connections=1, retry_backoff_max=2.0)
    provider.push(token="token-late")
    fake_fcm.wait_for(lambda: fake_fcm.statuses() == [503])
    provider.push(token="token-next")
    fake_fcm.wait_for(lambda: len(fake_fcm.accepted) == 1)
    assert provider.inspect()["retrying"] == 1
    provider.counters.wait_for(lambda c: c.sent == 2)
    assert [message["token"] for message in fake_fcm.accepted] == ["token-next", "token-late"]


def test_the_provider_survives_fcm_going_away_and_recovers(fake_fcm, start_provider, caplog):
    provider = start_provider(connections=1, max_retries=1000, retry_backoff_max=0.05)
    provider.push(token="token-1")
    provider.counters.wait_for(lambda c: c.sent == 1)

    fake_fcm.stop()
    provider.push(token="token-2")
    provider.counters.wait_for(lambda c: c.retried >= 3)
    assert provider.ref.is_alive()
    assert "cannot reach" in provider.inspect()["down"]

    fake_fcm.start()  # same port
    provider.counters.wait_for(lambda c: c.sent == 2)
    assert [message["token"] for message in fake_fcm.accepted] == ["token-1", "token-2"]
    assert provider.counters.failed == 0
    assert len(log_lines(caplog, "FCM provider down: cannot reach")) == 1
    assert len(log_lines(caplog, "FCM provider up again")) == 1
    assert provider.inspect()["down"] is None


def test_a_restarted_fcm_does_not_count_as_an_outage(fake_fcm, start_provider, caplog):
    # A keep-alive connection that the server closed is reopened on the spot.
    provider = start_provider(connections=1)
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 1)
    fake_fcm.stop()
    fake_fcm.start()
    provider.push()
    provider.counters.wait_for(lambda c: c.sent == 2)
    assert provider.counters.retried == 0
    assert log_lines(caplog, "FCM provider down") == []


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("endpoint", "http://fcm.googleapis.com"),
        ("endpoint", "https://fcm.googleapis.com/v1"),
        ("token_uri", "http://oauth2.googleapis.com/token"),
        ("project_id", ""),
        ("project_id", "a/b"),
        ("ttl", -1),
        ("ttl", 2419201),
        ("ttl", 1.5),
        ("collapse_key", ""),
        ("priority", "URGENT"),
        ("retry_backoff_base", 0),
        ("retry_backoff_max", 0.001),
        ("max_retries", -1),
        ("connections", 0),
        ("timeout", float("nan")),
    ],
)
def test_bad_settings_are_named(tmp_path, setting, value):
    config = FcmConfig(service_account_file=tmp_path / "account.json")
    with pytest.raises(ValueError, match=f"FCM setting '{setting}'"):
        replace(config, **{setting: value})


def test_settings_are_normalised(tmp_path):
    config = FcmConfig(
        service_account_file=str(tmp_path / "a.json"), priority="normal", endpoint="https://x.test/"
    )
    assert config.service_account_file == tmp_path / "a.json"
    assert config.priority == "NORMAL"
    assert config.endpoint == "https://x.test"


def test_a_good_service_account_loads(fake_fcm):
    account = load_service_account(fake_fcm.service_account_file)
    assert account.project_id == fake_fcm.project_id
    assert account.client_email == fake_fcm.client_email
    assert account.private_key_id == fake_fcm.private_key_id
    assert account.token_uri == fake_fcm.token_uri
    assert "PRIVATE" not in repr(account) and "private_key=" not in repr(account)


def _ec_key_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "authorized_user"}, "expected \"type\": \"service_account\""),
        ({"client_email": ""}, "'client_email' is missing or empty"),
        ({"private_key_id": None}, "'private_key_id' is missing or empty"),
        ({"project_id": 5}, "'project_id' is missing or empty"),
        ({"token_uri": "http://oauth2.googleapis.com/token"}, "'token_uri' must be an https:// URL"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"}, "not a PEM"),
        ({"private_key": _ec_key_pem()}, "must be an RSA key"),
    ],
)
def test_a_bad_service_account_is_explained(fake_fcm, tmp_path, change, message):
    document = json.loads(fake_fcm.service_account_file.read_text())
    path = tmp_path / "account.json"
    path.write_text(json.dumps({**document, **change}))
    with pytest.raises(ValueError, match=message) as raised:
        load_service_account(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("{not json", "is not JSON"), ("[1, 2]", "expected a JSON object")],
)
def test_an_unreadable_service_account_is_explained(tmp_path, content, message):
    path = tmp_path / "account.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_service_account(path)


def test_retry_after_reads_seconds_and_dates():
    now = time.time()
    date = email.utils.format_datetime(
        datetime.datetime.fromtimestamp(now + 30, datetime.timezone.utc), usegmt=True
    )
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1)


def test_a_provider_with_a_bad_account_file_does_not_start(start_provider, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    path: Path = tmp_path / "missing.json"
    provider = start_provider(service_account_file=path)
    with pytest.raises(pykka.ActorDeadError):
        provider.inspect()


# -- Google itself --------------------------------------------------------------------------


@pytest.mark.skipif(
    not (os.environ.get("FCM_SERVICE_ACCOUNT_FILE") and os.environ.get("FCM_TEST_TOKEN")),
    reason="set FCM_SERVICE_ACCOUNT_FILE and FCM_TEST_TOKEN to push through Google",
)
def test_google_takes_a_push():
    sink = Recorder()
    counters = WatchedCounters()
    config = FcmConfig(service_account_file=Path(os.environ["FCM_SERVICE_ACCOUNT_FILE"]), ttl=60, max_retries=2)
    ref = FcmProviderActor.start(config=config, token_sink=sink.ref, counters=counters)
    ref.tell(PushRequest(user="integration", device="test", token=os.environ["FCM_TEST_TOKEN"], pending=1))
    counters.wait_for(lambda c: c.sent + c.failed + c.tokens_removed >= 1, timeout=60)
    assert counters.sent == 1, (ref.ask(PushProviderQuery(), timeout=WAIT), sink.messages)
