"""Every error code of PROTOCOL.md section 3, over real TLS and raw frames.

Each case checks the exact code, the JSON-RPC id of the error response and
whether the connection stays open; after every case, a bystander connection
that was authenticated beforehand must still be served (ping and a delivery).
"""
from __future__ import annotations

import collections
import struct
import time

import jwt
import orjson
import pytest

from conftest import RunningServer
from wire import DEFAULT_MAX_FRAME_BYTES, READ_TIMEOUT, RawTls, assert_error, assert_result, notification, request
from devastator.client import frame
from devastator.protocol.errors import (
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_AUTHENTICATED,
    OVERLOADED,
    PARSE_ERROR,
    TOO_LARGE,
    UNKNOWN_RECIPIENT,
)
from devastator.secrets import ensure_jwt_keys
from devastator.store import SqliteStore



class Bystanders:
    """Two clients authenticated before a test's own connections: a watcher and a listener."""

    def __init__(self, running: RunningServer, prefix: str = "bystander"):
        self.watcher_name = f"{prefix}-watcher"
        self.listener_name = f"{prefix}-listener"
        self.watcher = running.connect(self.watcher_name)
        self.listener = running.connect(self.listener_name)
        self._sent = 0

    def assert_pinged(self) -> None:
        assert self.watcher.ping() == "pong"

    def assert_served(self) -> None:
        self.assert_pinged()
        self._sent += 1
        body = {"check": self._sent}
        sent = self.watcher.send(self.listener_name, body, timeout=READ_TIMEOUT)
        received = self.listener.receive(timeout=READ_TIMEOUT)
        assert received["id"] == sent["id"]
        assert received["message"] == body
        assert received["from"] == self.watcher_name


@pytest.fixture
def others(running) -> Bystanders:
    return Bystanders(running)


@pytest.fixture
def raw(running, others):
    # Depends on ``others`` so that the bystanders are connected first.
    connection = RawTls(running)
    yield connection
    connection.close()


@pytest.fixture
def authed(running, others):
    connection = RawTls(running)
    result = connection.auth(running.token("alice"))
    assert result["user"] == "alice" and result["device"] == "default"
    yield connection
    connection.close()


# -- ping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["ping-1", 7, 0, None])
def test_ping_answers_pong_with_the_request_id(raw, others, request_id):
    raw.send_value(request("ping", None, request_id))
    assert_result(raw.read_one(), "pong", request_id)
    others.assert_served()


def test_ping_with_empty_params_is_answered(raw, others):
    raw.send_value({"jsonrpc": "2.0", "method": "ping", "params": [], "id": 3})
    assert_result(raw.read_one(), "pong", 3)
    raw.send_value({"jsonrpc": "2.0", "method": "ping", "params": {}, "id": 4})
    assert_result(raw.read_one(), "pong", 4)


def test_ping_notification_gets_no_answer(raw, others):
    # An answer to the notification would arrive before the request's answer.
    raw.send(frame(notification("ping")) + frame(request("ping", None, "after")))
    assert_result(raw.read_one(), "pong", "after")
    raw.assert_open()
    others.assert_served()


# -- -32700 parse error ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc": "2.0", "method": "foo", "params": "bar", "baz]',
        b"\xff\xfe\x00garbage",
        b'{"jsonrpc": "2.0", "method": "ping", "id": 1',
        b"\xc3\x28",  # invalid UTF-8
    ],
    ids=["invalid-json", "garbage-bytes", "truncated-object", "invalid-utf8"],
)
def test_parse_error_answers_once_then_closes(raw, others, body):
    raw.send(struct.pack("<I", len(body)) + body)
    assert_error(raw.read_one(), PARSE_ERROR, None)
    raw.assert_closed()
    others.assert_served()


def test_parse_error_after_valid_requests_answers_them_first(raw, others):
    bad = b"{nope"
    raw.send(frame(request("ping", None, 1)) + struct.pack("<I", len(bad)) + bad
             + frame(request("ping", None, 2)))
    assert_result(raw.read_one(), "pong", 1)
    assert_error(raw.read_one(), PARSE_ERROR, None)
    raw.assert_closed()  # the ping behind the bad frame is never answered
    others.assert_served()


