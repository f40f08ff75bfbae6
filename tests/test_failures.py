"""Failure containment: what each actor's death means, injected one at a time into a real server.

Optional children (push providers) that die turn their platform off and the
server serves on; a device or user actor that fails is cleaned up as on a
stop, so that the router's counts stay true; a core actor (store, router,
push dispatcher) that dies stops the server with a failure, and the process
exits non-zero for its supervisor, having lost nothing it answered.
``/healthz`` says whether the store and the router answer.

Failures are injected by replacing one method of an actor class for the
test (monkeypatch), or, in a server subprocess, by a wrapper script that
does the same before it runs ``devastator.cli.main``: no core actor of this
server dies from anything a client or the store can do today (store errors
are answered, not raised), so a failure is put where a bug would be.
"""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import gevent
import gevent.event
import orjson
import pykka
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devastator.actors import DeviceActor, RouterActor, StoreActor, UserActor
from devastator.actors.messages import OnlineUsersQuery, PushDispatchQuery
from devastator.actors.push import PushDispatcherActor
from devastator.client import Client
from devastator.config import Settings, SettingsError
from devastator.operations import Operations
from devastator.protocol.errors import INVALID_PARAMS, RpcError
from devastator.push import PushCounters, PushPlatforms
from devastator.push.fcm import FcmProviderActor
from devastator.push.launch import provider_starters
from devastator.server import EXIT_CORE_FAILURE
from devastator.telemetry import Telemetry
from fake_fcm import fake_fcm, fake_fcm_key  # noqa: F401  (fixtures)

from conftest import start_server
from load import StallingStore

