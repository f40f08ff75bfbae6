"""Clustering on Redis: three real nodes (subprocesses) sharing one real redis-server.

A sender on one node reaches a recipient whose devices are on two others;
a node killed with SIGKILL under load, and Redis itself killed and
restarted (once, and again and again under load with the recipient
connected to another node), lose nothing that was answered to a sender.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gevent
import pytest

from devastator.client import Client
from fake_fcm import fake_fcm, fake_fcm_key  # noqa: F401  (fixtures)
from load import Receiver, Sender, check_delivery
from redis_server import RedisServer, require_redis_server

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Node:
    """One Devastator node as a subprocess, on the shared data directory (its CA and JWT keys)."""

    def __init__(self, name: str, data_dir: Path, redis_url: str, *, extra_env: dict | None = None,
                 workers: int = 1):
        self.name = name
        self.data_dir = data_dir
        self.tls_port, self.http_port = free_port(), free_port()
        self.workers = workers
        self.env = {
            **os.environ,
            "DEVASTATOR_STORE": "redis",
            "DEVASTATOR_REDIS_URL": redis_url,
            "DEVASTATOR_NODE_NAME": name,
            "DEVASTATOR_TICK_INTERVAL": "0.2",
            "DEVASTATOR_ACK_TIMEOUT": "2",
            **(extra_env or {}),
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / "devastator"), "--data-dir", str(self.data_dir),
             "--tls-port", str(self.tls_port), "--http-port", str(self.http_port),
             "--workers", str(self.workers)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"node {self.name} exited while starting"
            try:
                # Both: the HTTP port is bound just after the TLS one, which a loaded machine shows.
                for port in (self.tls_port, self.http_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"node {self.name} did not start listening"
                time.sleep(0.05)

    def cli(self, *args) -> str:
        return subprocess.run(
            [sys.executable, str(ROOT / "bin" / "devastator"), *args, "--data-dir", str(self.data_dir)],
            check=True, capture_output=True, text=True, env=self.env, timeout=60,
        ).stdout

    def token(self, user: str, device: str = "default") -> str:
        return self.cli("token", user, "--device", device).strip().splitlines()[-1]

    def client(self, **kwargs) -> Client:
        return Client.connect_tls("localhost", self.tls_port, ca=self.data_dir / "ca.pem", **kwargs)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture
def redis(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nodes(tmp_path, redis):
    """Start named nodes on the shared data directory; all are stopped after the test."""
    data_dir = tmp_path / "data"
    started: list[Node] = []

    def start(*names: str, **kwargs) -> list[Node]:
        for name in names:
            node = Node(name, data_dir, redis.url, **kwargs)
            node.start()
            started.append(node)
        return started[-len(names):]

    yield start
    for node in started:
        node.stop()


def connect(node: Node, token: str, **kwargs) -> Client:
    client = node.client(**kwargs)
    client.auth_jwt(token)
    return client


def test_a_sender_on_one_node_reaches_devices_on_two_others(nodes):
    n1, n2, n3 = nodes("n1", "n2", "n3")
    alice = connect(n1, n1.token("alice"))
    phone = connect(n2, n1.token("bob", "phone"), auto_ack=False)
    laptop = connect(n3, n1.token("bob", "laptop"), auto_ack=False)

    sent = [alice.send("bob", {"n": n})["id"] for n in range(20)]

    for device in (phone, laptop):
        got = [device.receive(timeout=WAIT)["id"] for _ in sent]
        assert got == sent  # every one, in order, once
        device.ack(got)
    for device in (phone, laptop):
        device.ping()  # the ACKs were read
        with pytest.raises(TimeoutError):
            device.receive(timeout=3.0)  # nothing sent twice, not even after the ACK timeout (2 s)
    # ACKs live in Redis: the phone moving to node 1 is sent nothing it ACKed.
    phone.close()
    moved = connect(n1, n1.token("bob", "phone"), auto_ack=False)
    with pytest.raises(TimeoutError):
        moved.receive(timeout=1.0)


def test_a_node_killed_under_load_loses_nothing_answered(nodes):
    n1, n2, n3 = nodes("n1", "n2", "n3")
    bob_token = n1.token("bob")
    bob = connect(n2, bob_token, auto_ack=False)  # what reached it on node 2 is not ACKed: it must come again
    alice = connect(n1, n1.token("alice"))
    answered: list[str] = []
    stop = gevent.event.Event()

    def send_continuously():
        n = 0
        while not stop.is_set():
            answered.append(alice.send("bob", {"n": n})["id"])
            n += 1

    sender = gevent.spawn(send_continuously)
    gevent.sleep(1.0)
    n2.kill()  # bob's node dies in the middle of it
    gevent.sleep(0.5)
    stop.set()
    sender.get(timeout=WAIT)
    assert len(answered) > 50

    bob.close()
    bob = connect(n3, bob_token)  # bob's app reconnects to another node
    received = set()
    deadline = time.monotonic() + 30
    while not set(answered) <= received and time.monotonic() < deadline:
        try:
            received.add(bob.receive(timeout=1.0)["id"])
        except TimeoutError:
            pass
    assert set(answered) - received == set()


def test_redis_killed_and_restarted_loses_nothing_answered(nodes, redis):
    n1, n2 = nodes("n1", "n2")
    bob_token = n1.token("bob")
    alice = connect(n1, n1.token("alice"))
    answered = [alice.send("bob", {"n": n})["id"] for n in range(200)]

    redis.kill()
    redis.start()  # same port, same directory: the append-only file

    deadline = time.monotonic() + 30
    while True:  # the nodes reconnect to Redis by themselves
        try:
            bob = connect(n2, bob_token)
            break
        except Exception:
            assert time.monotonic() < deadline, "node 2 did not get back to Redis"
            time.sleep(0.2)
    got = [bob.receive(timeout=WAIT)["id"] for _ in answered]
    assert got == answered


def test_redis_killed_again_and_again_under_load_loses_nothing_for_a_recipient_on_another_node(nodes, redis):
    n1, n2 = nodes("n1", "n2", extra_env={"DEVASTATOR_ACK_TIMEOUT": "30"})
    alice = connect(n1, n1.token("alice"))
    bob = connect(n2, n1.token("bob"), dedupe=False)  # connected all along, to the other node
    receiver = Receiver(bob)
    sender = Sender(alice, "bob")
    sender.start()
    try:
        for _ in range(5):
            sender.wait_answered(len(sender.answered) + 100, timeout=30)
            redis.kill()
            redis.start()  # same port, same append-only file
            sender.wait_answered(len(sender.answered) + 50, timeout=30)
            receiver.wait_for(list(sender.answered.values()), timeout=WAIT)
    finally:
        sender.stop()
    receiver.wait_for(list(sender.answered.values()), timeout=WAIT)
    receiver.close()
    check_delivery(sender, receiver.ids, receiver.numbers)
    assert not alice.closed.is_set() and not bob.closed.is_set(), "a client had to reconnect"


def admin_call(socket_path: Path, method: str, params: dict):
    from devastator.console import AdminClient

    client = AdminClient.connect(socket_path)
    try:
        return client.call(method, params)
    finally:
        client.close()


def test_the_console_and_debug_vars_name_the_node_of_each_device(nodes):
    n1, n2, n3 = nodes("n1", "n2", "n3")
    connect(n2, n1.token("bob", "phone"))
    connect(n3, n1.token("bob", "laptop"))
    view = admin_call(n1.data_dir / "admin-n1.sock", "user", {"user": "bob"})
    assert {d["device"]: d["node"] for d in view["devices"]} == {"phone": "n2", "laptop": "n3"}
    with urllib.request.urlopen(f"http://127.0.0.1:{n2.http_port}/debug/vars", timeout=WAIT) as page:
        assert json.loads(page.read())["node"] == "n2"


def test_exactly_one_node_pushes_to_an_offline_device(nodes, fake_fcm):  # noqa: F811
    push_env = {
        "DEVASTATOR_FCM_SERVICE_ACCOUNT_FILE": str(fake_fcm.service_account_file),
        "DEVASTATOR_FCM_ENDPOINT": fake_fcm.endpoint,
        "DEVASTATOR_FCM_TOKEN_URI": fake_fcm.token_uri,
        "DEVASTATOR_FCM_CA_FILE": str(fake_fcm.ca_file),
    }
    n1, n2, n3 = nodes("n1", "n2", "n3", extra_env=push_env)
    phone = connect(n2, n1.token("bob", "phone"))
    assert phone.call("push.register", {"platform": "fcm", "token": "bobs-fcm-token"}) == "ACK"
    phone.close()
    senders = [connect(node, n1.token(user)) for node, user in ((n1, "alice"), (n3, "carol"))]
    deadline = time.monotonic() + WAIT
    while admin_call(n2.data_dir / "admin-n2.sock", "user", {"user": "bob"})["devices"][0]["online"]:
        assert time.monotonic() < deadline, "node 2 did not see the phone leave"
        time.sleep(0.05)

    def send_many(client):
        for n in range(10):
            client.send("bob", {"n": n})

    gevent.joinall([gevent.spawn(send_many, client) for client in senders], raise_error=True)
    fake_fcm.wait_for(lambda: len(fake_fcm.accepted) >= 1)
    time.sleep(1.0)  # a bound for a second push to show up, were there one
    assert [m["token"] for m in fake_fcm.accepted] == ["bobs-fcm-token"]


def test_workers_share_the_ports_and_the_store(nodes):
    (supervisor,) = nodes("box", workers=2)
    # The kernel spreads new connections over the workers listening; the second
    # may still be starting when the first answers.
    seen_nodes: set[str] = set()
    deadline = time.monotonic() + 30
    while seen_nodes != {"box-w0", "box-w1"}:
        assert time.monotonic() < deadline, f"only {seen_nodes} answered"
        with urllib.request.urlopen(f"http://127.0.0.1:{supervisor.http_port}/debug/vars", timeout=WAIT) as page:
            seen_nodes.add(json.loads(page.read())["node"])
    recipients = [connect(supervisor, supervisor.token(f"r{n}")) for n in range(8)]
    alice = connect(supervisor, supervisor.token("alice"))
    sent = {f"r{n}": alice.send(f"r{n}", {"n": n})["id"] for n in range(8)}
    for n, recipient in enumerate(recipients):
        assert recipient.receive(timeout=WAIT)["id"] == sent[f"r{n}"]
