"""The connection session without sockets: bytes in, events and bytes out, every transition and error code."""
from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from devastator.protocol import ErrorResponse, Notification, Request
from devastator.protocol.errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_AUTHENTICATED,
    OVERLOADED,
    PARSE_ERROR,
    TOO_LARGE,
    Forbidden,
    InternalError,
    Overloaded,
    RpcError,
)
from devastator.protocol.session import (
    CLOSE_INVALID_DATA,
    CLOSE_OVERLOADED,
    REFUSALS,
    TRANSITIONS,
    Acks,
    Answer,
    Call,
    ClientSession,
    Close,
    CloseNotice,
    Kind,
    ServerSession,
    SessionConfig,
    SessionError,
    State,
)


def body(method=None, params=None, id=None, **members) -> bytes:
    value = {"jsonrpc": "2.0", **members}
    if method is not None:
        value["method"] = method
        if params is not None:
            value["params"] = params
    if id is not None:
        value["id"] = id
    return orjson.dumps(value)


def batch(*bodies: bytes) -> bytes:
    return b"[" + b",".join(bodies) + b"]"


def events(session: ServerSession) -> list:
    taken = []
    while (event := session.next_event()) is not None:
        taken.append(event)
    return taken


def written(session: ServerSession) -> list:
    return [orjson.loads(value) for value in session.data_to_send()]


def result(id, value) -> dict:
    return {"jsonrpc": "2.0", "id": id, "result": value}


def error_code(value: dict) -> int:
    return value["error"]["code"]


def only_call(session: ServerSession, *bodies: bytes) -> Call:
    session.receive(bodies)
    taken = events(session)
    assert len(taken) == 1 and isinstance(taken[0], Call), taken
    return taken[0]


def authenticating(session: ServerSession) -> tuple[ServerSession, int]:
    call = only_call(session, body("auth.jwt", {"token": "t"}, id="auth"))
    return session, session.defer(call)


def authenticated(session: ServerSession | None = None) -> ServerSession:
    session, key = authenticating(session or ServerSession())
    session.auth_succeeded(key, {"user": "alice"})
    assert written(session) == [result("auth", {"user": "alice"})]
    return session


# -- every transition of the table ---------------------------------------------------------


def new_ping():
    session = ServerSession()
    call = only_call(session, body("ping", id=1))
    assert call.kind is Kind.PING
    session.answer(call, "pong")
    assert session.data_to_send() == [b'{"jsonrpc":"2.0","id":1,"result":"pong"}']
    return session.state


def new_auth():
    session = ServerSession()
    call = only_call(session, body("auth.jwt", {"token": "t"}, id=1))
    assert (call.kind, call.method, call.params) == (Kind.AUTH, "auth.jwt", {"token": "t"})
    return session.state


def new_close():
    session = ServerSession()
    session.close()
    return session.state


def authenticating_ping():
    session = ServerSession()
    session.receive([batch(body("auth.jwt", {"token": "t"}, id=1), body("ping", id=2))])
    auth, ping = events(session)
    state = session.state  # after the ping, in the auth's batch
    assert ping.kind is Kind.PING
    session.answer(ping, "pong")
    session.auth_succeeded(session.defer(auth), "ok")
    assert written(session) == [[result(2, "pong"), result(1, "ok")]]
    return state


def authenticating_succeeded():
    session, key = authenticating(ServerSession())
    session.auth_succeeded(key, "ok")
    return session.state


def authenticating_failed():
    session, key = authenticating(ServerSession())
    session.auth_failed(key, Forbidden("bad token"))
    assert error_code(written(session)[0]) == Forbidden.code
    return session.state


def authenticating_close():
    session, _ = authenticating(ServerSession())
    session.close()
    return session.state


def authenticated_ping():
    session = authenticated()
    call = only_call(session, body("ping", id=3))
    assert call.kind is Kind.PING
    return session.state


