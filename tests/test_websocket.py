"""The WebSocket endpoint (ws://, path /ws) and the operator HTTP routes on its port.

One text frame carries one JSON value; binary frames are refused with close
code 1003 (PROTOCOL.md section 1). Raw tests drive the ``websocket`` package
directly to see frames and close codes; the rest use the project's client.
"""
from __future__ import annotations

import http.client
import json

import pytest
import websocket

from conftest import RunningServer
from devastator.client import Client
from wire import assert_error
from devastator.protocol.errors import INVALID_REQUEST, PARSE_ERROR, TOO_LARGE

READ_TIMEOUT = 5.0
CLOSE_UNSUPPORTED_DATA = 1003


class RawWs:
    """A WebSocket connection that shows every frame, close frames included."""

    def __init__(self, running: RunningServer, timeout: float = READ_TIMEOUT):
        host, port = running.http_address
        self.ws = websocket.create_connection(f"ws://{host}:{port}/ws", timeout=timeout)

    def send(self, value) -> None:
        self.ws.send(json.dumps(value))

    def read(self):
        """The next text frame as a JSON value; fails on a close or any other frame."""
        opcode, data = self.ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_TEXT, (opcode, data)
        return json.loads(data)

    def call(self, method: str, params=None, id="1"):
        value = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            value["params"] = params
        self.send(value)
        return self.read()

    def wait_closed(self) -> int | None:
        """Read until the server closes; the close code, or None if it closed without a close frame.

        Fails if a data frame arrives first, or nothing happens in time.
        """
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                assert opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG), (opcode, data)
        except websocket.WebSocketTimeoutException:
            raise AssertionError("the server did not close the connection") from None
        except websocket.WebSocketProtocolException as error:
            # RFC 6455 5.5.1: a close payload starts with a valid 2-byte status code.
            raise AssertionError(f"the server sent a malformed close frame: {error}") from None
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None

    def assert_open(self) -> None:
        assert self.call("ping", id="still-open") == {"jsonrpc": "2.0", "id": "still-open", "result": "pong"}

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def raw_ws(running):
    connection = RawWs(running)
    yield connection
    connection.close()


def assert_serving(running: RunningServer) -> None:
    """A new WebSocket client and a TLS client are both still served."""
    browser = running.connect("serving-browser", ws=True)
    phone = running.connect("serving-phone")
    assert browser.ping() == "pong" and phone.ping() == "pong"
    sent = phone.send("serving-browser", {"still": "serving"})
    assert browser.receive(timeout=READ_TIMEOUT)["id"] == sent["id"]


# -- JSON-RPC over WebSocket -----------------------------------------------------------------


def test_ping_over_websocket(raw_ws):
    assert raw_ws.call("ping", id=1) == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    assert raw_ws.call("ping", id="s") == {"jsonrpc": "2.0", "id": "s", "result": "pong"}


def test_auth_jwt_over_websocket(running, raw_ws):
    answer = raw_ws.call("auth.jwt", {"token": running.token("bob", "browser")}, id="auth")
    assert answer == {
        "jsonrpc": "2.0",
        "id": "auth",
        "result": {"user": "bob", "device": "browser", "pending": 0},
    }


def test_message_from_tls_to_websocket_and_back(running):
    alice = running.connect("alice")  # TLS
    bob = running.connect("bob", ws=True, auto_ack=False)
    assert bob.ping() == "pong"

    sent = alice.send("bob", {"text": "hello browser"})
    received = bob.receive(timeout=READ_TIMEOUT)
    assert received["id"] == sent["id"] and received["ts"] == sent["ts"]
    assert received["from"] == "alice" and received["to"] == "bob"
    assert received["message"] == {"text": "hello browser"}
    bob.ack([received["id"]])

    reply = bob.send("alice", {"text": "hello phone"})
    back = alice.receive(timeout=READ_TIMEOUT)
    assert back["id"] == reply["id"] and back["from"] == "bob"
    assert back["message"] == {"text": "hello phone"}

    # The ACK reached the server before the reply was even sent: nothing is pending
    # for bob's browser when it connects again.
    assert bob.reconnect()["pending"] == 0
    assert bob.ping() == "pong"


def test_client_class_over_websocket_answers_echo(running):
    bob = running.connect("bob", ws=True)
    assert bob.call("msg.echo", {"message": [1, "two"]}) == "ACK"
    assert bob.echoes.get(timeout=READ_TIMEOUT) == {"message": [1, "two"]}


# -- refusals and errors ------------------------------------------------------------------------


def test_binary_frame_is_refused_with_1003(running, raw_ws):
    raw_ws.ws.send_binary(b'{"jsonrpc": "2.0", "method": "ping", "id": 1}')
    assert raw_ws.wait_closed() == CLOSE_UNSUPPORTED_DATA
    assert_serving(running)


def test_parse_error_then_closed(running, raw_ws):
    raw_ws.ws.send('{"jsonrpc": "2.0", "method": "foo", "params": "bar", "baz]')
    assert_error(raw_ws.read(), PARSE_ERROR, None)
    raw_ws.wait_closed()  # a close frame or a bare close, either way closed
    assert_serving(running)


