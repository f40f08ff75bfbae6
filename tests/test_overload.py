"""Overload shedding (PROTOCOL.md 7, "Overload"; devastator/admission.py).

The admission control's decisions with a fake clock and fake signals; then
the server in this process for what a client sees (-32003 with
``retry_after_ms``, reads held back, ``conn.close`` 1013, the per-user
connection cap, a full store queue); then a real flood against a server in a
subprocess (the benchmark's --overload mode), where the server's CPU and the
bystanders' latency are measured apart from the clients'.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gevent
import gevent.event
import orjson
import pytest
import websocket

from conftest import start_server
from load import StallingStore
from devastator.admission import (
    DECREASE,
    FLOOR,
    INCREASE,
    RETRY_SPREAD,
    SAMPLE_INTERVAL,
    AdmissionControl,
    AdmissionLimits,
)
from devastator.actors.messages import StoredUserQuery
from devastator.protocol.errors import OVERLOADED, Overloaded
from devastator.telemetry import Telemetry
from wire import RawTls, request

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0


# -- the admission control's decisions (no sockets) -----------------------------------------------


class Machine:
    """What the admission control reads, made up: the time, CPU seconds, memory, the store's queue."""

    def __init__(self):
        self.now = 1000.0
        self.cpu = 0.0
        self.memory = 100 << 20
        self.queue = 0
        self.telemetry = Telemetry()

    def control(self, **limits) -> AdmissionControl:
        return AdmissionControl(
            AdmissionLimits(**limits),
            telemetry=self.telemetry,
            store_queue=lambda: self.queue,
            clock=lambda: self.now,
            cpu_seconds=lambda: self.cpu,
            memory=lambda: self.memory,
        )

    def run(self, control: AdmissionControl, seconds: float, *, cores: float = 0.0, lag: float = 0.0) -> None:
        """Let ``seconds`` pass, sampled as the sampler greenlet does, with the process using ``cores``."""
        for _ in range(round(seconds / SAMPLE_INTERVAL)):
            self.now += SAMPLE_INTERVAL
            self.cpu += cores * SAMPLE_INTERVAL
            control.sample(lag=lag)


def admitted(connection, count: int) -> int:
    return sum(connection.admit_send() is None for _ in range(count))


def assert_told_to_wait(refusal, low_ms: float, high_ms: float) -> None:
    assert isinstance(refusal, Overloaded) and refusal.code == OVERLOADED
    assert low_ms <= refusal.retry_after_ms <= high_ms * (1 + RETRY_SPREAD) + 1, refusal.retry_after_ms


def test_a_connection_over_its_send_rate_is_told_when_to_come_back():
    machine = Machine()
    connection = machine.control(connection_send_rate=10, connection_send_burst=4).connection()
    assert connection.claim("alice", "phone") is None
    assert admitted(connection, 4) == 4
    refusal = connection.admit_send()
    # Back when half the burst has come back: 2 sends at 10 a second.
    assert_told_to_wait(refusal, 200, 200)
    assert "send rate of this connection" in refusal.message
    assert machine.telemetry.sends_rate_limited == {"connection": 1}
    machine.now += 0.2
    assert admitted(connection, 3) == 2


def test_a_user_s_connections_share_its_send_rate_and_others_have_their_own():
    machine = Machine()
    control = machine.control(user_send_rate=10, user_send_burst=3)
    phone, laptop, bob = control.connection(), control.connection(), control.connection()
    for connection, user, device in ((phone, "alice", "phone"), (laptop, "alice", "laptop"), (bob, "bob", "x")):
        assert connection.claim(user, device) is None
    assert admitted(phone, 2) == 2
    assert admitted(laptop, 1) == 1
    refusal = laptop.admit_send()
    assert_told_to_wait(refusal, 150, 150)
    assert "send rate of this user" in refusal.message
    assert admitted(bob, 3) == 3
    # The user's bucket lives while the user has a connection here.
    phone.release()
    laptop.release()
    again = control.connection()
    assert again.claim("alice", "phone") is None
    assert admitted(again, 3) == 3