def authenticated_call():
    session = authenticated()
    call = only_call(session, body("msg.send", {"to": "bob"}, id=3))
    assert (call.kind, call.method, call.id, call.notification) == (Kind.CALL, "msg.send", 3, False)
    return session.state


def authenticated_ack():
    session = authenticated()
    session.receive([body(id="m1", result="ACK"), batch(body(id="m2", result="ACK"), body(id="m3", result="no"))])
    taken = events(session)
    assert [type(event) for event in taken] == [Acks]
    assert taken[0].ids == ("m1", "m2")  # one read, one Acks
    return session.state


def authenticated_client_error():
    session = authenticated()
    session.receive([body(id="m1", error={"code": -32000, "message": "full"})])
    (event,) = events(session)
    assert event == ErrorResponse("m1", -32000, "full")
    return session.state


def authenticated_close():
    session = authenticated()
    session.close()
    return session.state


def closed_close():
    session = ServerSession()
    session.close()
    session.close()
    return session.state


DRIVERS = {
    (State.NEW, Kind.PING): new_ping,
    (State.NEW, Kind.AUTH): new_auth,
    (State.NEW, Kind.CLOSE): new_close,
    (State.AUTHENTICATING, Kind.PING): authenticating_ping,
    (State.AUTHENTICATING, Kind.AUTH_SUCCEEDED): authenticating_succeeded,
    (State.AUTHENTICATING, Kind.AUTH_FAILED): authenticating_failed,
    (State.AUTHENTICATING, Kind.CLOSE): authenticating_close,
    (State.AUTHENTICATED, Kind.PING): authenticated_ping,
    (State.AUTHENTICATED, Kind.CALL): authenticated_call,
    (State.AUTHENTICATED, Kind.ACK): authenticated_ack,
    (State.AUTHENTICATED, Kind.CLIENT_ERROR): authenticated_client_error,
    (State.AUTHENTICATED, Kind.CLOSE): authenticated_close,
    (State.CLOSED, Kind.CLOSE): closed_close,
}


def test_every_transition_of_the_table_is_driven_here():
    assert set(DRIVERS) == set(TRANSITIONS)


@pytest.mark.parametrize("pair", list(TRANSITIONS), ids=lambda pair: f"{pair[0].value}-{pair[1].value}")
def test_a_transition_leads_where_the_table_says(pair):
    assert DRIVERS[pair]() is TRANSITIONS[pair]  # each driver returns the state the pair led to


# -- what each state refuses --------------------------------------------------------------------


def test_every_refusal_is_driven_here():
    assert set(REFUSALS) == {
        (State.NEW, Kind.CALL), (State.AUTHENTICATING, Kind.CALL),
        (State.AUTHENTICATING, Kind.AUTH), (State.AUTHENTICATED, Kind.AUTH),
    }


def test_a_call_before_auth_is_refused_not_authenticated_known_or_not():
    session = ServerSession()
    session.receive([body("msg.send", {"to": "bob"}, id=1), body("no.such", id=2), body("msg.send")])
    assert events(session) == []
    assert session.data_to_send() == [
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32001,'
        b'"message":"msg.send needs an authenticated connection (auth.jwt or auth.cert)"}}',
        b'{"jsonrpc":"2.0","id":2,"error":{"code":-32001,'
        b'"message":"no.such needs an authenticated connection (auth.jwt or auth.cert)"}}',
    ]  # and the notification gets no answer
    assert session.state is State.NEW


def test_a_call_in_the_auth_s_batch_is_refused_while_it_is_under_way():
    session = ServerSession()
    session.receive([batch(body("auth.jwt", {"token": "t"}, id=1), body("msg.send", id=2),
                           body("auth.cert", id=3))])
    (auth,) = events(session)
    session.auth_succeeded(session.defer(auth), "ok")
    answers = written(session)[0]
    assert [(answer["id"], answer.get("error", {}).get("code")) for answer in answers] == [
        (2, NOT_AUTHENTICATED), (3, INVALID_REQUEST), (1, None)]


