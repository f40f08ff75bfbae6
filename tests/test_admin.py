"""The admin endpoint (a Unix socket for the console) and the operators' HTTP pages, on a real server."""
from __future__ import annotations

import collections
import os
import socket
import stat
import subprocess
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devastator.protocol import FrameDecoder, encode_frame
from wire import RawTls, assert_error

WAIT = 5.0


class AdminClient:
    """A bare admin socket client: requests out, answers and notifications back in order."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self._decoder = FrameDecoder(1 << 20)
        self._values: collections.deque = collections.deque()
        self._ids = 0
        self.notifications: list = []

    def _next(self):
        while not self._values:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the admin endpoint closed the connection")
            self._values.extend(orjson.loads(body) for body in self._decoder.feed(data))
        return self._values.popleft()

    def call(self, method: str, params=None):
        self._ids += 1
        self.sock.sendall(encode_frame(orjson.dumps(
            {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": self._ids})))
        while True:
            value = self._next()
            if value.get("id") == self._ids:
                return value
            self.notifications.append(value)

    def result(self, method: str, params=None):
        answer = self.call(method, params)
        assert "result" in answer, answer
        return answer["result"]

    def notification(self):
        if self.notifications:
            return self.notifications.pop(0)
        return self._next()

    def close(self):
        self.sock.close()


@pytest.fixture
def admin(running):
    client = AdminClient(running.settings.admin_socket)
    yield client
    client.close()


def http_get(running, path: str) -> bytes:
    host, port = running.http_address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT) as response:
        return response.read()


# -- the socket itself ---------------------------------------------------------------------


def test_the_admin_socket_is_private_to_the_server_s_user(running):
    mode = os.stat(running.settings.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


SYSTEM_PYTHON = "/usr/bin/python3"  # one that another user may run, unlike a venv under /root
PROBE = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as error:
    sys.exit(print("refused", errno.errorcode.get(error.errno, error)))
try:
    s.sendall(b'\\x0f\\x00\\x00\\x00{"jsonrpc":"2.0"}')
    print("answered" if s.recv(100) else "hung up")
except (BrokenPipeError, ConnectionResetError):
    print("hung up")  # the server closed before the write, or with it unread: either sees the hang-up
except OSError as error:
    print("failed", error)
"""


def probe_as_nobody(directory_fd: int) -> str:
    """Connect as user nobody (no other group), reaching the socket through a descriptor of its directory."""
    probed = subprocess.run(
        [SYSTEM_PYTHON, "-c", PROBE, f"/proc/self/fd/{directory_fd}/admin.sock"],
        capture_output=True, text=True, timeout=30, user=65534, group=65534, extra_groups=[],
        pass_fds=(directory_fd,),
    )
    return probed.stdout.strip() or probed.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root (to run a process as another user) and a system Python")