def test_empty_batch_is_invalid_and_stays_open(running, raw_ws):
    raw_ws.ws.send("[]")
    assert_error(raw_ws.read(), INVALID_REQUEST, None)
    raw_ws.assert_open()


def test_invalid_request_keeps_id_and_stays_open(raw_ws):
    raw_ws.send({"jsonrpc": "2.0", "method": "ping", "params": "bar", "id": 8})
    assert_error(raw_ws.read(), INVALID_REQUEST, 8)
    raw_ws.send(42)
    assert_error(raw_ws.read(), INVALID_REQUEST, None)
    raw_ws.assert_open()


def test_text_message_over_max_frame_bytes_is_too_large_then_closed(servers):
    running = servers(max_frame_bytes=4096, max_message_bytes=2048)
    connection = RawWs(running)
    try:
        connection.ws.send('"' + "x" * 9998 + '"')
        assert_error(connection.read(), TOO_LARGE, None)
        connection.wait_closed()
    finally:
        connection.close()
    assert_serving(running)


def test_text_message_of_max_frame_bytes_is_accepted(servers):
    running = servers(max_frame_bytes=4096, max_message_bytes=2048)
    connection = RawWs(running)
    try:
        prefix = '{"jsonrpc":"2.0","method":"ping","id":1,"params":{"pad":"'
        suffix = '"}}'
        text = prefix + "x" * (4096 - len(prefix) - len(suffix)) + suffix
        assert len(text.encode()) == 4096
        connection.ws.send(text)
        assert connection.read() == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    finally:
        connection.close()


# -- the HTTP side of the port ----------------------------------------------------------------------


def _get(running: RunningServer, path: str, headers: dict | None = None):
    host, port = running.http_address
    conn = http.client.HTTPConnection(host, port, timeout=READ_TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def test_healthz(running):
    status, headers, body = _get(running, "/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}
    assert dict((k.lower(), v) for k, v in headers)["content-type"].startswith("application/json")


def test_ws_path_without_upgrade_is_426(running):
    status, _, _ = _get(running, "/ws")
    assert status == 426


def test_unknown_path_is_404(running):
    status, _, _ = _get(running, "/no/such/path")
    assert status == 404


# -- offline delivery -----------------------------------------------------------------------------------


def test_offline_messages_arrive_as_one_batch_after_auth(running):
    token = running.token("bob", "browser")  # the device exists: messages wait for it
    alice = running.connect("alice")
    sent = [alice.send("bob", {"n": n}) for n in range(3)]

    bob = RawWs(running)
    try:
        answer = bob.call("auth.jwt", {"token": token}, id="auth")
        assert answer == {
            "jsonrpc": "2.0",
            "id": "auth",
            "result": {"user": "bob", "device": "browser", "pending": 3},
        }
        batch = bob.read()
        assert isinstance(batch, list), batch
        assert [item["id"] for item in batch] == [s["id"] for s in sent]  # oldest first
        for n, (item, s) in enumerate(zip(batch, sent)):
            assert item["jsonrpc"] == "2.0" and item["method"] == "msg.recv"
            params = item["params"]
            assert params["id"] == item["id"] and params["ts"] == s["ts"]
            assert params["from"] == "alice" and params["to"] == "bob"
            assert params["message"] == {"n": n}
            assert params["expires"] > params["ts"]

        # One batch of ACKs answers them all; the ping's answer shows it was read.
        bob.send([{"jsonrpc": "2.0", "id": item["id"], "result": "ACK"} for item in batch])
        bob.assert_open()
    finally:
        bob.close()

    again = RawWs(running)
    try:
        answer = again.call("auth.jwt", {"token": token}, id="auth")
        assert answer["result"]["pending"] == 0
        again.assert_open()  # and no batch came before the ping's answer
    finally:
        again.close()



def test_wss_when_tls_is_turned_on(servers):
    running = servers(ws_tls=True)
    host, port = running.http_address
    browser = Client.connect_ws(f"wss://localhost:{port}/ws", ca=running.ca)
    try:
        assert browser.auth_jwt(running.token("browser"))["user"] == "browser"
        phone = running.connect("phone-user")
        sent = phone.send("browser", {"over": "wss"})
        assert browser.receive(timeout=READ_TIMEOUT)["id"] == sent["id"]
    finally:
        browser.close()
    with pytest.raises((ConnectionError, websocket.WebSocketException)):  # no plain ws:// on a TLS port
        websocket.create_connection(f"ws://{host}:{port}/ws", timeout=2).recv()


def test_an_operator_route_that_fails_is_503_without_a_traceback(running, monkeypatch, caplog):
    def failing():
        raise TimeoutError("the store did not answer")

    monkeypatch.setattr(running.server.operations, "debug_vars", failing)
    status, _, body = _get(running, "/debug/vars")
    assert status == 503 and b"the store did not answer" in body
    assert not [record for record in caplog.records if record.exc_info]
    assert _get(running, "/healthz")[0] == 200  # the port serves on