def test_an_auth_on_an_authenticated_connection_is_an_invalid_request():
    session = authenticated()
    session.receive([body("auth.jwt", {"token": "t"}, id=9)])
    assert events(session) == []
    assert session.data_to_send() == [
        b'{"jsonrpc":"2.0","id":9,"error":{"code":-32600,"message":"this connection is already authenticated"}}']
    assert session.state is State.AUTHENTICATED


@pytest.mark.parametrize("make", [ServerSession, authenticated])
def test_an_unknown_auth_method_is_not_found_in_any_state(make):
    session = make()
    state = session.state
    session.receive([body("auth.password", id=4)])
    assert events(session) == []
    assert session.data_to_send() == [
        b'{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"no method \'auth.password\'"}}']
    assert session.state is state


def test_acks_and_client_errors_before_auth_are_dropped():
    session = ServerSession()
    session.receive([body(id="m1", result="ACK"), body(id="m2", error={"code": 1, "message": "x"})])
    assert events(session) == [] and session.data_to_send() == []


@pytest.mark.parametrize("outcome", ["auth_succeeded", "auth_failed"])
def test_an_auth_outcome_without_an_auth_under_way_is_a_bug(outcome):
    with pytest.raises(SessionError):
        getattr(ServerSession(), outcome)(1, Forbidden("x") if outcome == "auth_failed" else "ok")
    with pytest.raises(SessionError):
        getattr(authenticated(), outcome)(1, Forbidden("x") if outcome == "auth_failed" else "ok")


def test_outcomes_after_the_close_are_dropped():
    session, key = authenticating(ServerSession())
    session.close()
    session.auth_succeeded(key, "ok")
    session.notify("msg.signal", {})
    session.send_requests([Request("msg.recv", {}, "m1")], as_batch=False)
    assert session.state is State.CLOSED and session.data_to_send() == []
    session.receive([body("ping", id=1)])
    assert events(session) == []


def test_a_refused_auth_goes_back_to_new_and_what_follows_is_refused():
    session = ServerSession()
    session.receive([body("auth.jwt", {"token": "bad"}, id=1), body("msg.send", id=2)])
    auth = session.next_event()
    assert session.next_event() is None  # the send waits for the auth's outcome
    session.refuse(auth, Forbidden("bad token"))
    assert session.state is State.NEW
    assert events(session) == []
    assert [(answer["id"], error_code(answer)) for answer in written(session)] == [
        (1, Forbidden.code), (2, NOT_AUTHENTICATED)]


# -- held behind the auth ------------------------------------------------------------------------


def test_reads_behind_an_auth_are_released_in_order_after_it():
    session = ServerSession()
    session.receive([body("auth.jwt", {"token": "t"}, id="auth"), body("msg.send", id="s0")])
    auth = session.next_event()
    key = session.defer(auth)
    session.receive([body("ping", id="p1")])
    session.receive([body("msg.send", id="s1"), body("ping", id="p2")])
    assert events(session) == [] and session.data_to_send() == []
    session.auth_succeeded(key, {"user": "alice"})
    assert [(event.method, event.id) for event in events(session)] == [
        ("msg.send", "s0"), ("ping", "p1"), ("msg.send", "s1"), ("ping", "p2")]
    assert written(session) == [result("auth", {"user": "alice"})]


def test_too_many_reads_behind_an_auth_close_the_connection_overloaded():
    session, _ = authenticating(ServerSession(SessionConfig(max_pending_requests=2)))
    session.receive([body("ping", id=1)])
    session.receive([body("ping", id=2)])
    assert events(session) == []
    session.receive([body("ping", id=3)])
    assert events(session) == [Close(CLOSE_OVERLOADED, "too many requests while authenticating", True)]
    assert session.data_to_send() == [
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32003,"message":"too many requests while authenticating",'
        b'"data":{"retry_after_ms":100}}}']
    assert session.state is State.CLOSED