def test_a_user_has_at_most_its_cap_of_connections_but_a_device_may_replace_its_own():
    machine = Machine()
    control = machine.control(max_connections_per_user=2)
    first, second, third, replacing = (control.connection() for _ in range(4))
    assert first.claim("alice", "phone") is None
    assert second.claim("alice", "laptop") is None
    refusal = third.claim("alice", "tablet")
    assert_told_to_wait(refusal, 1000, 1000)
    assert "2 connections already" in refusal.message
    assert replacing.claim("alice", "phone") is None  # it replaces the phone's older connection
    assert control.connection().claim("bob", "phone") is None
    assert machine.telemetry.connections_refused == {"user_connections": 1}
    replacing.release()
    first.release()
    assert third.claim("alice", "tablet") is None


def test_past_the_cpu_limit_connections_are_refused_and_allowances_shrink_then_grow_back(caplog):
    machine = Machine()
    control = machine.control(cpu=0.8, connection_send_rate=100, connection_send_burst=100)
    machine.run(control, 1.0, cores=0.5)
    assert (control.overloaded, control.allowance, control.refuse_connection()) == (None, 1.0, None)
    caplog.set_level(logging.INFO, logger="devastator.admission")
    machine.run(control, 0.3, cores=1.0)
    assert control.overloaded == "cpu"
    assert control.refuse_connection() == "cpu"
    assert machine.telemetry.connections_refused == {"cpu": 1}
    assert control.allowance <= DECREASE
    machine.run(control, 1.0, cores=1.0)
    assert control.allowance == FLOOR
    # A heavy connection now has 5 of its 100 a second, and is told it is overload, not its own rate.
    flood = control.connection()
    assert admitted(flood, 100) == 5
    refusal = flood.admit_send()
    assert "overloaded (cpu)" in refusal.message and machine.telemetry.sends_shed == {"cpu": 96}
    # Once the CPU is back under its limit the allowance grows back, a step at a time.
    machine.run(control, 0.3, cores=0.1)
    assert control.overloaded is None and control.refuse_connection() is None
    assert FLOOR < control.allowance < 0.2
    machine.run(control, (1 - FLOOR) / INCREASE * SAMPLE_INTERVAL, cores=0.1)
    assert control.allowance == 1.0
    # One line when the overload begins, one when it ends.
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records] == [
        ("WARNING", "overloaded (cpu)"), ("INFO", "overload over")]


def test_a_user_sending_at_a_person_s_pace_goes_on_while_a_flood_is_refused():
    machine = Machine()
    control = machine.control(cpu=0.8, connection_send_rate=100, connection_send_burst=200)
    person, flood = control.connection(), control.connection()
    person_refused = flood_admitted = 0
    for _ in range(100):  # 10 s past the CPU limit: the allowance at its floor, 5 sends a second
        machine.run(control, SAMPLE_INTERVAL, cores=1.0)
        if round(machine.now * 10) % 5 == 0:  # the person: 2 a second
            person_refused += person.admit_send() is not None
        flood_admitted += admitted(flood, 50)
    assert person_refused == 0
    assert flood_admitted < 5 * 10 + 200


def test_past_the_memory_or_store_queue_limit_every_send_is_shed():
    machine = Machine()
    control = machine.control(memory_bytes=200 << 20, store_queue=100, retry_after=2.0)
    connection = control.connection()
    machine.memory = 300 << 20
    machine.run(control, SAMPLE_INTERVAL)
    assert control.overloaded == "memory"
    assert_told_to_wait(connection.admit_send(), 2000, 2000)
    machine.memory, machine.queue = 100 << 20, 101
    machine.run(control, SAMPLE_INTERVAL)
    assert control.overloaded == "store_queue"
    assert connection.admit_send() is not None
    assert control.refuse_connection() == "store_queue"
    assert machine.telemetry.sends_shed == {"memory": 1, "store_queue": 1}
    machine.queue = 0
    machine.run(control, SAMPLE_INTERVAL)
    assert control.overloaded is None and connection.admit_send() is None


