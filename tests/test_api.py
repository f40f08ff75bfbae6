"""The server API (PROTOCOL.md 8) over real HTTP on a real server, and its sans-IO parts without sockets."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event
import h11
import jwt
import orjson
import pykka
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devastator.actors.api import ApiActor
from devastator.actors.messages import ApiCall, ApiWaitingQuery, Append, SendResult, SendResults
from devastator.admission import AdmissionControl
from devastator.api_keys import ApiKeyFile, create_api_key, hash_key, load_api_keys
from devastator.protocol import Limits
from devastator.protocol import api
from devastator.protocol.api import ApiSend
from devastator.protocol.errors import InvalidParams, InvalidRequest, ParseError, TooLarge, UnknownRecipient
from devastator.protocol.methods import parse_send
from wire import RawTls

ROOT = Path(__file__).resolve().parent.parent
DEVASTATOR = [sys.executable, str(ROOT / "bin" / "devastator")]
WAIT = 5.0


# -- a bare HTTP/1.1 client: h11 on a socket, so that every byte sent is the test's own ---------


class Http:
    def __init__(self, running, timeout: float = WAIT):
        self.sock = socket.create_connection(running.http_address, timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)
        self.host = "%s:%d" % running.http_address

    def request(self, method: str, path: str, body: bytes | None = None, *, key: str | None = None,
                headers=(), content_type: str | None = "application/json"):
        """Send one request; returns (status, headers dict, body bytes)."""
        head = [("Host", self.host)]
        if key is not None:
            head.append(("Authorization", f"Bearer {key}"))
        if body is not None:
            if content_type is not None:
                head.append(("Content-Type", content_type))
            head.append(("Content-Length", str(len(body))))
        head += list(headers)
        data = self.conn.send(h11.Request(method=method, target=path, headers=head))
        if body is not None:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(data)
        return self.response()

    def response(self):
        response, parts = None, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection before answering")
        headers = {name.decode(): value.decode() for name, value in response.headers}
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return response.status_code, headers, b"".join(parts)

    def json(self, method: str, path: str, value=None, **kwargs):
        body = None if value is None else orjson.dumps(value)
        status, headers, data = self.request(method, path, body, **kwargs)
        return status, headers, (orjson.loads(data) if data else None)

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_raw_response(self):
        """The next answer, parsed fresh: after raw bytes the client's own h11 is not in step."""
        self.conn = h11.Connection(h11.CLIENT)
        self.conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        self.conn.send(h11.EndOfMessage())
        return self.response()

    def assert_closed(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not data:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def key(running) -> str:
    created, _ = create_api_key(running.settings.data_dir, "backend")
    return created


@pytest.fixture
def http(running):
    client = Http(running)
    yield client
    client.close()


def assert_error(answer, status: int, code: int) -> dict:
    got_status, headers, body = answer
    if isinstance(body, bytes):
        body = orjson.loads(body)
    assert got_status == status, answer
    assert headers["content-type"] == "application/json", headers
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    return headers


def send(http, key, **body):
    return http.json("POST", "/api/v1/send", body, key=key)


# -- the routes -----------------------------------------------------------------------------------


def test_send_stores_once_per_cid_and_the_connected_recipient_gets_it_once(running, http, key):
    bob = running.connect("bob", "phone", dedupe=False)
    first = send(http, key, **{"from": "shop", "to": "bob", "message": {"order": 1}, "cid": "order-1"})
    assert first[0] == 200, first
    assert set(first[2]) == {"id", "ts"}
    retried = send(http, key, **{"from": "shop", "to": "bob", "message": {"order": 1}, "cid": "order-1"})
    assert retried[2] == first[2]
    later = send(http, key, **{"from": "shop", "to": "bob", "message": {"order": 2}})
    assert later[0] == 200
    received = bob.receive(timeout=WAIT)
    assert received["id"] == first[2]["id"] and received["from"] == "shop" and received["to"] == "bob"
    assert received["message"] == {"order": 1} and received["ts"] == first[2]["ts"]
    # Deliveries to a recipient keep their order: a second copy of the first would come before this one.
    assert bob.receive(timeout=WAIT)["id"] == later[2]["id"]
    assert bob.messages.empty()


def test_send_over_websocket_with_receipt_to_several_users(running, http, key):
    carol = running.connect("carol", "laptop", ws=True)
    running.register("dave")
    answer = send(http, key, **{"from": "system", "to": ["carol", "dave"], "message": "hello", "receipt": True,
                                "ttl": 60})
    assert answer[0] == 200, answer
    received = carol.receive(timeout=WAIT)
    assert received["id"] == answer[2]["id"] and received["expires"] - received["ts"] == 60_000


def test_a_new_sender_is_created(running, http, key):
    running.register("erin")
    assert send(http, key, **{"from": "newsletter", "to": "erin", "message": 1})[0] == 200
    status, _, body = http.json("GET", "/api/v1/users/newsletter", key=key)
    assert (status, body) == (200, {"user": "newsletter", "devices": []})


def test_send_to_an_unknown_user_is_404_with_the_unknown_named(running, http, key):
    running.register("fay")
    answer = send(http, key, **{"from": "system", "to": ["fay", "ghost"], "message": 1})
    assert_error(answer, 404, -32005)
    assert answer[2]["error"]["data"] == {"unknown": ["ghost"]}


def test_a_token_authenticates_over_websocket(running, http, key):
    status, _, body = http.json("POST", "/api/v1/tokens", {"user": "gus", "device": "tab", "ttl": 120}, key=key)
    assert status == 200, body
    assert (body["user"], body["device"]) == ("gus", "tab")
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120 and body["expires"] == claims["exp"] * 1000
    client = running.ws_client()
    assert client.auth_jwt(body["token"]) == {"user": "gus", "device": "tab", "pending": 0}


def test_a_token_gets_a_fresh_device_and_its_ttl_is_capped(servers, key_for):
    running = servers(token_ttl=600)
    http = Http(running)
    status, _, body = http.json("POST", "/api/v1/tokens", {"user": "hana", "ttl": 10**9}, key=key_for(running))
    assert status == 200
    assert body["device"].startswith("device-")
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    status, _, body = http.json("POST", "/api/v1/tokens", {"user": "hana"}, key=key_for(running))
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    tls = running.tls_client()
    assert tls.auth_jwt(body["token"])["user"] == "hana"
    http.close()


@pytest.fixture
def key_for():
    made = {}

    def key(running) -> str:
        if running not in made:
            made[running] = create_api_key(running.settings.data_dir, "backend")[0]
        return made[running]

    return key


def test_get_user_shows_devices_online_and_pending(running, http, key):
    ivan = running.connect("ivan", "phone")
    running.register("ivan", "laptop")
    answer = send(http, key, **{"from": "system", "to": "ivan", "message": "x"})
    assert answer[0] == 200
    assert ivan.receive(timeout=WAIT)["id"] == answer[2]["id"]
    deadline = time.monotonic() + WAIT
    while True:  # the phone's ACK is on its way to the store
        status, _, body = http.json("GET", "/api/v1/users/ivan", key=key)
        assert status == 200 and body["user"] == "ivan"
        devices = {device["device"]: device for device in body["devices"]}
        if devices["phone"]["pending"] == 0 or time.monotonic() > deadline:
            break
        gevent.sleep(0.05)
    assert devices == {
        "phone": {"device": "phone", "online": True, "pending": 0},
        "laptop": {"device": "laptop", "online": False, "pending": 1},
    }
    status, headers, data = http.request("HEAD", "/api/v1/users/ivan", key=key)
    assert status == 200 and data == b"" and int(headers["content-length"]) > 0


def test_get_an_unknown_user_is_404(http, key):
    answer = http.json("GET", "/api/v1/users/nobody", key=key)
    assert_error(answer, 404, -32005)
    assert answer[2]["error"]["data"] == {"unknown": ["nobody"]}


def test_delete_a_device_revokes_it_and_closes_its_connection_with_4002(running, http, key):
    raw = RawTls(running)
    token = running.token("jill", "phone")
    raw.auth(token)
    status, headers, data = http.request("DELETE", "/api/v1/users/jill/devices/phone", key=key)
    assert (status, data) == (204, b"") and "content-length" not in headers
    assert raw.read_one()["params"]["code"] == 4002
    raw.assert_closed()
    again = running.ws_client()
    with pytest.raises(Exception) as refused:
        again.auth_jwt(token)
    assert getattr(refused.value, "code", None) == -32002
    assert_error(http.json("DELETE", "/api/v1/users/jill/devices/phone", key=key), 404, -32005)
    assert_error(http.json("DELETE", "/api/v1/users/nobody/devices/phone", key=key), 404, -32005)


# -- errors ---------------------------------------------------------------------------------------


def test_no_key_is_401_minus_32001_with_a_bearer_challenge(http):
    headers = assert_error(http.json("POST", "/api/v1/send", {"from": "a"}), 401, -32001)
    assert headers["www-authenticate"].startswith("Bearer")
    headers = assert_error(http.json("GET", "/api/v1/users/a", headers=[("Authorization", "Basic eDp5")]),
                           401, -32001)
    assert headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("bad", ["dvk_00000000_" + "A" * 43, "nonsense", "dvk_zz_zz", "x" * 5000])
def test_a_bad_key_is_401_minus_32002(http, key, bad):
    headers = assert_error(http.json("POST", "/api/v1/send", {"from": "a"}, key=bad), 401, -32002)
    assert 'error="invalid_token"' in headers["www-authenticate"]
    wrong_secret = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert_error(http.json("GET", "/api/v1/users/a", key=wrong_secret), 401, -32002)


def test_the_key_is_checked_before_the_path_and_the_body(http):
    assert_error(http.json("GET", "/api/v1/nowhere"), 401, -32001)
    assert_error(http.request("POST", "/api/v1/send", b"not json", content_type="text/plain"), 401, -32001)
    # Answered before its body was read, the connection still serves the next request.
    assert_error(http.json("GET", "/api/v1/users/a"), 401, -32001)


def test_a_revoked_key_is_refused_at_its_next_use(running, http, key):
    running.register("kim")
    assert send(http, key, **{"from": "system", "to": "kim", "message": 1})[0] == 200
    subprocess.run([*DEVASTATOR, "apikey", "remove", "backend", "--data-dir", str(running.settings.data_dir)],
                   check=True, capture_output=True, timeout=30)
    assert_error(send(http, key, **{"from": "system", "to": "kim", "message": 2}), 401, -32002)
    other, _ = create_api_key(running.settings.data_dir, "backend")  # the same name, a new key
    assert send(http, other, **{"from": "system", "to": "kim", "message": 3})[0] == 200
    assert_error(send(http, key, **{"from": "system", "to": "kim", "message": 4}), 401, -32002)


@pytest.mark.parametrize("path", ["/api", "/api/", "/api/v2/send", "/api/v1/send/", "/api/v1/users",
                                  "/api/v1/users/a/devices", "/api/v1/users/a/phones/b"])
def test_an_unknown_path_is_404_minus_32601(http, key, path):
    assert_error(http.json("GET", path, key=key), 404, -32601)


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/api/v1/send", "POST"),
    ("HEAD", "/api/v1/send", "POST"),
    ("PUT", "/api/v1/tokens", "POST"),
    ("GET", "/api/v1/tokens", "POST"),
    ("POST", "/api/v1/users/a", "GET, HEAD"),
    ("DELETE", "/api/v1/users/a", "GET, HEAD"),
    ("GET", "/api/v1/users/a/devices/b", "DELETE"),
])
def test_a_wrong_method_is_405_with_allow(http, key, method, path, allowed):
    status, headers, data = http.request(method, path, key=key)
    assert status == 405 and headers["allow"] == allowed
    if method != "HEAD":
        assert orjson.loads(data)["error"]["code"] == -32601
    assert http.json("GET", "/api/v1/users/nobody", key=key)[0] == 404  # still in step