def test_a_violation_read_behind_the_auth_waits_with_its_read():
    violation = SimpleNamespace(code=1009, reason="frame too large", error=None)
    session = ServerSession()
    session.receive([body("auth.jwt", {"token": "t"}, id=1), body("ping", id=2)], violation)
    auth = session.next_event()
    assert session.next_event() is None
    session.auth_succeeded(session.defer(auth), "ok")
    ping = session.next_event()
    session.answer(ping, "pong")
    assert session.next_event() == Close(1009, "frame too large", False)
    assert written(session) == [result(1, "ok"), result(2, "pong")]


# -- error codes the session answers -------------------------------------------------------------------


def test_a_body_that_is_not_json_is_a_parse_error_and_closes_without_conn_close():
    session = authenticated()
    session.receive([b"{nope", body("ping", id=1)])
    (close,) = events(session)
    assert (close.code, close.notify) == (CLOSE_INVALID_DATA, False)
    (answer,) = written(session)
    assert (answer["id"], error_code(answer)) == (None, PARSE_ERROR)
    assert session.state is State.CLOSED


@pytest.mark.parametrize("value, code", [
    (b"[]", INVALID_REQUEST),
    (b"3", INVALID_REQUEST),
    (b'{"jsonrpc":"1.0","method":"ping","id":7}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":7}', INVALID_REQUEST),
])
def test_a_value_that_is_not_json_rpc_is_an_invalid_request_and_the_session_goes_on(value, code):
    session = ServerSession()
    session.receive([value, body("ping", id=1)])
    (ping,) = events(session)
    assert ping.id == 1 and error_code(written(session)[0]) == code


def test_invalid_batch_members_are_answered_in_the_batch():
    session = ServerSession()
    session.receive([batch(b"1", b'{"jsonrpc":"2.0","method":5,"id":"x"}', body("ping", id="p"))])
    (ping,) = events(session)
    session.answer(ping, "pong")
    answers = written(session)[0]
    assert [(answer["id"], answer.get("error", {}).get("code")) for answer in answers] == [
        (None, INVALID_REQUEST), ("x", INVALID_REQUEST), ("p", None)]


def test_a_batch_of_more_calls_than_allowed_is_too_large():
    session = ServerSession(SessionConfig(max_batch=2))
    session.receive([batch(*(body("ping", id=n) for n in range(3)))])
    assert events(session) == []
    assert error_code(written(session)[0]) == TOO_LARGE


def test_the_pending_bound_refuses_bounded_calls_overloaded_until_one_is_answered():
    session = authenticated(ServerSession(SessionConfig(max_pending_requests=1)))
    first = only_call(session, body("msg.send", id=1))
    key = session.defer(first, bounded=True)
    second = only_call(session, body("msg.send", id=2))
    with pytest.raises(Overloaded) as refused:
        session.defer(second, bounded=True)
    assert refused.value.code == OVERLOADED and refused.value.retry_after_ms == 100
    session.defer(second)  # unbounded calls are not counted
    session.resolve(key, result={"id": "m1"})
    assert session.pending_bounded == 0
    session.defer(only_call(session, body("msg.send", id=3)), bounded=True)


def test_a_violation_is_answered_after_the_read_then_closes():
    violation = SimpleNamespace(code=1002, reason="bad frame", error=RpcError("bad frame"))
    session = authenticated()
    session.receive([body("ping", id=1), body(id="m1", result="ACK")], violation)
    ping = session.next_event()
    session.answer(ping, "pong")
    assert session.next_event().ids == ("m1",)
    assert session.next_event() == Close(1002, "bad frame", False)
    assert [value.get("id") for value in written(session)] == [1, None]


def test_errors_and_requests_are_counted():
    codes, methods = [], []
    session = ServerSession(on_request=methods.append, on_error=codes.append)
    session.receive([body("msg.send", id=1), b"[]", body("ping")])
    events(session)
    assert methods == ["msg.send", "ping"] and codes == [NOT_AUTHENTICATED, INVALID_REQUEST]