# -- -32600 invalid request -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected_id",
    [
        (42, None),
        ("hello", None),
        (None, None),
        (True, None),
        ({"foo": 1}, None),
        ({"jsonrpc": "2.0"}, None),
        ({"jsonrpc": "2.0", "method": 1, "params": "bar"}, None),
        ({"jsonrpc": "2.0", "method": "ping", "id": {"an": "object"}}, None),
        ({"jsonrpc": "2.0", "method": "ping", "id": True}, None),
        # A valid id is echoed back, so that the client can correlate the error.
        ({"jsonrpc": "1.0", "method": "ping", "id": 1}, 1),
        ({"method": "ping", "id": "no-version"}, "no-version"),
        ({"jsonrpc": "2.0", "method": "ping", "params": "bar", "id": 5}, 5),
    ],
    ids=["number", "string", "null", "true", "no-method", "version-only", "method-not-string",
         "id-object", "id-bool", "jsonrpc-1.0", "jsonrpc-missing", "params-string"],
)
def test_invalid_request_is_answered_and_connection_stays_open(raw, others, value, expected_id):
    raw.send_value(value)
    assert_error(raw.read_one(), INVALID_REQUEST, expected_id)
    raw.assert_open()
    others.assert_served()


def test_empty_batch_is_one_error_object_not_an_array(raw, others):
    raw.send(frame([]))
    assert_error(raw.read_one(), INVALID_REQUEST, None)
    raw.assert_open()
    others.assert_served()


def test_batch_of_invalid_members_gets_an_array_of_errors(raw, others):
    raw.send_value([1, 2, 3])
    answer = raw.read_one()
    assert isinstance(answer, list) and len(answer) == 3, answer
    for item in answer:
        assert_error(item, INVALID_REQUEST, None)
    raw.assert_open()
    others.assert_served()


def test_mixed_batch_answers_only_the_non_notifications(raw, others):
    raw.send_value([
        request("ping", None, "p1"),
        {"foo": "bar"},
        notification("ping"),
        request("ping", None, 2),
        notification("no.such.method"),
    ])
    answer = raw.read_one()
    assert isinstance(answer, list) and len(answer) == 3, answer
    by_id = collections.defaultdict(list)
    for item in answer:
        by_id[item["id"]].append(item)
    assert sorted(by_id, key=str) == sorted(["p1", 2, None], key=str), answer
    assert_result(by_id["p1"][0], "pong", "p1")
    assert_result(by_id[2][0], "pong", 2)
    assert_error(by_id[None][0], INVALID_REQUEST, None)
    raw.assert_open()
    others.assert_served()


def test_batch_of_notifications_only_gets_no_answer(raw, others):
    raw.send(frame([notification("ping"), notification("ping")]) + frame(request("ping", None, "x")))
    assert_result(raw.read_one(), "pong", "x")
    raw.assert_open()


def test_zero_length_frame_is_invalid_and_closes(raw, others):
    raw.send(b"\x00\x00\x00\x00")
    assert_error(raw.read_one(), INVALID_REQUEST, None)
    raw.assert_closed()
    others.assert_served()


# -- -32004 too large ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length", [0xFFFFFFFF, DEFAULT_MAX_FRAME_BYTES + 1], ids=["4GiB", "max-plus-one"]
)
def test_oversized_header_is_refused_without_waiting_for_the_body(raw, others, length):
    # Only the header is sent: the answer must come without the body.
    raw.send(struct.pack("<I", length))
    assert_error(raw.read_one(), TOO_LARGE, None)
    raw.assert_closed()
    others.assert_served()


def test_frame_of_exactly_max_frame_bytes_is_accepted(raw, others):
    body = orjson.dumps(request("ping", {"pad": ""}, "big"))
    padding = DEFAULT_MAX_FRAME_BYTES - len(body)
    body = orjson.dumps(request("ping", {"pad": "x" * padding}, "big"))
    assert len(body) == DEFAULT_MAX_FRAME_BYTES
    raw.send(struct.pack("<I", len(body)) + body)
    assert_result(raw.read_one(), "pong", "big")
    raw.assert_open()