def answer_after(machine: Machine, connection, control: AdmissionControl, wait: float, seconds: float) -> None:
    """Sends answered ``wait`` seconds after they were sent, one every 10 ms for ``seconds``."""
    for _ in range(round(seconds / SAMPLE_INTERVAL)):
        for _ in range(10):
            connection.sent()
            machine.now += wait
            connection.answered(1)
            machine.now -= wait - 0.01
        control.sample(lag=0.0)


def test_sends_waiting_longer_than_usual_is_overload_but_a_slow_disk_is_not():
    machine = Machine()
    control = machine.control(send_wait=0.02)
    connection = control.connection()
    answer_after(machine, connection, control, 0.030, 2.0)  # every commit takes 30 ms on this disk
    assert control.overloaded is None
    answer_after(machine, connection, control, 0.080, 0.5)  # a queue that does not drain
    assert control.overloaded == "send_wait"
    assert round(control.load.send_wait, 3) == 0.05 and round(control.load.usual_send_wait, 3) == 0.03
    answer_after(machine, connection, control, 0.035, 0.5)
    assert control.overloaded is None


def test_a_connection_keeps_its_share_of_the_store_s_queue_and_one_alone_is_not_bound():
    machine = Machine()
    control = machine.control(sends_in_flight=10)
    flood, person = control.connection(), control.connection()
    for _ in range(20):  # alone, it waits behind nobody's sends but its own
        assert flood.admit_send() is None
        flood.sent()
    person.sent()  # someone else's send now waits behind those 20
    refusal = flood.admit_send()
    assert "its share" in refusal.message and machine.telemetry.sends_shed == {"sends_in_flight": 1}
    assert person.admit_send() is None  # 1 waiting, fewer than its share of 10 (5)
    flood.answered(16)
    person.answered(1)
    assert flood.admit_send() is None  # 4 waiting, alone again
    # A connection that ends takes its waiting sends out of the count.
    flood.release()
    assert control.snapshot()["sends_in_flight"] == 0


def test_an_event_loop_running_late_is_overload():
    machine = Machine()
    control = machine.control(loop_lag=0.1)
    machine.run(control, 0.5, lag=0.05)
    assert control.overloaded is None
    machine.run(control, 0.3, lag=0.2)
    assert control.overloaded == "loop_lag"


# -- what a client sees (the server in this process) -----------------------------------------------


def read_answers(raw: RawTls, ids: list) -> dict:
    """The answers to ``ids``, by id (they may come in one batch or one by one)."""
    answers: dict = {}
    while len(answers) < len(ids):
        value = raw.read_one()
        for item in value if isinstance(value, list) else [value]:
            answers[item["id"]] = item
    return answers


def deliveries(raw: RawTls, count: int) -> list[dict]:
    """The next ``count`` ``msg.recv`` requests, whether they come one by one or in batches."""
    received: list[dict] = []
    while len(received) < count:
        value = raw.read_one()
        received.extend(value if isinstance(value, list) else [value])
    assert all(item["method"] == "msg.recv" for item in received), received
    return received


def retry_after_ms(answer: dict) -> int:
    assert answer["error"]["code"] == OVERLOADED, answer
    wait = answer["error"]["data"]["retry_after_ms"]
    assert isinstance(wait, int) and wait > 0, answer
    return wait


def http_get(running, path: str) -> bytes:
    host, port = running.http_address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT) as response:
        return response.read()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.02)


def test_sends_over_a_connection_s_rate_get_32003_and_its_reads_wait_that_long(servers):
    running = servers(connection_send_rate=20, connection_send_burst=5)
    listener = running.connect("listener")
    raw = RawTls(running)
    raw.auth(running.token("alice"))
    ids = [f"s{n}" for n in range(8)]
    sent = time.monotonic()
    raw.send_value([request("msg.send", {"to": "listener", "message": n}, id) for n, id in enumerate(ids)])
    answers = read_answers(raw, ids)
    accepted = [answers[id]["result"]["id"] for id in ids if "result" in answers[id]]
    waits = [retry_after_ms(answers[id]) for id in ids if "error" in answers[id]]
    assert len(accepted) == 5 and len(waits) == 3
    assert all(125 <= wait <= 125 * (1 + RETRY_SPREAD) + 1 for wait in waits)  # 2.5 sends at 20 a second
    # Nothing it sends before then is handled: even a ping is answered only after the wait.
    raw.assert_open()
    assert time.monotonic() - sent >= min(waits) / 1000
    assert sorted(listener.receive(timeout=WAIT)["id"] for _ in accepted) == sorted(accepted)
    answer = raw.call("msg.send", {"to": "listener", "message": "after the wait"}, id="later")
    assert "result" in answer, answer
    assert listener.receive(timeout=WAIT)["message"] == "after the wait"
    assert b'devastator_sends_rate_limited_total{limit="connection"} 3.0' in http_get(running, "/metrics")
    overload = orjson.loads(http_get(running, "/debug/vars"))["overload"]
    assert overload["sends_rate_limited"] == {"connection": 3} and overload["overloaded"] is None