def test_a_message_over_the_limit_is_413_minus_32004(running, http, key):
    running.register("lea")
    limit = running.settings.max_message_bytes
    answer = send(http, key, **{"from": "system", "to": "lea", "message": "x" * limit})
    assert_error(answer, 413, -32004)
    assert send(http, key, **{"from": "system", "to": "lea", "message": "x" * (limit - 2)})[0] == 200


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_read(running, http, key):
    too_long = running.settings.max_message_bytes + api.BODY_ALLOWANCE + 1
    http.raw(b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
             + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(too_long).encode() + b"\r\n\r\n")
    status, headers, body = http.read_raw_response()  # answered with no byte of the body sent
    assert status == 413 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == -32004
    http.assert_closed()


def test_a_chunked_body_is_refused_as_it_passes_the_limit(running, http, key):
    http.raw(b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
             + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 32768
    status = None
    for _ in range(10):  # 320 KiB: well past the limit
        try:
            http.raw(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
    status, headers, body = http.read_raw_response()
    assert status == 413 and orjson.loads(body)["error"]["code"] == -32004


def test_a_small_chunked_body_is_read(running, http, key):
    running.register("max")
    body = orjson.dumps({"from": "system", "to": "max", "message": "chunked"})
    http.raw(b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
             + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"%x\r\n" % 5 + body[:5] + b"\r\n" + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n")
    status, _, data = http.read_raw_response()
    assert status == 200 and set(orjson.loads(data)) == {"id", "ts"}


def test_expect_100_continue_is_answered(running, http, key):
    running.register("nia")
    body = orjson.dumps({"from": "system", "to": "nia", "message": "after 100"})
    http.raw(b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
             + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n")
    assert http.sock.recv(65536).startswith(b"HTTP/1.1 100 ")
    http.raw(body)
    status, _, data = http.read_raw_response()
    assert status == 200, data


@pytest.mark.parametrize("content_type,body", [
    ("text/plain", b'{"from": "a", "to": "b", "message": 1}'),
    (None, b'{"from": "a", "to": "b", "message": 1}'),
    ("application/json-seq", b'{}'),
    ("application/json", b'{"from": '),
    ("application/json", b"\xff\xfe"),
    ("application/json", b""),
])
def test_a_body_that_is_not_json_is_415_minus_32700(http, key, content_type, body):
    assert_error(http.request("POST", "/api/v1/send", body, key=key, content_type=content_type), 415, -32700)


def test_a_charset_parameter_is_fine(running, http, key):
    running.register("oli")
    body = orjson.dumps({"from": "system", "to": "oli", "message": "é"})
    status, _, _ = http.request("POST", "/api/v1/send", body, key=key, content_type="Application/JSON; charset=UTF-8")
    assert status == 200


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"1", b"null"])
def test_json_that_is_no_object_is_400_minus_32600(http, key, body):
    assert_error(http.request("POST", "/api/v1/send", body, key=key), 400, -32600)


@pytest.mark.parametrize("path,body", [
    ("/api/v1/send", {"to": "b", "message": 1}),
    ("/api/v1/send", {"from": "no spaces", "to": "b", "message": 1}),
    ("/api/v1/send", {"from": "a", "to": "b"}),
    ("/api/v1/send", {"from": "a", "to": [], "message": 1}),
    ("/api/v1/send", {"from": "a", "to": "b", "message": 1, "ttl": -1}),
    ("/api/v1/send", {"from": "a", "to": "b", "message": 1, "receipt": "yes"}),
    ("/api/v1/send", {"from": "a", "to": "b", "message": 1, "cid": ""}),
    ("/api/v1/tokens", {}),
    ("/api/v1/tokens", {"user": "a", "device": "bad device"}),
    ("/api/v1/tokens", {"user": "a", "ttl": 0}),
    ("/api/v1/tokens", {"user": "a", "ttl": "1h"}),
])
def test_invalid_params_are_400_minus_32602(http, key, path, body):
    assert_error(http.json("POST", path, body, key=key), 400, -32602)


@pytest.mark.parametrize("path", ["/api/v1/users/no%20space", "/api/v1/users/" + "x" * 65, "/api/v1/users/%ff"])
def test_invalid_ids_in_the_path_are_400(http, key, path):
    assert_error(http.json("GET", path, key=key), 400, -32602)


def test_a_percent_encoded_user_id_is_decoded(running, http, key):
    running.register("pia@example.com")
    status, _, body = http.json("GET", "/api/v1/users/pia%40example.com", key=key)
    assert status == 200 and body["user"] == "pia@example.com"


def test_over_the_send_rate_is_429_with_retry_after(servers, key_for):
    running = servers(connection_send_rate=1, connection_send_burst=1)
    running.register("quin")
    http = Http(running)
    key = key_for(running)
    assert send(http, key, **{"from": "system", "to": "quin", "message": 1})[0] == 200
    answer = send(http, key, **{"from": "system", "to": "quin", "message": 2})
    headers = assert_error(answer, 429, -32003)
    wait_ms = answer[2]["error"]["data"]["retry_after_ms"]
    assert int(headers["retry-after"]) == -(-wait_ms // 1000) >= 1
    http.close()


def test_an_overloaded_store_queue_is_429_for_every_route(servers, key_for):
    running = servers()
    http = Http(running)
    key = key_for(running)
    admission = running.server.admission
    admission.overloaded = "store_queue"  # what the sampler decides past overload_store_queue
    try:
        for method, path, body in (("POST", "/api/v1/send", {"from": "a", "to": "b", "message": 1}),
                                   ("POST", "/api/v1/tokens", {"user": "a"}),
                                   ("GET", "/api/v1/users/a", None),
                                   ("DELETE", "/api/v1/users/a/devices/b", None)):
            headers = assert_error(http.json(method, path, body, key=key), 429, -32003)
            assert int(headers["retry-after"]) >= 1
    finally:
        admission.overloaded = None
    http.close()


# -- the connection -------------------------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(running, http, key):
    running.register("ray")
    local = http.sock.getsockname()
    for index in range(20):
        answer = send(http, key, **{"from": "system", "to": "ray", "message": index})
        assert answer[0] == 200
        assert_error(http.json("GET", "/api/v1/nowhere", key=key), 404, -32601)
    assert http.sock.getsockname() == local
    status, _, _ = http.request("GET", "/healthz")  # an operator route on the same connection
    assert status == 200


def test_pipelined_requests_are_answered_in_order(running, http, key):
    running.register("sam")
    data = b""
    for index in range(5):
        body = orjson.dumps({"from": "system", "to": "sam", "message": index})
        data += (b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    http.raw(data)
    ids = []
    conn = h11.Connection(h11.CLIENT)
    for _ in range(5):
        conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())
        http.conn = conn
        status, _, body = http.response()
        assert status == 200
        ids.append(orjson.loads(body)["id"])
    assert ids == sorted(ids) and len(set(ids)) == 5


@pytest.mark.parametrize("head", [
    b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 70000 + b"\r\n\r\n",
])
def test_a_malformed_request_is_refused_and_the_server_goes_on(running, key, head):
    bad = Http(running)
    bad.raw(head.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n"))
    answer = bad.sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 4"), answer
    bad.assert_closed()
    bad.close()
    good = Http(running)
    assert good.json("GET", "/api/v1/users/nobody", key=key)[0] == 404
    good.close()


def test_a_body_shorter_than_its_content_length_times_out_with_json(servers, key_for):
    running = servers(http_header_timeout=0.5)
    http = Http(running)
    http.raw(b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key_for(running).encode()
             + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"from\":")
    status, headers, body = http.read_raw_response()
    assert status == 408 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == -32600
    http.close()


def test_api_requests_are_counted_in_metrics(running, http, key):
    running.register("tom")
    assert send(http, key, **{"from": "system", "to": "tom", "message": 1})[0] == 200
    assert http.json("GET", "/api/v1/users/nobody", key=key)[0] == 404
    assert http.json("GET", "/api/v1/elsewhere")[0] == 401
    status, _, body = http.request("GET", "/metrics")
    assert status == 200
    samples = {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == "devastator_api_requests"
        for sample in family.samples if sample.name == "devastator_api_requests_total"
    }
    assert samples[("/api/v1/send", "200")] == 1
    assert samples[("/api/v1/users/{user}", "404")] == 1
    assert samples[("other", "401")] == 1


# -- the API actor on its own: its failure answers what waits ---------------------------------------


class ReceivedQuery:
    """What SilentStore answers with the names of the requests it took."""


class SilentStore(pykka.ThreadingActor):
    """A store actor that takes requests and never answers them."""

    def __init__(self):
        super().__init__()
        self.received = []

    def on_receive(self, message):
        if isinstance(message, ReceivedQuery):
            return [type(m).__name__ for m in self.received]
        self.received.append(message)
        return None


def test_a_failing_api_actor_answers_what_waits_500():
    store = SilentStore.start()
    actor = ApiActor.start(store=store, router=store, authority=None, new_device_id=lambda: "d")
    admission = AdmissionControl().connection()
    waiting = gevent.event.AsyncResult()
    actor.tell(ApiCall(ApiSend("a", parse_send({"to": "b", "message": 1}, Limits())), waiting, admission))
    assert actor.ask(ApiWaitingQuery()) == {"waiting": 1}  # it told the store before it answered this
    assert store.ask(ReceivedQuery()) == ["AddUser", "Append"]
    actor.tell(ApiCall(object(), gevent.event.AsyncResult()))  # a bug: the actor fails
    answer = waiting.get(timeout=WAIT)
    assert answer.status == 500 and orjson.loads(answer.body)["error"]["code"] == -32603
    assert b"cid" in answer.body  # "may have been stored: retry it with its cid"
    assert admission._control._in_flight == 0  # its place in the admission control given back


def test_the_api_actor_answers_a_send_with_the_store_s_result():
    store = SilentStore.start()
    actor = ApiActor.start(store=store, router=store, authority=None, new_device_id=lambda: "d")
    waiting = gevent.event.AsyncResult()
    actor.tell(ApiCall(ApiSend("a", parse_send({"to": ["b", "c"], "message": 1, "cid": "k", "receipt": True},
                                                Limits())), waiting))
    actor.ask(ApiWaitingQuery())
    append = [m for m in store.proxy().received.get() if isinstance(m, Append)][0]
    assert (append.sender, append.recipients, append.cid, append.receipt, append.to_json) == (
        "a", ("b", "c"), "k", True, b'["b","c"]')
    assert append.origin_device is None and append.reply_to == actor and append.notify == store
    actor.tell(SendResults((SendResult(append.request_key, error=UnknownRecipient(data={"unknown": ["c"]})),)))
    answer = waiting.get(timeout=WAIT)
    assert answer.status == 404 and orjson.loads(answer.body)["error"]["data"] == {"unknown": ["c"]}


# -- sans-IO: routes, bodies, answers ------------------------------------------------------------


def test_routes():
    assert api.match_route("/api/v1/send") == api.RouteMatch(api.SEND)
    assert api.match_route("/api/v1/users/a%40b") == api.RouteMatch(api.USER, {"user": "a@b"})
    assert api.match_route("/api/v1/users/u/devices/d") == api.RouteMatch(api.DEVICE, {"user": "u", "device": "d"})
    for path in ("/api/v1/users/", "/api/v1/users//devices/d", "/api/v1/users/u/devices/", "/api/v1/x"):
        assert api.match_route(path) is None
    assert api.is_api_path("/api") and api.is_api_path("/api/x") and not api.is_api_path("/apix")


def test_bodies():
    assert api.parse_body(b"application/json; charset=utf-8", b'{"a": 1}') == {"a": 1}
    with pytest.raises(ParseError):
        api.parse_body(b"text/json", b"{}")
    with pytest.raises(InvalidRequest):
        api.parse_body(b"application/json", b"[]")
    sent = api.parse_api_send({"from": "x", "to": "y", "message": None}, Limits())
    assert sent.sender == "x" and sent.send.to == ("y",) and sent.send.message_json == b"null"
    with pytest.raises(TooLarge):
        api.parse_api_send({"from": "x", "to": "y", "message": "z" * 70000}, Limits())
    assert api.parse_token_request({"user": "u", "ttl": 5.0}, 10) == api.TokenRequest("u", None, 5)
    assert api.parse_token_request({"user": "u", "ttl": 50}, 10).ttl == 10
    with pytest.raises(InvalidParams):
        api.parse_token_request({"user": "u", "ttl": True}, 10)


def test_error_answers():
    answer = api.error_answer(UnknownRecipient(data={"unknown": ["u"]}))
    assert answer.status == 404
    assert orjson.loads(answer.body) == {"error": {"code": -32005, "message": "Unknown recipient",
                                                   "data": {"unknown": ["u"]}}}
    from devastator.protocol.errors import Overloaded

    answer = api.error_answer(Overloaded(retry_after_ms=1001))
    assert answer.status == 429 and ("Retry-After", "2") in answer.headers


# -- the keys file ------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_verified(tmp_path):
    data = tmp_path / "data"
    key, entry = create_api_key(data, "one")
    assert api_keys_text(data).count(key) == 0 and entry.hash == hash_key(key)
    keys = ApiKeyFile(data)
    assert keys.verify(key) == entry
    assert keys.verify(key + "x") is None and keys.verify("") is None
    assert keys.verify(key.replace(entry.id, "ffffffff" if entry.id != "ffffffff" else "00000000")) is None
    assert [k.name for k in load_api_keys(data)] == ["one"]
    (data / "api-keys.json").write_text("{broken")
    assert keys.verify(key) is None  # a broken file refuses every key


def api_keys_text(data: Path) -> str:
    return (data / "api-keys.json").read_text()


def test_a_dead_api_actor_is_replaced_for_the_next_request(running, http, key):
    running.register("uma")
    assert send(http, key, **{"from": "system", "to": "uma", "message": 1})[0] == 200
    endpoint = running.server.http._api
    first = endpoint._actor
    first.tell(ApiCall(object(), gevent.event.AsyncResult()))  # a bug: it fails
    assert first.actor_stopped.wait(WAIT)
    assert send(http, key, **{"from": "system", "to": "uma", "message": 2})[0] == 200
    assert endpoint._actor is not first and endpoint._actor.is_alive()
