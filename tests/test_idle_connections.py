"""Idle connections hold no greenlet, on TLS and on WebSocket, and still take their place.

Both endpoints read a connection on demand (transports/endpoint.py's
OnDemandReader): between reads a libev watcher waits for input, so a
connection costs a greenlet only while something happens on it. Its place
under ``max_connections`` is counted from accept to close all the same.
"""
from __future__ import annotations

import socket

import pytest

from test_failures import WAIT, wait_until


@pytest.mark.parametrize("ws", [False, True], ids=["tls", "websocket"])
def test_idle_authenticated_connections_hold_no_greenlet_and_are_still_served(running, ws):
    endpoint = running.server.http if ws else running.server.tls
    clients = [running.connect(f"idle-{n}", ws=ws) for n in range(30)]
    wait_until(lambda: endpoint.greenlet_count == 0, "the endpoint's greenlets to end")
    assert endpoint.connection_count == 30

    assert all(client.ping() == "pong" for client in clients)
    sent = clients[0].send("idle-29", {"after": "the wait"})
    assert clients[29].receive(timeout=WAIT)["id"] == sent["id"]
    wait_until(lambda: endpoint.greenlet_count == 0, "the endpoint's greenlets to end again")


def test_idle_websockets_take_their_places_under_max_connections(servers):
    running = servers(max_connections=3)
    clients = [running.connect(f"placed-{n}", ws=True) for n in range(3)]
    wait_until(lambda: running.server.http.greenlet_count == 0, "the endpoint's greenlets to end")
    waiting = socket.create_connection(running.http_address, timeout=WAIT)
    try:
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(1)  # no place for it while three idle WebSockets hold theirs

        clients[0].close()  # a place comes free: the waiting request is answered
        waiting.settimeout(WAIT)
        assert waiting.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        waiting.close()
    assert all(client.ping() == "pong" for client in clients[1:])
