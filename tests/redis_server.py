"""A real redis-server for tests: an ephemeral port, its data in a directory, AOF fsynced on every write.

``RedisServer`` starts, stops (SIGTERM) and kills (SIGKILL) it, and starts it
again on the same port and directory, so crash tests can check that the
append-only file kept everything; it also pauses it (SIGSTOP: a blackhole,
connections open and nothing answered) and resumes it. ``ReplyCutter`` stands
between a client and Redis and, when armed, loses Redis's answers: the
commands run, the client never hears so. The fixtures give a session's tests
one server and each test a store of its own (a unique key prefix on it).

Without ``redis-server`` on PATH the tests that need it are skipped, except
under CI (``CI=true``), where they fail: CI must not pass by testing less.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from gevent.pool import Pool
from gevent.server import StreamServer

from devastator.store import RedisStore

EXECUTABLE = "redis-server"
CLUSTER_OPTIONS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", "2000")


def free_port(*, cluster: bool = False) -> int:
    """A port free on 127.0.0.1; for a cluster node also the bus port, 10000 above, under 65536."""
    if not cluster:
        return _bind_free(0)
    for _ in range(100):
        port = random.randrange(20000, 55535)
        try:
            _bind_free(port)
            _bind_free(port + 10000)
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _bind_free(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", port))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process; ``start()`` again after ``stop()`` or ``kill()`` reuses port and data."""

    def __init__(
        self,
        directory: Path | str,
        *,
        port: int | None = None,
        executable: str | None = None,
        cluster: bool = False,
    ):
        self.directory = Path(directory)
        self.cluster = cluster
        self.port = port or free_port(cluster=cluster)
        self.executable = executable or shutil.which(EXECUTABLE)
        if self.executable is None:
            raise FileNotFoundError(f"{EXECUTABLE} is not on PATH")
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log"),
                *(CLUSTER_OPTIONS if self.cluster else ()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        # A subprocess says nothing when it is ready: ask until it answers PING.
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self._process.returncode}; see {self.directory / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    # Loading a large append-only file also ends up here (BUSY LOADING).
                    pass
                except redis.ResponseError as error:
                    if "LOADING" not in str(error):
                        raise
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis finishes what it was doing and exits."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would: what Redis had not fsynced is lost."""
        self._end(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and Redis answers nothing, as behind a blackholed network."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: Redis goes on with what it was sent meanwhile."""
        self._process.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused process would not act on the signal
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ReplyCutter:
    """A TCP proxy to a redis-server that, while ``armed``, loses Redis's answers.

    Armed, it forwards what the client sends, and when Redis answers it
    closes the client's connection instead of forwarding the answer: the
    commands ran, and the client sees a connection closed under it.
    """

    def __init__(self, redis_port: int):
        self._redis_port = redis_port
        self._pumps = Pool(100)  # the connections and their pumps
        self._server = StreamServer(("127.0.0.1", 0), self._serve, spawn=self._pumps)
        self.armed = False
        self._let_through = 0  # answers still forwarded once armed
        self.cut = 0  # answers lost so far

    def arm(self, *, after: int = 0) -> None:
        """Lose answers from now on, after the next ``after`` (each one read from Redis)."""
        self._let_through = after
        self.armed = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.server_port}/0"

    def start(self) -> ReplyCutter:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=1)
        self._pumps.kill()

    def _serve(self, client: socket.socket, _address) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._redis_port))
        try:
            requests = self._pumps.spawn(self._pump, client, upstream)
            self._pump(upstream, client, answers=True)
            requests.kill()
        finally:
            upstream.close()
            client.close()

    def _pump(self, source: socket.socket, target: socket.socket, *, answers: bool = False) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if answers and self.armed:
                if self._let_through == 0:
                    self.cut += 1
                    return  # closing both ends: the client never hears what Redis answered
                self._let_through -= 1
            try:
                target.sendall(data)
            except OSError:
                return


def form_cluster(servers: list[RedisServer], timeout: float = 20.0) -> None:
    """Share the 16384 slots among started ``cluster=True`` servers and wait until all say "ok"."""
    clients = [redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True) for server in servers]
    try:
        share = 16384 // len(servers)
        for i, client in enumerate(clients):
            last = 16383 if i == len(clients) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for server in servers[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        deadline = time.monotonic() + timeout
        # The nodes gossip until each knows every slot's owner; nothing to wait on but their word.
        while not all("cluster_state:ok" in client.execute_command("CLUSTER", "INFO") for client in clients):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not form within {timeout} s")
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()


def require_redis_server() -> None:
    """Skip the test without redis-server; under CI, fail it."""
    if shutil.which(EXECUTABLE) is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{EXECUTABLE} is not on PATH, and CI must run the Redis store tests", pytrace=False)
    pytest.skip(f"{EXECUTABLE} is not on PATH")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session's tests."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """Three redis-servers forming one Redis Cluster (no replicas), for the session's tests."""
    require_redis_server()
    servers = [RedisServer(tmp_path_factory.mktemp(f"redis-node{i}"), cluster=True) for i in range(3)]
    try:
        for server in servers:
            server.start()
        form_cluster(servers)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def new_redis_store(redis_server):
    """Makes RedisStores (not open) on the session's server, each test's keys under a prefix of its own."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"

    def make(**options) -> RedisStore:
        options.setdefault("prefix", prefix)
        return RedisStore(redis_server.url, **options)

    return make