def test_batch_over_max_batch_is_too_large_and_stays_open(raw, others):
    raw.send_value([request("ping", None, i) for i in range(101)])
    assert_error(raw.read_one(), TOO_LARGE, None)
    raw.assert_open()
    # A batch of exactly max_batch is fine.
    raw.send_value([request("ping", None, i) for i in range(100)])
    answer = raw.read_one()
    assert isinstance(answer, list)
    assert sorted(item["id"] for item in answer) == list(range(100))
    assert all(item["result"] == "pong" for item in answer)
    others.assert_served()


def test_message_over_max_message_bytes_is_too_large_and_stays_open(authed, others):
    big = "x" * 70000
    answer = authed.call("msg.send", {"to": others.listener_name, "message": big}, id="big")
    assert_error(answer, TOO_LARGE, "big")
    authed.assert_open()
    # The listener got nothing: the next thing it receives is the bystander check.
    others.assert_served()


# -- -32601 method not found --------------------------------------------------------------------


def test_unknown_method_request(authed, others):
    assert_error(authed.call("no.such.method", None, id=17), METHOD_NOT_FOUND, 17)
    assert_error(authed.call("msg.nope", {"a": 1}, id="m"), METHOD_NOT_FOUND, "m")
    assert_error(authed.call("auth.nope", {}, id="a"), METHOD_NOT_FOUND, "a")
    authed.assert_open()
    others.assert_served()


def test_an_unknown_method_before_auth_is_not_authenticated(raw, others):
    # PROTOCOL.md section 3: -32001 for any method but ping and auth.* before auth.
    assert_error(raw.call("no.such.method", None, id=3), NOT_AUTHENTICATED, 3)
    assert_error(raw.call("auth.nope", {}, id=4), METHOD_NOT_FOUND, 4)
    raw.assert_open()
    others.assert_served()


def test_unknown_method_notification_gets_no_answer(authed, others):
    authed.send(frame(notification("no.such.method", {"a": 1})) + frame(request("ping", None, "after")))
    assert_result(authed.read_one(), "pong", "after")
    authed.assert_open()
    others.assert_served()


# -- -32602 invalid params ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"message": "hi"},
        {"to": None, "message": "hi"},
        {"to": "not a user!", "message": "hi"},
        {"to": "", "message": "hi"},
        {"to": "x" * 65, "message": "hi"},
        {"to": 42, "message": "hi"},
        {"to": [], "message": "hi"},
        {"to": ["ok", "bad user"], "message": "hi"},
        {"to": "RECIPIENT"},
        {"to": "RECIPIENT", "message": "hi", "ttl": 0},
        {"to": "RECIPIENT", "message": "hi", "ttl": -5},
        {"to": "RECIPIENT", "message": "hi", "ttl": "60"},
        {"to": "RECIPIENT", "message": "hi", "ttl": 1.5},
        ["RECIPIENT", "hi"],
    ],
    ids=["missing-to", "null-to", "bad-user-id", "empty-user-id", "user-id-too-long", "to-number",
         "empty-list", "bad-id-in-list", "missing-message", "ttl-zero", "ttl-negative", "ttl-string",
         "ttl-fraction", "params-array"],
)
def test_msg_send_invalid_params(authed, others, params):
    recipient = others.listener_name

    def fill(value):
        return recipient if value == "RECIPIENT" else value

    if isinstance(params, dict):
        params = {key: fill(value) for key, value in params.items()}
    else:
        params = [fill(value) for value in params]
    assert_error(authed.call("msg.send", params, id="bad"), INVALID_PARAMS, "bad")
    authed.assert_open()
    others.assert_served()  # and the listener received nothing from the bad sends


def test_msg_send_without_params(authed, others):
    authed.send_value({"jsonrpc": "2.0", "method": "msg.send", "id": 9})
    assert_error(authed.read_one(), INVALID_PARAMS, 9)
    authed.assert_open()


@pytest.mark.parametrize("platform", ["windows", "", None, 3])
def test_push_register_unsupported_platform(authed, others, platform):
    answer = authed.call("push.register", {"platform": platform, "token": "abc"}, id="push")
    assert_error(answer, INVALID_PARAMS, "push")
    authed.assert_open()
    others.assert_served()