def test_one_user_s_flood_gets_32003_while_another_user_is_served(servers):
    running = servers(connection_send_rate=200, connection_send_burst=100)
    bob, carol = running.connect("bob"), running.connect("carol")
    dave = running.connect("dave")
    flood = RawTls(running)
    flood.auth(running.token("mallory"))
    answered: dict[str, dict] = {}
    batch = 100

    def read_flood_answers():
        while True:
            for item in flood.read_one():
                answered[item["id"]] = item

    reader = gevent.spawn(read_flood_answers)
    try:
        for start in range(0, 1500, batch):  # as fast as it can, reading no answer before sending on
            flood.send_value([request("msg.send", {"to": "bob", "message": n}, f"f{n}")
                              for n in range(start, start + batch)])
        for n in range(20):
            carol.send("dave", n)
        assert [dave.receive(timeout=WAIT)["message"] for _ in range(20)] == list(range(20))
        deadline = time.monotonic() + 30
        while len(answered) < 1500:
            assert time.monotonic() < deadline, f"{len(answered)} of 1500 flood sends answered"
            gevent.sleep(0.05)
    finally:
        reader.kill()
    stored = [item["result"]["id"] for item in answered.values() if "result" in item]
    shed = [item for item in answered.values() if "error" in item]
    assert stored and shed and len(stored) + len(shed) == 1500
    assert all(retry_after_ms(item) for item in shed)
    # Every one answered as stored arrives; none of the refused ones.
    assert sorted(bob.receive(timeout=WAIT)["id"] for _ in stored) == sorted(stored)
    with pytest.raises(TimeoutError):
        bob.receive(timeout=0.2)


def test_a_user_over_its_connection_cap_gets_32003_then_1013(servers):
    running = servers(max_connections_per_user=2)
    phone = running.connect("alice", "phone")
    laptop = running.connect("alice", "laptop")
    extra = RawTls(running)
    answer = extra.call("auth.jwt", {"token": running.token("alice", "tablet")}, id="auth")
    assert answer["id"] == "auth" and retry_after_ms(answer) >= 1000
    assert "as many as allowed" in answer["error"]["message"]
    close = extra.read_one()
    assert close["method"] == "conn.close" and close["params"]["code"] == 1013
    extra.assert_closed()
    # The phone connecting again replaces its older connection; once the laptop goes, the tablet may come.
    running.connect("alice", "phone")
    assert phone.closed.wait(WAIT) and phone.close_reason.code == 4001
    authenticated = running.server.telemetry
    wait_for(lambda: authenticated.devices_authenticated == 2, "the replaced connection to end")
    laptop.close()
    wait_for(lambda: authenticated.devices_authenticated == 1, "the laptop's connection to end")
    tablet = running.connect("alice", "tablet")
    assert tablet.ping() == "pong"
    overload = orjson.loads(http_get(running, "/debug/vars"))["overload"]
    assert overload["connections_refused"] == {"user_connections": 1}


