"""Tests of the device actor: the JSON-RPC a connection reads and what it writes back."""
from __future__ import annotations

import queue
import threading

import orjson
import pytest

from devastator.actors import DeviceActor, DeviceLimits
from devastator.actors.messages import (
    Acked,
    Append,
    Authenticated,
    AuthFailed,
    ConnectionLost,
    Deliver,
    DeviceOffline,
    DeviceOnline,
    ConnectionQuery,
    Received,
    Register,
    Registered,
    Replaced,
    Revoked,
    SendResult,
    SendResults,
)
from devastator.identity import DeviceIdentity
from devastator.protocol.errors import (
    FORBIDDEN,
    INVALID_PARAMS,
    NOT_AUTHENTICATED,
    OVERLOADED,
    PARSE_ERROR,
    UNKNOWN_RECIPIENT,
    Forbidden,
    InvalidParams,
    Overloaded,
    UnknownRecipient,
)
from devastator.store import StoredMessage

from actor_fakes import Recorder

WAIT = 2.0


class FakeConnection:
    """The transport side: keeps every JSON value written, one by one."""

    remote = "198.51.100.7:40000"
    peer_identity = None
    unsent_bytes = 0

    def __init__(self):
        self.written: queue.Queue = queue.Queue()
        self.closed = threading.Event()

    def send(self, bodies):
        for body in bodies:
            self.written.put(body)

    def close(self, code=None, reason="", *, notify=True):
        self.close_code = code
        self.closed.set()

    def next(self):
        """The next JSON value written, decoded."""
        try:
            return orjson.loads(self.written.get(timeout=WAIT))
        except queue.Empty:
            pytest.fail(f"nothing written within {WAIT} s")

    def written_so_far(self) -> list:
        values = []
        while not self.written.empty():
            values.append(orjson.loads(self.written.get_nowait()))
        return values


class FakeAuthority:
    def verify(self, token: str) -> DeviceIdentity:
        if token == "good":
            return DeviceIdentity("alice", "phone", "reg-1")
        raise Forbidden("bad token")


class FakeRegistrar:
    """Sign-in: "google-ok" is carol; "provider-down" cannot be checked now."""

    def __init__(self):
        self.issued_for: list = []

    def sign_in(self, id_token: str) -> str:
        if id_token == "google-ok":
            return "google-carol"
        if id_token == "provider-down":
            raise Overloaded("identity provider key set unavailable, retry later")
        raise Forbidden("ID token signature invalid")

    def check_csr(self, csr_pem):
        if csr_pem is not None and csr_pem != "good csr":
            raise InvalidParams('"csr" is not a usable certificate signing request')
        return csr_pem

    def credentials(self, identity, csr) -> dict:
        self.issued_for.append((identity, csr))
        issued = {"token": f"jwt-for-{identity.device}"}
        if csr is not None:
            issued.update(cert="CERT PEM", ca="CA PEM")
        return issued

    def new_device_id(self) -> str:
        return "device-new"


class RecordingLog:
    def __init__(self):
        self.lines: list = []

    def warning(self, cause: str, message: str, *args) -> bool:
        self.lines.append((cause, message % args))
        return True


@pytest.fixture
def connection():
    return FakeConnection()


@pytest.fixture
def router():
    return Recorder("router")


@pytest.fixture
def store():
    return Recorder("store")


@pytest.fixture
def user():
    return Recorder("user")


@pytest.fixture
def registrar():
    return FakeRegistrar()


@pytest.fixture
def auth_log():
    return RecordingLog()


@pytest.fixture
def device(connection, router, store, registrar, auth_log):
    return DeviceActor.start(
        connection=connection, router=router.ref, store=store.ref, authority=FakeAuthority(),
        registrar=registrar, auth_log=auth_log, limits=DeviceLimits(),
    )


def request(method: str, params=None, id=1) -> dict:
    value = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        value["params"] = params
    return value


def send(to="bob", message=None, id=2, **extra) -> dict:
    return request("msg.send", {"to": to, "message": message or {"text": "hi"}, **extra}, id)


def receive(device, *values) -> None:
    """One read of the connection: a JSON value per frame."""
    device.tell(Received(tuple(orjson.dumps(value) for value in values)))


def result(id, value) -> dict:
    return {"jsonrpc": "2.0", "id": id, "result": value}


def authenticate(device, connection, router, user, *, pending=0) -> None:
    receive(device, request("auth.jwt", {"token": "good"}, id="auth"))
    online = router.next(DeviceOnline)
    device.tell(Authenticated("alice", "phone", user.ref, pending, online.request_key))
    assert connection.next() == result("auth", {"user": "alice", "device": "phone", "pending": pending})