def test_a_refused_call_is_answered_with_its_error_and_a_notification_with_nothing():
    session = authenticated()
    session.receive([body("msg.send", id=1), body("msg.send")])
    request, notification = events(session)
    session.refuse(request, InternalError())
    session.refuse(notification, InternalError())
    assert [error_code(answer) for answer in written(session)] == [INTERNAL_ERROR]


# -- batches -----------------------------------------------------------------------------------------


def test_a_batch_is_answered_once_every_call_in_it_is_answered():
    session = authenticated()
    session.receive([batch(body("msg.send", id=1), body("ping", id=2), body("msg.send"),
                           body("msg.echo", id=3))])
    send, ping, notified, echo = events(session)
    key = session.defer(send, bounded=True)
    session.answer(ping, "pong")
    session.defer(notified)
    session.answer(echo, "ACK")
    session.echo(echo, b'{"x":1}')
    assert session.data_to_send() == []
    session.resolve(key, result={"id": "m1", "ts": 5})
    assert written(session) == [
        [result(2, "pong"), result(3, "ACK"), result(1, {"id": "m1", "ts": 5})],  # as they are known
        {"jsonrpc": "2.0", "id": "echo-1", "method": "msg.echo", "params": {"message": {"x": 1}}},
    ]


def test_a_batch_of_notifications_gets_no_answer():
    session = authenticated()
    session.receive([batch(body("ping"), body("msg.send"))])
    ping, send = events(session)
    session.answer(ping, "pong")
    session.resolve(session.defer(send), result="x")
    assert session.data_to_send() == []


def test_an_echo_outside_a_batch_follows_its_answer():
    session = authenticated()
    echo = only_call(session, body("msg.echo", {"message": 1}, id=1))
    session.answer(echo, "ACK")
    session.echo(echo, b"1")
    session.echo(echo, b"2")
    assert session.data_to_send() == [
        b'{"jsonrpc":"2.0","id":1,"result":"ACK"}',
        b'{"jsonrpc":"2.0","id":"echo-1","method":"msg.echo","params":{"message":1}}',
        b'{"jsonrpc":"2.0","id":"echo-2","method":"msg.echo","params":{"message":2}}',
    ]


def test_acks_of_one_read_are_told_once_at_its_end():
    session = authenticated()
    session.receive([body(id="a", result="ACK"), body("ping", id=1), batch(body(id="b", result="ACK"))])
    ping = session.next_event()
    assert ping.kind is Kind.PING
    assert session.next_event().ids == ("a", "b")


# -- the server's own requests -------------------------------------------------------------------------


def test_deliveries_go_one_by_one_or_as_batches_within_the_frame_limit():
    session = authenticated(ServerSession(SessionConfig(max_frame_bytes=250)))
    requests = [Request("msg.recv", {"id": f"m{n}", "message": "x" * 40}, f"m{n}") for n in range(4)]
    session.send_requests(requests[:1], as_batch=False)
    session.send_requests(requests, as_batch=True)
    single, *batches = written(session)
    assert single["id"] == "m0"
    assert [[value["id"] for value in chunk] for chunk in batches] == [["m0", "m1"], ["m2", "m3"]]


def test_a_notification_to_the_client():
    session = authenticated()
    session.notify("msg.signal", {"from": "bob"})
    assert session.data_to_send() == [b'{"jsonrpc":"2.0","method":"msg.signal","params":{"from":"bob"}}']


# -- the open (admin) variant -----------------------------------------------------------------------------


def open_session() -> ServerSession:
    return ServerSession(SessionConfig(auth_methods=None, batches=False, no_batches_message="no batches here",
                                       close_on_parse_error=None))


def test_an_open_session_starts_authenticated_and_passes_every_method_on():
    session = open_session()
    assert session.state is State.AUTHENTICATED
    session.receive([body("stats", id=1), body("auth.jwt", id=2), body("ping", id=3)])
    assert [(event.kind, event.method) for event in events(session)] == [
        (Kind.CALL, "stats"), (Kind.CALL, "auth.jwt"), (Kind.PING, "ping")]


