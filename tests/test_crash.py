"""Nothing answered to a sender is lost when the server is killed (a real subprocess).

Killed once, and killed again and again under load (on SQLite and on Redis),
with a sender that retries what a kill left unanswered with the same cid:
everything answered is delivered, each message once.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from devastator.client import Client, ConnectionClosed
from devastator.protocol.close_codes import CLOSE_OVERLOADED
from devastator.protocol.errors import Overloaded
from load import Sender, check_delivery
from redis_server import RedisServer, require_redis_server

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, *, env: dict | None = None):
        self.data_dir = data_dir
        self.tls_port, self.http_port = free_port(), free_port()
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.data_dir.parent / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "bin" / "devastator"), "--data-dir", str(self.data_dir),
                 "--tls-port", str(self.tls_port), "--http-port", str(self.http_port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + 20
        while True:
            assert self.process.poll() is None, "the server exited while starting"
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the server did not start listening"
                time.sleep(0.05)

    def token(self, user: str) -> str:
        out = subprocess.run(
            [sys.executable, str(ROOT / "bin" / "devastator"), "token", user, "--data-dir", str(self.data_dir)],
            check=True, capture_output=True, text=True, env=self.env,
        ).stdout
        return out.strip().splitlines()[-1]

    def client(self, **kwargs) -> Client:
        return Client.connect_tls("localhost", self.tls_port, ca=self.data_dir / "ca.pem", **kwargs)

    def authenticated(self, token: str, **kwargs) -> tuple[Client, dict]:
        """A client and its auth.jwt answer; after a conn.close 1013 it tries again with backoff, as PROTOCOL.md 7 asks.

        Right after a restart under load the server may be shedding (its sends wait longer than
        its still-short usual wait), and then it refuses new connections for a moment.
        """
        backoff = 0.05
        deadline = time.monotonic() + 30
        while True:
            client = self.client(**kwargs)
            try:
                return client, client.auth_jwt(token)
            except ConnectionClosed:
                refused = client.close_reason is not None and client.close_reason.code == CLOSE_OVERLOADED
                client.close()
                if not refused or time.monotonic() > deadline:
                    raise
            gevent.sleep(backoff)  # the backoff the 1013 asks for, not a wait for an event
            backoff = min(backoff * 2, 1.0)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)


@pytest.fixture
def server_process(tmp_path):
    server = ServerProcess(tmp_path / "data")
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait(10)


def test_answered_messages_survive_kill_9(server_process):
    server_process.start()
    alice_token, bob_token = server_process.token("alice"), server_process.token("bob")
    alice = server_process.client()
    alice.auth_jwt(alice_token)
    answered = []
    for start in range(0, 1000, 250):
        window = [alice.send_async("bob", {"n": n}) for n in range(start, start + 250)]
        answered.extend(pending.wait(20)["id"] for pending in window)
    server_process.kill()  # SIGKILL: no shutdown code runs
    alice.close()

    server_process.start()
    bob = server_process.client()
    assert bob.auth_jwt(bob_token)["pending"] == 1000
    received = [bob.receive(timeout=10) for _ in range(1000)]
    assert [m["message"]["n"] for m in received] == list(range(1000))
    assert [m["id"] for m in received] == answered
    bob.close()


def test_sigterm_shuts_down_cleanly(server_process):
    server_process.start()
    client = server_process.client()
    client.auth_jwt(server_process.token("alice"))
    assert server_process.terminate() == 0
    assert client.closed.wait(5)


def test_a_client_reconnects_by_itself_after_a_crash(server_process):
    server_process.start()
    alice_token, bob_token = server_process.token("alice"), server_process.token("bob")
    bob = server_process.client(auto_reconnect=True)
    bob.auth_jwt(bob_token)
    server_process.kill()
    assert bob.closed.wait(5)
    server_process.start()
    alice = server_process.client()
    alice.auth_jwt(alice_token)
    sent = alice.send("bob", "you are back")
    assert bob.receive(timeout=15)["id"] == sent["id"]  # no reconnect() call: it came back alone
    assert bob.reconnect_error is None
    alice.close()
    bob.close()


def test_kill_9_in_the_middle_of_a_load_loses_nothing_answered(server_process):
    server_process.start()
    alice_token, bob_token = server_process.token("alice"), server_process.token("bob")
    alice = server_process.client()
    alice.auth_jwt(alice_token)
    answered: list[str] = []

    def keep_sending():
        n = 0
        while True:
            window = [alice.send_async("bob", {"n": n + k}) for k in range(50)]
            n += 50
            for pending in window:
                try:
                    answered.append(pending.wait(10)["id"])  # raises once the server is gone
                except Overloaded as shed:  # not stored: a slow disk made the server shed it (PROTOCOL.md 7)
                    gevent.sleep((shed.retry_after_ms or 100) / 1000)

    sender = gevent.spawn(keep_sending)
    with gevent.Timeout(30):
        while len(answered) < 2000:
            gevent.sleep(0.01)
    server_process.kill()  # sends are in flight, some answered, some not
    sender.join(10)
    assert not sender.successful()  # it stopped because the server died
    answered_before_kill = list(answered)

    server_process.start()
    bob, welcome = server_process.authenticated(bob_token)
    pending = welcome["pending"]
    assert pending >= len(answered_before_kill)
    received = [bob.receive(timeout=10)["id"] for _ in range(pending)]
    # Everything answered is there, in the order it was answered.
    position = {message_id: index for index, message_id in enumerate(received)}
    assert all(message_id in position for message_id in answered_before_kill)
    assert [position[m] for m in answered_before_kill] == sorted(position[m] for m in answered_before_kill)
    alice.close()
    bob.close()


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request, tmp_path):
    """The server's environment for each store: the embedded SQLite file, or a redis-server of the test's."""
    if request.param == "sqlite":
        yield {}
        return
    require_redis_server()
    redis = RedisServer(tmp_path / "redis").start()
    yield {"DEVASTATOR_STORE": "redis", "DEVASTATOR_REDIS_URL": redis.url}
    redis.stop()


def test_killed_again_and_again_under_load_the_server_loses_nothing_answered(tmp_path, store_env):
    server = ServerProcess(tmp_path / "data", env=store_env)
    try:
        server.start()
        alice_token, bob_token = server.token("alice"), server.token("bob")
        alice = server.client()
        alice.auth_jwt(alice_token)
        sender = Sender(alice, "bob", window=50)
        sender.start()
        for cycle in range(10):
            sender.wait_answered(len(sender.answered) + 150, timeout=30)
            server.kill()  # sends in flight: some stored and not answered, some not stored at all
            alice.close()
            server.start()
            alice, _ = server.authenticated(alice_token)
            sender.resume(alice)  # what was left unanswered is sent again, with its cid
        sender.stop()
        alice.close()

        bob, welcome = server.authenticated(bob_token, dedupe=False)
        pending = welcome["pending"]
        assert pending == len(sender.answered)  # stored once each, nothing more
        received = [bob.receive(timeout=10) for _ in range(pending)]
        check_delivery(sender, [m["id"] for m in received], [m["message"]["n"] for m in received])
        bob.close()
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