def stored(n: int) -> StoredMessage:
    return StoredMessage(n, f"msg-{n:03d}", "bob", "alice", b'{"n":%d}' % n, 5_000 + n, 9_000_000 + n)


def recv(message: StoredMessage) -> dict:
    params = {
        "id": message.id, "from": message.sender, "to": message.recipient,
        "message": orjson.loads(message.message_json), "ts": message.ts, "expires": message.expires,
    }
    return {"jsonrpc": "2.0", "method": "msg.recv", "params": params, "id": message.id}


# -- before authentication ------------------------------------------------------------


def test_ping_is_answered_pong(device, connection):
    receive(device, request("ping", id=41))
    assert connection.next() == result(41, "pong")


def test_a_send_before_authentication_is_refused(device, connection, store):
    receive(device, send(id="s1"))
    reply = connection.next()
    assert reply["id"] == "s1" and reply["error"]["code"] == NOT_AUTHENTICATED
    device.ask(ConnectionQuery())
    assert store.drain() == []


def test_a_parse_error_is_answered_then_the_connection_closes(device, connection):
    device.tell(Received((b'{"jsonrpc": "2.0", "method": "ping", "id": 1',)))
    reply = connection.next()
    assert reply["id"] is None and reply["error"]["code"] == PARSE_ERROR
    assert connection.closed.wait(WAIT)


def test_a_parse_error_ends_the_read_it_is_in(device, connection):
    device.tell(Received((b"nope", orjson.dumps(request("ping")))))
    assert connection.next()["error"]["code"] == PARSE_ERROR
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []


# -- authentication -------------------------------------------------------------------


def test_a_good_token_brings_the_device_online_then_answers(device, connection, router, user):
    receive(device, request("auth.jwt", {"token": "good"}, id=1))
    online = router.next(DeviceOnline)
    assert (online.user, online.device, online.device_ref) == ("alice", "phone", device)
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []  # not before the user actor says so

    device.tell(Authenticated("alice", "phone", user.ref, 5, online.request_key))
    assert connection.next() == result(1, {"user": "alice", "device": "phone", "pending": 5})
    assert device.ask(ConnectionQuery())["user"] == "alice"


def test_a_good_token_names_its_registration_for_the_store_to_check(device, router):
    receive(device, request("auth.jwt", {"token": "good"}, id=1))
    online = router.next(DeviceOnline)
    assert online.registration == "reg-1"


def test_a_bad_token_is_forbidden_and_logged_with_the_remote_address(device, connection, router, auth_log):
    receive(device, request("auth.jwt", {"token": "forged"}, id=1))
    reply = connection.next()
    assert reply["id"] == 1 and reply["error"]["code"] == FORBIDDEN
    device.ask(ConnectionQuery())
    assert router.drain() == []
    assert auth_log.lines == [("auth.jwt: bad token", "auth.jwt refused for 198.51.100.7:40000: bad token")]


def test_auth_cert_without_a_certificate_is_forbidden(device, connection, router, auth_log):
    receive(device, request("auth.cert", id=1))
    assert connection.next()["error"]["code"] == FORBIDDEN
    assert auth_log.lines[0][0] == "auth.cert: no verified client certificate on this connection"


def test_auth_cert_brings_the_certificate_s_device_online(connection, router, store, registrar, auth_log):
    connection.peer_identity = DeviceIdentity("dave", "tablet", "reg-9")
    device = DeviceActor.start(
        connection=connection, router=router.ref, store=store.ref, authority=FakeAuthority(),
        registrar=registrar, auth_log=auth_log, limits=DeviceLimits(),
    )
    receive(device, request("auth.cert", id=1))
    online = router.next(DeviceOnline)
    assert (online.user, online.device, online.registration) == ("dave", "tablet", "reg-9")


# -- registration (auth.google) ----------------------------------------------------------


def test_google_sign_in_registers_then_answers_with_credentials(device, connection, router, store, user,
                                                                 registrar):
    receive(device, request("auth.google", {"token": "google-ok", "device": "pixel", "csr": "good csr"}, id=7))
    register = store.next(Register)
    assert (register.user, register.device, register.reply_to) == ("google-carol", "pixel", device)
    device.tell(Registered(register.request_key, "google-carol", "pixel", "reg-5"))
    online = router.next(DeviceOnline)
    assert (online.user, online.device, online.registration) == ("google-carol", "pixel", "reg-5")
    assert registrar.issued_for == [(DeviceIdentity("google-carol", "pixel", "reg-5"), "good csr")]
    device.tell(Authenticated("google-carol", "pixel", user.ref, 3, online.request_key))
    assert connection.next() == result(
        7, {"user": "google-carol", "device": "pixel", "token": "jwt-for-pixel", "cert": "CERT PEM", "ca": "CA PEM"}
    )
    assert device.ask(ConnectionQuery())["user"] == "google-carol"