def test_an_open_session_may_refuse_batches_and_close_a_parse_error_without_a_code():
    session = open_session()
    session.receive([batch(body("ping", id=1)), b"nope"])
    assert events(session) == [Close(None, "Parse error", False)]
    refused, unparsed = session.data_to_send()
    assert refused == b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"no batches here"}}'
    assert unparsed.startswith(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error","data":')


# -- the client half ---------------------------------------------------------------------------------------


def test_a_client_matches_answers_to_its_requests_also_in_batches():
    client = ClientSession()
    first, sent = client.request("ping", None, token="a")
    assert sent == b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    second, _ = client.request("msg.send", {"to": "bob"}, token="b")
    reply = batch(body(id=second, error={"code": -32005, "message": "no bob"}), body(id=first, result="pong"),
                  body(id=99, result="late"))
    answers, as_batch = client.receive(reply)
    assert as_batch
    assert [(answer.token, answer.result) for answer in answers] == [("b", None), ("a", "pong")]
    assert answers[0].error.code == -32005
    assert client.receive(body(id=first, result="again")) == ([], False)  # answered once


def test_a_client_passes_server_requests_and_notifications_on_and_answers_them():
    client = ClientSession()
    events_, as_batch = client.receive(batch(body("msg.recv", {"id": "m1"}, id="m1"), body("odd", id=5),
                                             body("msg.signal", {"from": "bob"})))
    recv, odd, signal = events_
    assert (recv, signal) == (Request("msg.recv", {"id": "m1"}, "m1"), Notification("msg.signal", {"from": "bob"}))
    assert client.replies([client.ack(recv), client.unknown(odd)], as_batch=as_batch) == (
        b'[{"jsonrpc":"2.0","id":"m1","result":"ACK"},'
        b'{"jsonrpc":"2.0","id":5,"error":{"code":-32601,"message":"Method not found"}}]')
    assert client.replies([], as_batch=True) is None
    assert client.replies([client.ack(recv)], as_batch=False) == b'{"jsonrpc":"2.0","id":"m1","result":"ACK"}'
    assert client.acks(["m1", "m2"]) == (
        b'[{"jsonrpc":"2.0","id":"m1","result":"ACK"},{"jsonrpc":"2.0","id":"m2","result":"ACK"}]')


def test_a_client_recognises_conn_close():
    client = ClientSession()
    events_, _ = client.receive(body("conn.close", {"code": 4001, "reason": "replaced"}))
    assert events_ == [CloseNotice(4001, "replaced")]


def test_a_client_forgets_what_it_gave_up_on_and_abandons_the_rest():
    client = ClientSession()
    given_up, _ = client.request("ping", token="x")
    client.request("ping", token="y")
    client.forget(given_up)
    assert client.receive(body(id=given_up, result="pong")) == ([], False)
    assert client.abandon() == ["y"]
    assert client.abandon() == []


def test_a_client_answer_carries_its_id():
    client = ClientSession()
    request_id, _ = client.request("ping", token=None)
    (answer,), _ = client.receive(body(id=request_id, result="pong"))
    assert isinstance(answer, Answer) and answer.id == request_id and answer.token is None


def test_a_violation_read_alone_behind_the_auth_waits_for_its_outcome():
    violation = SimpleNamespace(code=1009, reason="frame too large", error=None)
    session, key = authenticating(ServerSession())
    session.receive([], violation)
    assert session.next_event() is None
    session.auth_succeeded(key, "ok")
    assert session.next_event() == Close(1009, "frame too large", False)
    assert written(session) == [result("auth", "ok")]


def test_a_violation_after_the_auth_s_own_read_is_not_held():
    violation = SimpleNamespace(code=1009, reason="frame too large", error=None)
    session = ServerSession()
    session.receive([body("auth.jwt", {"token": "t"}, id=1)], violation)
    assert isinstance(session.next_event(), Call)
    assert session.next_event() == Close(1009, "frame too large", False)