def test_another_unix_user_cannot_connect(running, caplog):
    socket_path = running.settings.admin_socket
    directory = os.open(socket_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # The 0600 mode keeps another user out...
        assert probe_as_nobody(directory) == "refused EACCES", "mode 0600 let another user in"
        # ...and were it loosened, the server checks the peer's credentials and hangs up.
        os.chmod(socket_path.parent, 0o711)
        os.chmod(socket_path, 0o666)
        assert probe_as_nobody(directory) == "hung up"
        assert any("admin connection refused" in record.getMessage() and "uid 65534" in record.getMessage()
                   for record in caplog.records), caplog.text
    finally:
        os.chmod(socket_path, 0o600)
        os.chmod(socket_path.parent, 0o700)
        os.close(directory)


def test_admin_methods_are_on_no_tcp_port(running):
    for method in ("stats", "actors", "kick"):
        raw = RawTls(running)
        raw.auth(running.token("mallory"))
        assert_error(raw.call(method, {"user": "bob"}, id=1), -32601, 1)
        ws = running.ws_client()
        ws.auth_jwt(running.token("mallory", "browser"))
        with pytest.raises(Exception) as refused:
            ws.call(method, {"user": "bob"})
        assert getattr(refused.value, "code", None) == -32601
    host, port = running.http_address
    for path in ("/admin", "/actors"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT)


def test_errors_are_json_rpc_errors(admin):
    assert admin.call("nope")["error"]["code"] == -32601
    assert admin.call("user", {"user": "nobody"})["error"]["code"] == -32602
    assert admin.call("user", {})["error"]["code"] == -32602
    assert admin.result("ping") == "pong"


# -- inspecting and steering ------------------------------------------------------------------


def test_actors_are_listed_with_what_they_serve(running, admin):
    running.connect("alice", "phone")
    listing = admin.result("actors")
    ids = {(a["kind"], a["id"]) for a in listing["actors"]}
    assert {("DeviceActor", "alice/phone"), ("UserActor", "alice"), ("RouterActor", "RouterActor"),
            ("StoreActor", "StoreActor")} <= ids
    assert listing["kinds"]["DeviceActor"]["count"] == 1


def test_a_user_s_pending_messages_per_device(running, admin):
    running.token("bob", "phone")
    running.connect("alice").send("bob", "one")
    running.connect("alice", "tablet").send("bob", "two")
    view = admin.result("user", {"user": "bob"})
    (phone,) = view["devices"]
    assert (phone["device"], phone["online"], phone["pending"]) == ("phone", False, 2)
    assert phone["oldest_pending_age_seconds"] >= 0
    device = admin.result("device", {"user": "bob", "device": "phone"})
    assert [m["from"] for m in device["pending_messages"]] == ["alice", "alice"]


def test_kicking_a_device_closes_its_connection_and_keeps_its_messages(running, admin):
    bob = running.connect("bob", "phone", auto_ack=False)
    sent = running.connect("alice").send("bob", "keep me")
    assert bob.receive(timeout=WAIT)["id"] == sent["id"]

    assert admin.result("kick", {"user": "bob", "device": "phone"}) == {"closed": 1}

    assert bob.closed.wait(WAIT)
    assert admin.result("user", {"user": "bob"})["devices"][0]["pending"] == 1
    again = running.connect("bob", "phone")
    assert again.receive(timeout=WAIT)["id"] == sent["id"]


def test_a_message_from_the_system(running, admin):
    bob = running.connect("bob")
    answer = admin.result("send", {"to": "bob", "message": {"notice": "maintenance at noon"}})
    got = bob.receive(timeout=WAIT)
    assert (got["id"], got["from"], got["message"]) == (answer["id"], "system", {"notice": "maintenance at noon"})


def test_expiring_a_user_s_messages(running, admin):
    running.token("bob")
    alice = running.connect("alice")
    alice.send("bob", "one")
    alice.send("bob", "two")
    assert admin.result("expire", {"user": "bob"}) == {"expired": 2}
    bob = running.connect("bob")
    assert admin.result("user", {"user": "bob"})["devices"][0]["pending"] == 0
    with pytest.raises(TimeoutError):
        bob.receive(timeout=0.5)


def test_watching_a_user_shows_deliveries_live(running, admin):
    bob = running.connect("bob")
    assert admin.result("watch", {"user": "bob"}) == "ACK"
    sent = running.connect("alice").send("bob", "watched")
    bob.receive(timeout=WAIT)
    seen = []
    while not any(event["event"] == "acked" for event in seen):
        note = admin.notification()
        assert note["method"] == "watch.event"
        seen.append(note["params"])
    assert [(e["event"], e.get("id")) for e in seen] == [
        ("stored", sent["id"]), ("delivered", sent["id"]), ("acked", sent["id"])
    ]
    assert seen[1]["device"] == "default"


# -- /debug/vars and /metrics ---------------------------------------------------------------------


def test_debug_vars_count_exactly_the_traffic(running):
    before = orjson.loads(http_get(running, "/debug/vars"))
    bob = running.connect("bob")
    alice = running.connect("alice")
    for n in range(5):
        alice.send("bob", n)
    for _ in range(5):
        bob.receive(timeout=WAIT)
    bob.ping()  # its ACKs were read before this answer
    after = orjson.loads(http_get(running, "/debug/vars"))

    assert after["cmdline"] and after["memstats"]["resident_bytes"] > 0
    moved = {key: after["messages"][key] - before["messages"][key] for key in ("accepted", "delivered", "acked")}
    assert moved == {"accepted": 5, "delivered": 5, "acked": 5}
    assert after["messages"]["pending"] == 0
    assert after["requests"]["msg.send"] - before["requests"].get("msg.send", 0) == 5
    assert after["connections"]["open"]["tls"] == 2
    assert after["devices_authenticated"] == 2
    assert after["actors"]["UserActor"]["count"] == 2
    assert after["delivery_latency_seconds"]["count"] == 5


def test_the_pending_gauge_falls_to_zero_after_acks(running):
    running.token("bob")
    alice = running.connect("alice")
    for n in range(3):
        alice.send("bob", n)
    assert orjson.loads(http_get(running, "/debug/vars"))["messages"]["pending"] == 3
    bob = running.connect("bob")
    for _ in range(3):
        bob.receive(timeout=WAIT)
    bob.ping()
    families = {f.name: f for f in text_string_to_metric_families(http_get(running, "/metrics").decode())}
    assert families["devastator_messages_pending"].samples[0].value == 0


def test_metrics_parse_and_count_errors_and_requests(running):
    raw = RawTls(running)
    raw.call("msg.send", {"to": "x", "message": 1}, id=1)  # -32001 before auth
    raw.call("ping", id=2)
    families = {f.name: f for f in text_string_to_metric_families(http_get(running, "/metrics").decode())}

    def sample(family, **labels):
        for s in families[family].samples:
            if all(s.labels.get(k) == v for k, v in labels.items()) and s.name.endswith("_total"):
                return s.value
        return None

    assert sample("devastator_errors", code="-32001") == 1
    assert sample("devastator_requests", method="ping") == 1
    assert families["devastator_delivery_seconds"].type == "histogram"
    assert families["devastator_store_commit_seconds"].type == "histogram"
    assert "devastator_push_sent" in families
    assert all(name.startswith(("devastator_", "process_")) for name in families)


def test_bad_input_on_the_admin_socket_gets_errors_and_the_server_goes_on(running, admin):
    admin.sock.sendall(encode_frame(b'[{"jsonrpc": "2.0", "method": "ping", "id": 1}]'))
    assert admin._next()["error"]["code"] == -32600  # no batches here
    admin.sock.sendall(encode_frame(b'{"jsonrpc": "2.0", "method": "user", "params": [1], "id": 2}'))
    assert admin._next()["error"]["code"] == -32602
    assert admin.result("ping") == "pong"
    admin.sock.sendall(encode_frame(b"{not json"))
    assert admin._next()["error"]["code"] == -32700
    with pytest.raises((ConnectionError, OSError)):
        admin.call("ping")  # a parse error closes the connection
    again = AdminClient(running.settings.admin_socket)
    try:
        assert again.result("ping") == "pong"
        again.sock.sendall(b"\xff\xff\xff\x7f")  # a header announcing 2 GiB
        assert again._next()["error"]["code"] == -32004
    finally:
        again.close()
    assert running.connect("alice").ping() == "pong"