def test_google_sign_in_without_device_or_csr_gets_a_new_device_and_a_token(device, connection, router,
                                                                           store, user):
    receive(device, request("auth.google", {"token": "google-ok"}, id=7))
    register = store.next(Register)
    assert register.device == "device-new"
    device.tell(Registered(register.request_key, "google-carol", "device-new", "reg-6"))
    online = router.next(DeviceOnline)
    device.tell(Authenticated("google-carol", "device-new", user.ref, 0, online.request_key))
    assert connection.next() == result(7, {"user": "google-carol", "device": "device-new", "token": "jwt-for-device-new"})


def test_a_refused_id_token_registers_nothing(device, connection, store, auth_log):
    receive(device, request("auth.google", {"token": "forged"}, id=7))
    assert connection.next()["error"]["code"] == FORBIDDEN
    device.ask(ConnectionQuery())
    assert store.drain() == []
    assert auth_log.lines[0][0] == "auth.google: ID token signature invalid"


def test_a_bad_csr_registers_nothing(device, connection, store):
    receive(device, request("auth.google", {"token": "google-ok", "csr": "junk"}, id=7))
    assert connection.next()["error"]["code"] == INVALID_PARAMS
    device.ask(ConnectionQuery())
    assert store.drain() == []


def test_an_unreachable_provider_asks_to_retry_later(device, connection, store):
    receive(device, request("auth.google", {"token": "provider-down"}, id=7))
    assert connection.next()["error"]["code"] == OVERLOADED


def test_requests_behind_a_registration_wait_for_it(device, connection, router, store, user):
    receive(device, request("auth.google", {"token": "google-ok", "device": "pixel"}, id=7), send(id="s1"))
    register = store.next(Register)
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []
    device.tell(Registered(register.request_key, "google-carol", "pixel", "reg-5"))
    online = router.next(DeviceOnline)
    device.tell(Authenticated("google-carol", "pixel", user.ref, 0, online.request_key))
    assert connection.next()["id"] == 7
    assert store.next(Append).sender == "google-carol"


# -- revocation ---------------------------------------------------------------------------


def test_a_revoked_device_s_connection_closes(device, connection, router, user):
    authenticate(device, connection, router, user)
    device.tell(Revoked())
    assert connection.closed.wait(WAIT)


def test_a_failed_attachment_is_answered_with_its_error(device, connection, router):
    receive(device, request("auth.jwt", {"token": "good"}, id=1))
    online = router.next(DeviceOnline)
    device.tell(AuthFailed(online.request_key, Forbidden("user 'alice' does not exist")))

    reply = connection.next()
    assert reply["id"] == 1 and reply["error"]["code"] == FORBIDDEN
    receive(device, send(id=2))
    assert connection.next()["error"]["code"] == NOT_AUTHENTICATED


def test_requests_read_while_authenticating_are_answered_after_it_in_order(
    device, connection, router, store, user
):
    receive(device, request("auth.jwt", {"token": "good"}, id="auth"))
    receive(device, request("ping", id="p1"))
    receive(device, send(id="s1"), request("ping", id="p2"))
    online = router.next(DeviceOnline)
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []
    assert store.drain() == []

    device.tell(Authenticated("alice", "phone", user.ref, 0, online.request_key))
    assert connection.next() == result("auth", {"user": "alice", "device": "phone", "pending": 0})
    assert connection.next() == result("p1", "pong")
    append = store.next(Append)
    assert append.sender == "alice"
    assert connection.next() == result("p2", "pong")

    device.tell(SendResults((SendResult(append.request_key, id="m1", ts=7),)))
    assert connection.next() == result("s1", {"id": "m1", "ts": 7})


def test_requests_read_with_the_auth_in_one_read_wait_for_it(device, connection, router, store, user):
    """Several frames arrive in one TCP read, so one Received may hold the auth.jwt
    and the requests the client pipelined behind it."""
    receive(device, request("auth.jwt", {"token": "good"}, id="auth"), send(id="s1"), request("ping", id="p1"))
    online = router.next(DeviceOnline)
    device.ask(ConnectionQuery())
    held = connection.written_so_far()

    device.tell(Authenticated("alice", "phone", user.ref, 0, online.request_key))
    device.ask(ConnectionQuery())
    written = held + connection.written_so_far()
    assert written[0] == result("auth", {"user": "alice", "device": "phone", "pending": 0})
    assert written[1:] == [result("p1", "pong")]
    append = store.next(Append)
    assert (append.sender, append.recipients) == ("alice", ("bob",))


