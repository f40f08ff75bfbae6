"""A Redis that dies, stops or comes back under a running server (real redis-server, real TLS clients).

Redis killed with SIGKILL mid-load and restarted on its append-only file, or
stopped with SIGSTOP (a blackhole: connections open, nothing answered) and
continued: the server answers every send in bounded time, stores each one
exactly once, and its connected recipients get every answered message soon
after Redis is back, without reconnecting.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import gevent
import pytest
import redis as redis_py

from conftest import start_server
from devastator.actors.messages import OnlineUsersQuery
from load import WAIT, Receiver, Sender, check_delivery
from redis_server import RedisServer, free_port, require_redis_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def redis(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    if server.running:
        server.stop()


# Seconds a Redis command may take here: a paused Redis is found out fast.
REDIS_SOCKET_TIMEOUT = 0.5


@pytest.fixture
def redis_running(settings, redis):
    """A server on the test's own redis-server (keys under a prefix of the test's)."""
    running = start_server(
        settings.replace(
            store="redis", redis_url=redis.url, redis_prefix=f"t-{uuid.uuid4().hex[:8]}:",
            redis_socket_timeout=REDIS_SOCKET_TIMEOUT,
        )
    )
    yield running
    running.close_clients()
    running.server.stop()


def health(running) -> tuple[int, dict]:
    host, port = running.http_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=WAIT) as page:
            return page.status, json.loads(page.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_healthy(running) -> None:
    deadline = time.monotonic() + WAIT
    while health(running)[0] != 200:
        assert time.monotonic() < deadline, f"/healthz still says {health(running)}"
        gevent.sleep(0.05)


def test_redis_killed_again_and_again_under_load_loses_nothing_and_live_recipients_get_it_all(
    redis_running, redis
):
    alice = redis_running.connect("alice")
    bob = redis_running.tls_client(dedupe=False)
    bob.auth_jwt(redis_running.token("bob"))
    receiver = Receiver(bob)
    sender = Sender(alice, "bob")
    sender.start()
    back_within = []
    try:
        for cycle in range(10):
            sender.wait_answered(len(sender.answered) + 100)  # mid-load: sends in flight now
            redis.kill()
            redis.start()  # same port, same append-only file
            sender.wait_answered(len(sender.answered) + 50)  # served again
            back_within.append(receiver.wait_for(list(sender.answered.values())))
    finally:
        sender.stop()
    receiver.wait_for(list(sender.answered.values()))
    receiver.close()
    check_delivery(sender, receiver.ids, receiver.numbers)
    assert not alice.closed.is_set() and not bob.closed.is_set(), "a client had to reconnect"
    assert max(back_within) < 5.0


def test_a_paused_redis_gets_every_send_answered_in_bounded_time_and_then_the_server_serves_on(
    redis_running, redis
):
    alice = redis_running.connect("alice")
    bob = redis_running.tls_client(dedupe=False)
    bob.auth_jwt(redis_running.token("bob"))
    receiver = Receiver(bob)
    sender = Sender(alice, "bob")
    sender.start()
    try:
        sender.wait_answered(100)
        redis.pause()  # connections stay open, nothing is answered: a blackhole
        paused = time.monotonic()
        while sum(sender.errors.values()) < 20 or time.monotonic() - paused < 2 * REDIS_SOCKET_TIMEOUT:
            assert time.monotonic() - paused < WAIT, "sends were not answered while Redis was paused"
            gevent.sleep(0.02)
        status, body = health(redis_running)
        assert status == 503 and "message store" in body["reason"], body
        answered_while_paused = len(sender.answered)
        redis.resume()
        sender.wait_answered(answered_while_paused + 100)  # served on
        wait_healthy(redis_running)
    finally:
        sender.stop()
    receiver.wait_for(list(sender.answered.values()))
    receiver.close()
    check_delivery(sender, receiver.ids, receiver.numbers)
    # Answers, even errors, came within a bound: the socket timeout, a retry interval, the commit itself.
    assert sender.slowest_answer < 8 * REDIS_SOCKET_TIMEOUT
    assert set(sender.errors) <= {-32603, -32003}
    assert not alice.closed.is_set() and not bob.closed.is_set(), "a client had to reconnect"
    assert redis_running.server.router_ref.ask(OnlineUsersQuery()) == {"alice": {"online": 1}, "bob": {"online": 1}}


def test_the_cli_says_in_one_line_that_redis_does_not_answer(tmp_path):
    nobody_listens = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "devastator"), "token", "bob", "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "DEVASTATOR_STORE": "redis", "DEVASTATOR_REDIS_URL": nobody_listens},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("devastator: Redis did not answer") and "Connection refused" in line


def test_a_stopped_server_leaves_no_connection_to_redis_open(settings, redis):
    raw = redis_py.Redis(host="127.0.0.1", port=redis.port, socket_timeout=WAIT)
    running = start_server(settings.replace(store="redis", redis_url=redis.url, redis_prefix="closing:"))
    alice = running.connect("alice")
    assert alice.send("alice", "to myself")["id"]
    assert len(raw.client_list()) >= 4  # the store's, the cluster's, its subscriber's, and this one
    running.close_clients()
    running.server.stop()
    deadline = time.monotonic() + WAIT
    while len(raw.client_list()) > 1:
        assert time.monotonic() < deadline, f"still connected: {raw.client_list()}"
        gevent.sleep(0.02)
    raw.close()