def test_auth_jwt_without_token_is_invalid_params(raw, others):
    assert_error(raw.call("auth.jwt", {}, id="a"), INVALID_PARAMS, "a")
    assert_error(raw.call("auth.jwt", {"token": 5}, id="b"), INVALID_PARAMS, "b")
    raw.assert_open()


# -- -32001 not authenticated -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params",
    [
        ("msg.send", {"to": "bystander-listener", "message": "hi"}),
        ("msg.echo", {"message": "hi"}),
        ("push.register", {"platform": "fcm", "token": "abc"}),
    ],
)
def test_methods_before_auth_are_not_authenticated(running, raw, others, method, params):
    assert_error(raw.call(method, params, id="early"), NOT_AUTHENTICATED, "early")
    raw.assert_open()  # ping works before auth
    # Authenticating afterwards works on the same connection.
    assert raw.auth(running.token("latecomer"))["user"] == "latecomer"
    others.assert_served()


def test_ping_before_auth_works(raw, others):
    assert_result(raw.call("ping", None, id=1), "pong", 1)


# -- -32002 forbidden -------------------------------------------------------------------------------


def _claims(user: str, device: str = "default", ttl: int = 3600) -> dict:
    now = int(time.time())
    return {"iss": "devastator", "sub": user, "dev": device, "iat": now, "exp": now + ttl}


def test_auth_jwt_garbage_token(running, raw, others):
    assert_error(raw.call("auth.jwt", {"token": "not-a-jwt"}, id="g"), FORBIDDEN, "g")
    raw.assert_open()
    assert raw.auth(running.token("alice"))["user"] == "alice"
    others.assert_served()


def test_auth_jwt_signed_by_another_secret(running, raw, others):
    running.token("alice")  # the user exists: only the signature is wrong
    kid = ensure_jwt_keys(running.settings.data_dir).current_kid
    with_known_kid = jwt.encode(_claims("alice"), "other-secret-" + "x" * 32, algorithm="HS256",
                                headers={"kid": kid})
    without_kid = jwt.encode(_claims("alice"), "other-secret-" + "x" * 32, algorithm="HS256")
    assert_error(raw.call("auth.jwt", {"token": with_known_kid}, id=1), FORBIDDEN, 1)
    assert_error(raw.call("auth.jwt", {"token": without_kid}, id=2), FORBIDDEN, 2)
    raw.assert_open()
    # Still unauthenticated after the failures.
    assert_error(raw.call("msg.echo", {"message": 1}, id=3), NOT_AUTHENTICATED, 3)
    others.assert_served()


def test_auth_jwt_expired_token(running, raw, others):
    running.token("alice")
    expired = running.authority.mint(running.register("alice"), ttl_seconds=-100)
    assert_error(raw.call("auth.jwt", {"token": expired}, id="exp"), FORBIDDEN, "exp")
    raw.assert_open()
    assert raw.auth(running.token("alice"))["user"] == "alice"
    others.assert_served()


def test_auth_cert_without_client_certificate(raw, others):
    assert_error(raw.call("auth.cert", None, id="cert"), FORBIDDEN, "cert")
    raw.assert_open()
    assert_error(raw.call("msg.echo", {"message": 1}, id=2), NOT_AUTHENTICATED, 2)
    others.assert_served()


# -- -32003 overloaded ---------------------------------------------------------------------------------