def test_a_full_store_queue_sheds_sends_and_refuses_connections_while_open_ones_are_served(settings):
    store = StallingStore(settings.db_path, synchronous=settings.sqlite_synchronous)
    running = start_server(settings.replace(overload_store_queue=5, ack_timeout=0.5), store=store)
    try:
        alice = running.connect("alice")
        bob = RawTls(running)
        bob.auth(running.token("bob"))
        first = alice.send("bob", "before")["id"]
        assert bob.read_one()["id"] == first  # delivered, not ACKed yet
        store.stall = True
        stuck = [alice.send_async("bob", n) for n in range(8)]  # they wait in the store actor's inbox
        assert store.stalled.wait(WAIT)
        admission = running.server.admission
        wait_for(lambda: admission.overloaded == "store_queue", "the store queue to count as overload")

        # A new connection is told why and closed, on TLS after the handshake...
        refused = RawTls(running)
        close = refused.read_one()
        assert close == {"jsonrpc": "2.0", "method": "conn.close",
                         "params": {"code": 1013, "reason": "overloaded (store_queue): try again later"}}
        refused.assert_closed()
        # ...and on WebSocket after the upgrade, with a close frame of the same code.
        host, port = running.http_address
        ws = websocket.create_connection(f"ws://{host}:{port}/ws", timeout=WAIT)
        assert json.loads(ws.recv())["params"]["code"] == 1013
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1013
        ws.close()
        # A new send is shed, and said when to come back...
        with pytest.raises(Overloaded) as shed:
            alice.send("bob", "shed")
        assert 1000 <= shed.value.retry_after_ms <= 1000 * (1 + RETRY_SPREAD) + 1
        # ...while a connected device is still served: the unACKed delivery comes again, and its ACK is taken.
        again = bob.read_one()
        assert again["id"] == first and again["method"] == "msg.recv"
        bob.send_value({"jsonrpc": "2.0", "id": first, "result": "ACK"})

        store.released.set()
        answered = [pending.wait(WAIT)["id"] for pending in stuck]  # nothing taken on is lost
        received = deliveries(bob, len(answered))
        assert [m["id"] for m in received] == answered
        bob.send_value([{"jsonrpc": "2.0", "id": m["id"], "result": "ACK"} for m in received])
        wait_for(lambda: admission.overloaded is None, "the overload to end")
        assert running.connect("carol").ping() == "pong"
        telemetry = running.server.telemetry
        assert telemetry.connections_refused == {"store_queue": 2}
        assert telemetry.sends_shed == {"store_queue": 1}
        # Every ACK bob sent, the one taken during the overload too, reached the store.
        wait_for(lambda: not running.server.store_ref.ask(StoredUserQuery("bob"))["backlog"], "bob's ACKs")
    finally:
        store.released.set()
        running.close_clients()
        running.server.stop()


# -- a real flood, against a server in a subprocess ----------------------------------------------------

# The bystanders' latency while 30 users flood the server. On this 2-core machine, alone they
# see p50 3-8 ms and p99 8-21 ms. The same flood taken on unchecked (the overload limits and
# rate limits off) puts the server at 0.98 cores and the bystanders at p50 ~100 ms, p99 ~140 ms,
# on a quiet machine. With the defaults: p50 4-9 ms and p99 35-60 ms on a quiet machine; p50 up
# to 33 ms and p99 up to 99 ms with two whole suites and another such flood running beside it.
BYSTANDER_P50_BOUND_MS = 50
BYSTANDER_P99_BOUND_MS = 150
CPU_LIMIT_CORES = 0.95  # the rule the defaults keep: never more than 95% of a core


def test_a_flood_is_shed_while_bystanders_keep_sending_and_receiving():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--overload", "--pairs", "10", "--flooders", "30",
         "--window", "50", "--warmup", "1", "--duration", "6", "--grace", "10", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report  # it checks every message answered as stored arrived
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["flood_shed"] > 0 and figures["flood_shed_without_retry_after"] == 0, report
    assert figures["server_cpu_cores"] < CPU_LIMIT_CORES, report
    assert figures["p50_ms"] < BYSTANDER_P50_BOUND_MS and figures["p99_ms"] < BYSTANDER_P99_BOUND_MS, report
    assert figures["flood_messages"] >= 0.9 * figures["baseline_messages"], report  # they kept their pace
    for check in ("lost", "duplicates", "out_of_order", "misaddressed", "rpc_errors", "connection_errors"):
        assert figures[check] == 0, report