# -- sending ----------------------------------------------------------------------------


def test_a_send_is_appended_and_answered_after_the_commit(device, connection, router, store, user):
    authenticate(device, connection, router, user)
    receive(device, send(to=["bob", "carol"], message={"text": "hi"}, id=2, cid="c-9", ttl=60))

    append = store.next(Append)
    assert (append.sender, append.recipients, append.message_json) == ("alice", ("bob", "carol"), b'{"text":"hi"}')
    assert (append.cid, append.ttl) == ("c-9", 60)
    assert (append.reply_to, append.notify) == (device, router.ref)
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []

    device.tell(SendResults((SendResult(append.request_key, id="m-1", ts=1234),)))
    assert connection.next() == result(2, {"id": "m-1", "ts": 1234})


def test_a_refused_send_is_answered_with_its_error(device, connection, router, store, user):
    authenticate(device, connection, router, user)
    receive(device, send(to="mallory", id=3))
    append = store.next(Append)

    error = UnknownRecipient(data={"unknown": ["mallory"]})
    device.tell(SendResults((SendResult(append.request_key, error=error),)))
    reply = connection.next()
    assert reply["id"] == 3
    assert reply["error"]["code"] == UNKNOWN_RECIPIENT and reply["error"]["data"] == {"unknown": ["mallory"]}


def test_a_batch_is_answered_as_one_array_once_every_answer_is_known(device, connection, router, store, user):
    authenticate(device, connection, router, user)
    receive(device, [request("ping", id=1), send(id=2)])
    append = store.next(Append)
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []

    device.tell(SendResults((SendResult(append.request_key, id="m-1", ts=99),)))
    reply = connection.next()
    assert isinstance(reply, list)
    assert sorted(reply, key=lambda r: r["id"]) == [result(1, "pong"), result(2, {"id": "m-1", "ts": 99})]
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []


# -- delivering -------------------------------------------------------------------------


def test_acks_from_the_client_are_told_to_the_user_actor(device, connection, router, user):
    authenticate(device, connection, router, user)
    receive(device, result("msg-001", "ACK"))
    assert user.next(Acked) == Acked("phone", device, ("msg-001",))

    receive(device, [result("msg-002", "ACK"), result("msg-003", "ACK")])
    assert user.next(Acked) == Acked("phone", device, ("msg-002", "msg-003"))
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []


def test_a_backlog_goes_as_batches_of_at_most_100(device, connection, router, user):
    authenticate(device, connection, router, user, pending=250)
    messages = tuple(stored(n) for n in range(1, 251))
    device.tell(Deliver(messages, as_batch=True))

    batches = [connection.next() for _ in range(3)]
    assert [len(batch) for batch in batches] == [100, 100, 50]
    sent = [item for batch in batches for item in batch]
    assert sent == [recv(m) for m in messages]
    assert all(item["id"] == item["params"]["id"] for item in sent)
    device.ask(ConnectionQuery())
    assert connection.written_so_far() == []


def test_live_messages_go_one_request_each(device, connection, router, user):
    authenticate(device, connection, router, user)
    device.tell(Deliver((stored(1), stored(2)), as_batch=False))
    assert connection.next() == recv(stored(1))
    assert connection.next() == recv(stored(2))


# -- ending ---------------------------------------------------------------------------


def test_a_replaced_connection_is_closed(device, connection, router, user):
    authenticate(device, connection, router, user)
    device.tell(Replaced())
    assert connection.closed.wait(WAIT)


@pytest.mark.parametrize("stage", ["authenticated", "authenticating", "refused"])
def test_every_device_online_is_balanced_by_a_device_offline(stage, device, connection, router, user):
    """The router counts a user's devices by DeviceOnline and DeviceOffline; one
    never balanced keeps that user actor alive and holding a dead device."""
    receive(device, request("auth.jwt", {"token": "good"}, id=1))
    online = router.next(DeviceOnline)
    if stage == "authenticated":
        device.tell(Authenticated("alice", "phone", user.ref, 0, online.request_key))
    elif stage == "refused":
        device.tell(AuthFailed(online.request_key, Forbidden("user 'alice' does not exist")))

    device.tell(ConnectionLost("reset by peer"))
    assert device.actor_stopped.wait(WAIT)
    assert router.drain() == [DeviceOffline("alice", "phone", device)]