ROOT = Path(__file__).resolve().parent.parent
WAIT = 5.0
FCM_TOKEN = "fcm-registration-token-of-bobs-phone"
CLOSE_INTERNAL_ERROR = 1011


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def fail_once(monkeypatch, cls: type, name: str, when=lambda actor, *args: True) -> threading.Event:
    """Make ``cls.name`` raise the first time ``when(actor, *args)`` holds; the Event says it did."""
    original = getattr(cls, name)
    failed = threading.Event()

    def failing(self, *args, **kwargs):
        if not failed.is_set() and when(self, *args):
            failed.set()
            raise RuntimeError(f"injected failure in {cls.__name__}.{name}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, failing)
    return failed


def http_get(running, path: str) -> tuple[int, bytes]:
    host, port = running.http_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def healthz(running) -> tuple[int, dict]:
    status, body = http_get(running, "/healthz")
    return status, json.loads(body)


def debug_vars(running) -> dict:
    return orjson.loads(http_get(running, "/debug/vars")[1])


def metric(running, family: str, **labels) -> float | None:
    families = {f.name: f for f in text_string_to_metric_families(http_get(running, "/metrics")[1].decode())}
    for sample in families[family].samples:
        if all(sample.labels.get(key) == value for key, value in labels.items()):
            return sample.value
    return None


def online(running) -> dict:
    """The router's counts: user -> connections announced online."""
    return {user: figures["online"] for user, figures in running.server.router_ref.ask(OnlineUsersQuery()).items()}


def settled(running) -> None:
    """Everything told so far reached the dispatcher: router, then dispatcher, answer in order."""
    running.server.router_ref.ask(OnlineUsersQuery())
    (dispatcher,) = pykka.ActorRegistry.get_by_class(PushDispatcherActor)
    dispatcher.ask(PushDispatchQuery())


def failure_lines(caplog, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR and text in record.getMessage()]


@pytest.fixture
def fcm_settings(fake_fcm):  # noqa: F811
    return dict(
        fcm_service_account_file=fake_fcm.service_account_file,
        fcm_endpoint=fake_fcm.endpoint,
        fcm_token_uri=fake_fcm.token_uri,
        fcm_ca_file=fake_fcm.ca_file,
    )


def register_and_leave(running, device: str = "phone") -> None:
    phone = running.connect("bob", device)
    assert phone.call("push.register", {"platform": "fcm", "token": FCM_TOKEN}) == "ACK"
    phone.close()
    wait_until(lambda: online(running).get("bob", 0) == 0, "bob to be offline")


def assert_push_off_but_serving(running, caplog) -> None:
    """The fcm platform is off, said once; everything else serves on."""
    assert "fcm" not in running.server.push_platforms
    carol = running.connect("carol", "tablet")
    with pytest.raises(RpcError) as refused:
        carol.call("push.register", {"platform": "fcm", "token": "another-token"})
    assert refused.value.code == INVALID_PARAMS and "fcm" in refused.value.message
    alice = running.connect("alice")
    sent = alice.send("carol", "still served")
    assert carol.receive(timeout=WAIT)["id"] == sent["id"]
    assert running.server.router_ref.is_alive()
    assert pykka.ActorRegistry.get_by_class(PushDispatcherActor)
    assert healthz(running) == (200, {"status": "ok"})
    assert metric(running, "devastator_push_provider_up", provider="fcm") == 0
    assert metric(running, "devastator_actor_failures", kind="FcmProviderActor") == 1
    assert debug_vars(running)["push_providers_running"] == {"fcm": False}
    assert len(failure_lines(caplog, "push provider fcm failed")) == 1


# -- optional children: push providers -----------------------------------------------------------


def test_a_provider_that_dies_at_start_turns_its_platform_off(servers, fcm_settings, monkeypatch, caplog):
    fail_once(monkeypatch, FcmProviderActor, "on_start")
    running = servers(**fcm_settings)
    wait_until(lambda: "fcm" not in running.server.push_platforms, "the fcm platform to be turned off")
    assert_push_off_but_serving(running, caplog)


def test_a_provider_that_dies_while_running_turns_its_platform_off(
    servers, fcm_settings, fake_fcm, monkeypatch, caplog  # noqa: F811
):
    running = servers(**fcm_settings)
    register_and_leave(running)
    died = fail_once(monkeypatch, FcmProviderActor, "on_receive")  # the next message it takes: a PushRequest
    alice = running.connect("alice")
    first = alice.send("bob", "wake up")
    assert died.wait(WAIT)
    wait_until(lambda: "fcm" not in running.server.push_platforms, "the fcm platform to be turned off")
    second = alice.send("bob", "no push for this one: fcm is off")
    settled(running)
    assert fake_fcm.accepted == []

    assert_push_off_but_serving(running, caplog)
    phone = running.connect("bob", "phone")  # its messages waited in the store
    assert [phone.receive(timeout=WAIT)["id"] for _ in range(2)] == [first["id"], second["id"]]


def test_a_malformed_apns_certificate_stops_the_start_naming_the_setting(tmp_path):
    cert = tmp_path / "push.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    settings = Settings(apns_topic="com.example.app", apns_cert_file=cert)
    counters = {platform: PushCounters() for platform in ("apns", "gcm", "fcm")}
    with pytest.raises(SettingsError, match="apns_cert_file"):
        provider_starters(settings, counters, env={})


def test_a_malformed_apns_key_stops_the_start_naming_the_setting(tmp_path):
    key = tmp_path / "AuthKey_ABCDE12345.p8"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    settings = Settings(apns_topic="com.example.app", apns_key_file=key, apns_key_id="ABCDE12345",
                        apns_team_id="TEAM123456")
    counters = {platform: PushCounters() for platform in ("apns", "gcm", "fcm")}
    with pytest.raises(SettingsError, match="apns_key_file"):
        provider_starters(settings, counters, env={})


# -- device and user actors: cleaned up as on a stop -------------------------------------------------


def test_a_device_actor_failing_mid_delivery_is_cleaned_up_and_pushes_go_on(
    servers, fcm_settings, fake_fcm, monkeypatch  # noqa: F811
):
    running = servers(**fcm_settings, user_idle_timeout=0.3)
    phone = running.connect("bob", "phone")
    assert phone.call("push.register", {"platform": "fcm", "token": FCM_TOKEN}) == "ACK"
    alice = running.connect("alice")
    failed = fail_once(monkeypatch, DeviceActor, "_deliver", when=lambda device, deliver: device.user == "bob")

    first = alice.send("bob", "one")  # answered: it is stored, whatever happens to bob's connection
    assert failed.wait(WAIT)
    assert phone.closed.wait(WAIT)
    assert phone.close_reason.code == CLOSE_INTERNAL_ERROR  # told why: the client reconnects

    # The router heard it leave: its counts, the user actor's idling and pushes go on.
    wait_until(lambda: "bob" not in online(running), "bob's user actor to idle and stop")
    second = alice.send("bob", "two")
    fake_fcm.wait_for(lambda: len(fake_fcm.accepted) == 1)
    figures = debug_vars(running)
    assert figures["devices_authenticated"] == 1  # alice
    assert figures["connections"]["open"]["tls"] == 1
    assert figures["actor_failures"] == {"DeviceActor": 1}
    assert healthz(running) == (200, {"status": "ok"})

    again = running.connect("bob", "phone", dedupe=False)
    assert [again.receive(timeout=WAIT)["id"] for _ in range(2)] == [first["id"], second["id"]]
    again.ping()  # its ACKs were read before this answer; a duplicate would have come before it
    assert again.messages.empty()
    assert debug_vars(running)["messages"]["pending"] == 0


def test_a_user_actor_that_fails_closes_its_connections_and_a_fresh_one_serves_them(running, monkeypatch):
    phone = running.connect("bob", "phone")
    tablet = running.connect("bob", "tablet")
    alice = running.connect("alice")
    failed = fail_once(monkeypatch, UserActor, "_on_committed", when=lambda user, committed: user.user == "bob")

    first = alice.send("bob", "one")
    assert failed.wait(WAIT)
    for connection in (phone, tablet):
        assert connection.closed.wait(WAIT)
        assert connection.close_reason.code == CLOSE_INTERNAL_ERROR
    wait_until(lambda: online(running).get("bob", 0) == 0, "bob's connections to be counted offline")

    phone = running.connect("bob", "phone")
    assert online(running)["bob"] == 1
    assert phone.receive(timeout=WAIT)["id"] == first["id"]
    second = alice.send("bob", "two")
    assert phone.receive(timeout=WAIT)["id"] == second["id"]
    figures = debug_vars(running)
    assert figures["actor_failures"] == {"UserActor": 1}
    assert figures["devices_authenticated"] == 2
    assert figures["actors"]["UserActor"]["count"] == 2


# -- /healthz -------------------------------------------------------------------------------------


def test_healthz_answers_503_while_the_store_actor_is_stuck(settings):
    store = StallingStore(settings.db_path, synchronous=settings.sqlite_synchronous)
    running = start_server(settings, store=store)
    try:
        alice = running.connect("alice")
        assert healthz(running) == (200, {"status": "ok"})
        store.stall = True
        pending = alice.send_async("alice", "stuck behind the store")
        assert store.stalled.wait(WAIT)

        status, body = healthz(running)
        assert status == 503
        assert body == {"status": "unavailable", "reason": "the store actor did not answer within 1 s"}

        store.released.set()
        assert pending.wait(WAIT)["id"]  # nothing lost: answered once the store is back
        assert healthz(running) == (200, {"status": "ok"})
    finally:
        store.released.set()
        running.close_clients()
        running.server.stop()


class _Quiet(pykka.ThreadingActor):
    def on_receive(self, message):
        return None


def test_healthz_names_an_actor_that_is_not_running():
    live, dead = _Quiet.start(), _Quiet.start()
    dead.stop()
    operations = Operations(telemetry=Telemetry(), push_counters={}, store=live, router=dead,
                            greenlets=lambda: 0, node="test", push_platforms=PushPlatforms())
    assert operations.health() == (503, b'{"status":"unavailable","reason":"the router actor is not running"}')
    operations = Operations(telemetry=Telemetry(), push_counters={}, store=live, router=live,
                            greenlets=lambda: 0, node="test")
    assert operations.health() == (200, b'{"status":"ok"}')
    assert operations.health("the store actor died")[0] == 503


# -- core actors: the server stops with a failure ----------------------------------------------------


def restart_and_receive(settings: Settings, running, count: int, user: str = "bob") -> list[str]:
    """Start a server again on the same data directory and read ``user``'s messages, every copy."""
    again = start_server(settings)
    try:
        client = again.connect(user, dedupe=False)
        ids = [client.receive(timeout=WAIT)["id"] for _ in range(count)]
        client.ping()
        assert client.messages.empty()  # nothing delivered twice
        return ids
    finally:
        again.close_clients()
        again.server.stop()


@pytest.mark.parametrize("name, cls, method", [
    ("store", StoreActor, "_checkpoint_if_due"),  # after a commit's answers were told
    ("router", RouterActor, "_route_committed"),  # a commit's news, after the store answered the sender
])
def test_a_core_actor_dying_stops_the_server_and_loses_nothing_answered(
    settings, servers, monkeypatch, caplog, name, cls, method
):
    running = servers()
    running.token("bob")
    alice = running.connect("alice")
    answered = [alice.send("bob", n)["id"] for n in range(3)]
    failed = fail_once(monkeypatch, cls, method)
    pending = alice.send_async("bob", "the one that kills")

    assert failed.wait(WAIT)
    assert running.server.wait_stopped(WAIT * 2)
    assert running.server.failure == f"the {name} actor died"
    assert [r.levelno for r in caplog.records if f"the {name} actor died" in r.getMessage()] == [logging.CRITICAL]
    with pytest.raises(OSError):  # its listeners are closed: clients go to another server, or wait
        running.tls_client()
    try:
        answered.append(pending.wait(WAIT)["id"])
    except ConnectionError:
        pass  # not answered: may be stored or not, and without a cid a retry could store it twice
    received = restart_and_receive(settings, running, len(answered))
    assert received == answered


def test_the_push_dispatcher_dying_stops_the_server(servers, fcm_settings, monkeypatch, caplog):
    running = servers(**fcm_settings)
    register_and_leave(running)
    failed = fail_once(monkeypatch, PushDispatcherActor, "_wake")
    sent = running.connect("alice").send("bob", "wake bob")
    assert failed.wait(WAIT)
    assert running.server.wait_stopped(WAIT * 2)
    assert running.server.failure == "the push dispatcher actor died"
    assert failure_lines(caplog, "the push dispatcher actor died")
    assert restart_and_receive(running.settings, running, 1) == [sent["id"]]


# -- a server process: a core actor dies under load, the process exits non-zero -------------------

ROUTER_FAILS_ON_A_REMOVAL = textwrap.dedent('''\
    """bin/devastator, with one bug put into the router: it fails on the removal of a device named "crash"."""
    import sys

    sys.path.insert(0, {root!r})

    from gevent import monkey

    monkey.patch_all()

    from devastator.actors.router import RouterActor

    handle_removals = RouterActor._on_devices_removed


    def failing(self, removed):
        if any(device == "crash" for _, device in removed.devices):
            raise RuntimeError("injected router failure")
        handle_removals(self, removed)


    RouterActor._on_devices_removed = failing

    from devastator.cli import main

    sys.exit(main())
''')


STORE_STICKS_ON_A_SEND = textwrap.dedent('''\
    """bin/devastator, with a store that never returns from a send by "stuck": a blackholed disk or Redis."""
    import sys

    sys.path.insert(0, {root!r})

    from gevent import monkey

    monkey.patch_all()

    import threading

    from devastator.store.sqlite import SqliteStore

    append_many = SqliteStore.append_many


    def sticking(self, sends, now_ms):
        if any(send[0] == "stuck" for send in sends):
            threading.Event().wait()  # forever
        return append_many(self, sends, now_ms)


    SqliteStore.append_many = sticking

    from devastator.cli import main

    sys.exit(main())
''')


class ServerProcess:
    """A server subprocess on ports 0; the ports are read from its log."""

    def __init__(self, data_dir: Path, log_path: Path, command: list[str]):
        self.data_dir = data_dir
        self.log_path = log_path
        self.command = command
        self.process: subprocess.Popen | None = None
        self.tls_port = self.http_port = 0

    def start(self) -> None:
        self.log_path.write_bytes(b"")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.command, "--data-dir", str(self.data_dir), "--tls-port", "0", "--http-port", "0"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while b"Devastator started" not in self.log_path.read_bytes():
            assert self.process.poll() is None, f"the server exited while starting:\n{self.log()}"
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.05)
        log = self.log_path.read_bytes()
        self.tls_port = int(re.search(rb"TLS endpoint listening on [^ ]+:(\d+)", log).group(1))
        self.http_port = int(re.search(rb"HTTP/WebSocket endpoint listening on [^ ]+:(\d+)", log).group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, str(ROOT / "bin" / "devastator"), *args, "--data-dir", str(self.data_dir)],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout

    def token(self, user: str, device: str = "default") -> str:
        return self.cli("token", user, "--device", device).strip().splitlines()[-1]

    def client(self, **kwargs) -> Client:
        return Client.connect_tls("localhost", self.tls_port, ca=self.data_dir / "ca.pem", **kwargs)

    def healthz(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=WAIT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def process_dir(tmp_path):
    started: list[ServerProcess] = []

    def make(command: list[str]) -> ServerProcess:
        server = ServerProcess(tmp_path / "data", tmp_path / f"server-{len(started)}.log", command)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def test_a_router_failure_under_load_exits_the_process_non_zero_losing_nothing_answered(tmp_path, process_dir):
    wrapper = tmp_path / "devastator_with_a_bug.py"
    wrapper.write_text(ROUTER_FAILS_ON_A_REMOVAL.format(root=str(ROOT)))
    buggy = process_dir([sys.executable, str(wrapper)])
    buggy.start()
    alice_token, bob_token = buggy.token("alice"), buggy.token("bob")
    buggy.token("alice", "crash")
    alice = buggy.client()
    alice.auth_jwt(alice_token)
    answered: list[str] = []

    def keep_sending() -> None:
        n = 0
        while True:
            window = [alice.send_async("bob", {"n": n + k}) for k in range(50)]
            n += 50
            for pending in window:
                answered.append(pending.wait(10)["id"])  # raises once the server is gone

    sender = gevent.spawn(keep_sending)
    with gevent.Timeout(30):
        while len(answered) < 500:
            gevent.sleep(0.01)
    buggy.cli("device", "remove", "alice", "crash")  # the router polls removals every second

    assert buggy.process.wait(30) == EXIT_CORE_FAILURE
    sender.join(10)
    assert sender.dead
    log = buggy.log()
    assert "the router actor died" in log and "injected router failure" in log
    assert "Devastator stopped" in log
    alice.close()

    restarted = process_dir([sys.executable, str(ROOT / "bin" / "devastator")])
    restarted.start()
    bob = restarted.client(dedupe=False)
    pending = bob.auth_jwt(bob_token)["pending"]
    assert pending >= len(answered)  # the unanswered sends may have been stored too
    received = [bob.receive(timeout=10)["id"] for _ in range(pending)]
    bob.ping()
    assert bob.messages.empty()
    assert len(set(received)) == len(received)  # none twice
    assert received[: len(answered)] == answered  # none lost, in order
    bob.close()


def test_a_server_whose_store_is_stuck_still_exits_when_told_to(tmp_path, process_dir):
    wrapper = tmp_path / "devastator_with_a_stuck_store.py"
    wrapper.write_text(STORE_STICKS_ON_A_SEND.format(root=str(ROOT)))
    server = process_dir([sys.executable, str(wrapper)])
    server.start()
    stuck = server.client()
    stuck.auth_jwt(server.token("stuck"))
    assert server.healthz() == (200, {"status": "ok"})
    stuck.send_async("stuck", "this send never returns from the store")
    unavailable = (503, {"status": "unavailable", "reason": "the store actor did not answer within 1 s"})
    wait_until(lambda: server.healthz() == unavailable, "/healthz to say the store is stuck")

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == EXIT_CORE_FAILURE  # a store that cannot stop is not a clean stop
    log = server.log()
    assert "StoreActor did not stop within 5 s" in log
    assert "actor threads did not stop (StoreActor" in log  # and the process did not wait for it
    assert "Traceback" not in log
    stuck.close()


def test_a_store_that_cannot_open_stops_the_start_with_one_clear_line(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    Settings(data_dir=data_dir).db_path.write_bytes(b"not a SQLite database " * 100)
    started = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "devastator"), "--data-dir", str(data_dir),
         "--tls-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert started.returncode == 1
    assert "cannot start: the store actor failed at its start" in started.stderr
    assert "Devastator started" not in started.stderr
    assert "devastator/cli.py" not in started.stderr  # the start's own error is one line, not a traceback
