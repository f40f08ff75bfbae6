"""Why a connection closes (PROTOCOL.md 7) on the TLS endpoint, and what the Python client does with it.

Before the server closes a connection for a reason of its own it sends the
``conn.close`` notification; the WebSocket side of the same rule (close
frames with the code) is in test_websocket_rfc6455.py.
"""
from __future__ import annotations

import gevent
import pytest

from devastator.store import SqliteStore
from test_admin import AdminClient
from wire import RawTls

WAIT = 5.0


def conn_close(code: int, reason: str) -> dict:
    return {"jsonrpc": "2.0", "method": "conn.close", "params": {"code": code, "reason": reason}}


def remove_device(running, user: str, device: str) -> None:
    store = SqliteStore(running.settings.db_path)
    store.open()
    try:
        assert store.remove_device(user, device, 0)
    finally:
        store.close()


def test_a_replaced_tls_connection_is_told_4001(running):
    token = running.token("erin", "phone")
    first = RawTls(running)
    first.auth(token)
    second = RawTls(running)
    second.auth(token)
    notice = first.read_one()
    assert notice["method"] == "conn.close" and notice["params"]["code"] == 4001
    first.assert_closed()
    second.assert_open()


def test_a_revoked_tls_connection_is_told_4002(running):
    raw = RawTls(running)
    raw.auth(running.token("frank", "phone"))
    remove_device(running, "frank", "phone")
    raw.sock.settimeout(WAIT)
    assert raw.read_one()["params"]["code"] == 4002
    raw.assert_closed()


def test_an_operator_kick_is_told_1000(running):
    raw = RawTls(running)
    raw.auth(running.token("gina", "phone"))
    admin = AdminClient(running.settings.admin_socket)
    try:
        assert admin.result("kick", {"user": "gina", "device": "phone"}) == {"closed": 1}
    finally:
        admin.close()
    assert raw.read_one() == conn_close(1000, "closed by an operator")
    raw.assert_closed()


def test_a_shutdown_is_told_1001(servers):
    running = servers()
    raw = RawTls(running)
    raw.auth(running.token("hal", "phone"))
    stopping = gevent.spawn(running.server.stop)
    assert raw.read_one() == conn_close(1001, "server shutting down")
    raw.assert_closed()
    stopping.get(timeout=15)


def test_a_slow_consumer_is_told_4004_when_it_reads_again(servers):
    running = servers(max_outbound_bytes=64 * 1024)
    raw = RawTls(running)
    raw.auth(running.token("ivy", "phone"))
    echo = {"jsonrpc": "2.0", "method": "msg.echo", "params": {"message": "x" * 20_000}, "id": 1}
    for _ in range(20):  # answers pile up unread, past the bound
        raw.send_value(echo)
    values = []
    try:
        while True:
            values.extend(raw.read(1))
    except (AssertionError, ConnectionError, TimeoutError, OSError):
        pass  # the end of the connection
    notices = [value for value in values if isinstance(value, dict) and value.get("method") == "conn.close"]
    assert notices == [conn_close(4004, "slow consumer: output was not read")]


@pytest.mark.parametrize("ws", [False, True], ids=["tls", "websocket"])
def test_the_client_surfaces_conn_close_and_does_not_reconnect_when_replaced(running, ws):
    first = running.connect("jane", "laptop", ws=ws, auto_reconnect=True)
    second = running.connect("jane", "laptop", ws=ws)
    assert first.closed.wait(WAIT)
    assert first.close_reason.code == 4001 and first.close_reason.reason
    assert not first.reconnecting
    assert second.ping() == "pong"


def test_the_client_reconnects_after_an_operator_kick(running):
    client = running.connect("kim", "laptop", auto_reconnect=True)
    admin = AdminClient(running.settings.admin_socket)
    try:
        assert admin.result("kick", {"user": "kim", "device": "laptop"}) == {"closed": 1}
    finally:
        admin.close()
    assert client.closed.wait(WAIT)
    assert client.close_reason.code == 1000
    with gevent.Timeout(WAIT):
        while client.closed.is_set() or client.reconnecting:
            gevent.sleep(0.02)
    assert client.ping() == "pong"
