"""Test set-up: gevent first, then a real server on ephemeral ports."""
from gevent import monkey

monkey.patch_all()  # before pykka or anything else imports threading

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pykka  # noqa: E402
import pytest  # noqa: E402

from devastator.auth import JwtAuthority  # noqa: E402
from devastator.client import Client  # noqa: E402
from devastator.config import Settings  # noqa: E402
from devastator.identity import DeviceIdentity  # noqa: E402
from devastator.secrets import JwtKeyFile  # noqa: E402
from devastator.server import Server  # noqa: E402
from devastator.store.factory import make_store  # noqa: E402


@pytest.fixture(autouse=True)
def stop_all_actors():
    yield
    pykka.ActorRegistry.stop_all()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        tls_port=0,
        http_port=0,
        ack_timeout=30.0,
        tick_interval=0.1,
        sqlite_synchronous="NORMAL",
        # An in-process server shares its CPU and event loop with the test's clients: these
        # overload signals would measure the test (tests/test_overload.py runs a server apart).
        overload_cpu_percent=0,
        overload_loop_lag=0,
        overload_send_wait=0,
    )


class RunningServer:
    """A started Server plus what tests need to reach it."""

    def __init__(self, server: Server):
        self.server = server
        self.settings = server.settings
        self.authority = JwtAuthority(JwtKeyFile(self.settings.data_dir))
        self._clients: list[Client] = []

    @property
    def tls_address(self) -> tuple[str, int]:
        return self.server.tls.address

    @property
    def http_address(self) -> tuple[str, int]:
        return self.server.http.address

    @property
    def ca(self) -> Path:
        return self.settings.data_dir / "ca.pem"

    def register(self, user: str, device: str = "default") -> DeviceIdentity:
        """Create the user and register the device, as ``devastator token`` does, in the server's store."""
        store = make_store(self.settings)
        store.open()
        try:
            now = int(time.time() * 1000)
            store.add_user(user, now)
            return DeviceIdentity(user, device, store.add_device(user, device, now))
        finally:
            store.close()

    def token(self, user: str, device: str = "default", ttl: int = 3600) -> str:
        """Register the device (if new) and mint a JWT for it."""
        return self.authority.mint(self.register(user, device), ttl)

    def tls_client(self, **kwargs) -> Client:
        host, port = self.tls_address
        client = Client.connect_tls("localhost", port, ca=self.ca, **kwargs)
        self._clients.append(client)
        return client

    def ws_client(self, **kwargs) -> Client:
        host, port = self.http_address
        client = Client.connect_ws(f"ws://{host}:{port}/ws", **kwargs)
        self._clients.append(client)
        return client

    def connect(self, user: str, device: str = "default", *, ws: bool = False, **kwargs) -> Client:
        client = self.ws_client(**kwargs) if ws else self.tls_client(**kwargs)
        client.auth_jwt(self.token(user, device))
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()


def start_server(settings: Settings, **kwargs) -> RunningServer:
    server = Server(settings, **kwargs)
    server.start()
    return RunningServer(server)


@pytest.fixture
def running(settings):
    running = start_server(settings)
    yield running
    running.close_clients()
    running.server.stop()


@pytest.fixture
def servers(settings):
    """Start servers with other settings (or another store); stops them after the test."""
    started: list[RunningServer] = []

    def start(store=None, **changes) -> RunningServer:
        kwargs = {"store": store} if store is not None else {}
        running = start_server(settings.replace(**changes), **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close_clients()
        running.server.stop()