def test_too_many_pending_sends_are_overloaded(servers):
    running = servers(max_pending_requests=2)
    others = Bystanders(running)
    sender = RawTls(running)
    try:
        sender.auth(running.token("alice"))
        ids = [f"s{i}" for i in range(20)]
        sender.send_value([
            request("msg.send", {"to": others.listener_name, "message": {"n": i}}, request_id)
            for i, request_id in enumerate(ids)
        ])
        answer = sender.read_one()
        assert isinstance(answer, list), answer
        assert sorted(item["id"] for item in answer) == sorted(ids)
        overloaded = [item for item in answer if "error" in item]
        accepted = [item for item in answer if "result" in item]
        assert overloaded and accepted, answer
        for item in overloaded:
            assert_error(item, OVERLOADED, item["id"])
        for item in accepted:
            assert set(item["result"]) == {"id", "ts"}
        sender.assert_open()
        # The accepted ones are delivered; the overloaded ones are not.
        delivered = [others.listener.receive(timeout=READ_TIMEOUT) for _ in accepted]
        assert sorted(m["id"] for m in delivered) == sorted(item["result"]["id"] for item in accepted)
        # Once answered, sends are accepted again.
        answer = sender.call("msg.send", {"to": others.listener_name, "message": "again"}, id="again")
        assert "result" in answer, answer
        assert others.listener.receive(timeout=READ_TIMEOUT)["message"] == "again"
        others.assert_served()
    finally:
        sender.close()


# -- -32005 unknown recipient ------------------------------------------------------------------------


def test_msg_send_to_unknown_user(authed, others):
    answer = authed.call("msg.send", {"to": "ghost", "message": "boo"}, id="ghost")
    assert_error(answer, UNKNOWN_RECIPIENT, "ghost")
    authed.assert_open()
    others.assert_served()


def test_msg_send_with_one_unknown_recipient_sends_to_nobody(running, authed, others):
    carol = running.connect("carol")
    answer = authed.call("msg.send", {"to": ["carol", "ghost"], "message": {"n": 1}}, id="two")
    assert_error(answer, UNKNOWN_RECIPIENT, "two")
    authed.assert_open()
    # Carol's first message is the next one, not the failed one.
    answer = authed.call("msg.send", {"to": "carol", "message": {"n": 2}}, id="one")
    assert "result" in answer, answer
    received = carol.receive(timeout=READ_TIMEOUT)
    assert received["message"] == {"n": 2} and received["id"] == answer["result"]["id"]
    others.assert_served()


# -- -32603 internal error ----------------------------------------------------------------------------


class FailingStore(SqliteStore):
    """A SQLite store whose every append fails, as a broken disk would."""

    def append(self, *args, **kwargs):
        raise RuntimeError("the disk is on fire")


def test_store_failure_is_an_internal_error_and_stays_open(servers, settings):
    running = servers(store=FailingStore(settings.db_path))
    others = Bystanders(running)
    sender = RawTls(running)
    try:
        sender.auth(running.token("alice"))
        answer = sender.call("msg.send", {"to": others.listener_name, "message": "hi"}, id=99)
        assert_error(answer, INTERNAL_ERROR, 99)
        sender.assert_open()
        assert_result(sender.call("msg.echo", {"message": "still here"}, id="echo"), "ACK", "echo")
        echo = sender.read_one()
        assert echo["method"] == "msg.echo" and echo["params"] == {"message": "still here"}
        # Sends all fail on this server, so the bystander check is the ping.
        others.assert_pinged()
    finally:
        sender.close()


# -- framing: any chunking ---------------------------------------------------------------------------


def test_frame_written_one_byte_at_a_time(raw, others):
    data = frame(request("ping", None, "split")) + frame(request("ping", None, "split-2"))
    for i in range(len(data)):
        raw.send(data[i:i + 1])
    assert_result(raw.read_one(), "pong", "split")
    assert_result(raw.read_one(), "pong", "split-2")
    raw.assert_open()
    others.assert_served()


def test_many_frames_in_one_write(raw, others):
    raw.send(b"".join(frame(request("ping", None, i)) for i in range(10)))
    answers = raw.read(10)
    assert sorted(answer["id"] for answer in answers) == list(range(10))
    for answer in answers:
        assert_result(answer, "pong", answer["id"])
    raw.assert_open()
    others.assert_served()


def test_frames_split_at_odd_boundaries(raw, others):
    data = b"".join(frame(request("ping", None, i)) for i in range(5))
    # Cut inside headers and bodies alike.
    cuts = [0, 2, 7, 30, 31, len(data) - 3, len(data)]
    for start, stop in zip(cuts, cuts[1:]):
        raw.send(data[start:stop])
    answers = raw.read(5)
    assert sorted(answer["id"] for answer in answers) == list(range(5))
    raw.assert_open()
