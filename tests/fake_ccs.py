"""A fake GCM Cloud Connection Server for tests: real XMPP over real TLS.

``FakeCcs`` listens on 127.0.0.1 (ephemeral port) with a certificate from its
own CA, made in a temporary directory. Each connection speaks the XMPP that
CCS speaks, parsed with ``XMLPullParser``: the stream header, stream features
offering SASL (PLAIN among Google's mechanisms), auth success or failure
checked against the sender id and API key, the stream restart, then resource
binding and the session. After that it takes ``google:mobile:data`` message
stanzas, records each, and acks it unless told otherwise:

- ``nack(token, error, times=1)``: nack pushes to ``token`` (``times=None``: always);
- ``refuse_stanza(token)``: answer pushes to ``token`` with an XMPP stanza error;
- ``hold_acks()`` / ``release_held()``: keep acks back, then send them;
- ``drain(connection)``: send the ``CONNECTION_DRAINING`` control message;
  pushes that still arrive on that connection are nacked ``CONNECTION_DRAINING``;
- ``drop(connection)``: cut the connection, forgetting what it held;
- ``send_upstream(...)`` / ``send_receipt(...)``: send a device's message or a
  delivery receipt; ``upstream_ack(message_id)`` waits for the client's ack.

"Delivered" means acked by the fake. Tests wait with ``wait_until``, which
wakes on every change the fake records, never on a timer.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from xml.sax.saxutils import escape, quoteattr

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import pytest
from gevent.server import StreamServer

from local_ca import LOCAL_NAMES, LocalCa

SENDER_ID = "123456789012"
API_KEY = "fake-ccs-server-key"
DOMAIN = "gcm.googleapis.com"
WAIT = 5.0  # seconds: a bound for a test that fails, never a pause

_NS_STREAM = "http://etherx.jabber.org/streams"
_NS_CLIENT = "jabber:client"
_NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
_NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
_NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
_NS_GCM = "google:mobile:data"


def wait_for(changed: gevent.event.Event, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds, checking it each time ``changed`` is set."""
    deadline = time.monotonic() + timeout
    while True:
        # No greenlet switch between clear() and the check: no change is missed.
        changed.clear()
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"{what} did not happen within {timeout} s")
        changed.wait(remaining)


@dataclass(frozen=True)
class Record:
    """A downstream message as the fake saw it, and on which connection."""

    connection: int
    payload: dict

    @property
    def message_id(self) -> str:
        return self.payload["message_id"]

    @property
    def token(self) -> str:
        return self.payload["to"]


class FakeCcs:
    host = "127.0.0.1"

    def __init__(self, directory: Path, *, sender_id: str = SENDER_ID, api_key: str = API_KEY, port: int = 0):
        self.directory = directory
        self._listen_port = port
        self.sender_id = sender_id
        self.api_key = api_key
        directory.mkdir(parents=True, exist_ok=True)
        ca = LocalCa("fake CCS test CA")
        self.ca_file = ca.write(directory / "ca.pem")
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(*ca.write_server(
            directory, "fcm-xmpp.googleapis.com", names=("fcm-xmpp.googleapis.com", DOMAIN, *LOCAL_NAMES)))
        self.connections: list[FakeConnection] = []
        self.received: list[Record] = []
        self.delivered: list[Record] = []
        self.upstream_acks: list[dict] = []
        self.auth_failures = 0
        self._numbers = itertools.count(1)
        self._nacks: dict[str, list] = {}  # token -> [error, times left or None]
        self._refused: set[str] = set()
        self._holding = False
        self._changed = gevent.event.Event()
        self._server: StreamServer | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._server = StreamServer(
            (self.host, self._listen_port), self._serve, ssl_context=self._context, spawn=gevent.pool.Pool(64),
        )
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections, then end the open ones at once
        for connection in self.connections:
            connection.cut()
        if self._server is not None:
            self._server.stop(timeout=1)

    @property
    def port(self) -> int:
        return self._server.server_port

    # -- script ----------------------------------------------------------------------

    def nack(self, token: str, error: str, *, times: int | None = 1) -> None:
        self._nacks[token] = [error, times]

    def refuse_stanza(self, token: str) -> None:
        self._refused.add(token)

    def hold_acks(self, hold: bool = True) -> None:
        """Keep back the acks of pushes that arrive from now on (or stop doing so)."""
        self._holding = hold

    def release_held(self, connection: FakeConnection | None = None) -> None:
        """Ack what was held, on ``connection`` or on all of them."""
        for each in [connection] if connection is not None else list(self.connections):
            held, each.held = each.held, []
            for payload in held:
                self._ack(each, payload)

    def drain(self, connection: FakeConnection) -> None:
        connection.draining = True
        connection.send_json({"message_type": "control", "control_type": "CONNECTION_DRAINING"})

    def drop(self, connection: FakeConnection) -> None:
        """Cut the connection at once; what it held is never acked."""
        connection.held = []
        connection.cut()

    def send_upstream(self, connection: FakeConnection, *, token: str, message_id: str,
                      data: dict | None = None, category: str = "com.example.devastator") -> None:
        connection.send_json({"category": category, "data": data or {}, "message_id": message_id, "from": token})

    def send_receipt(self, connection: FakeConnection, *, original: Record) -> str:
        message_id = f"dr2:{original.message_id}"
        connection.send_json({
            "category": "com.example.devastator",
            "data": {
                "message_status": "MESSAGE_SENT_TO_DEVICE",
                "original_message_id": original.message_id,
                "device_registration_id": original.token,
            },
            "message_id": message_id,
            "message_type": "receipt",
            "from": DOMAIN,
        })
        return message_id

    # -- observe ---------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        wait_for(self._changed, predicate, f"fake CCS: {what}", timeout)

    def connection(self, number: int, timeout: float = WAIT) -> FakeConnection:
        """Connection ``number`` (1, 2, ...), once its session is bound."""
        self.wait_until(lambda: len(self.connections) >= number and self.connections[number - 1].bound,
                        f"session {number}", timeout)
        return self.connections[number - 1]

    def upstream_ack(self, message_id: str, timeout: float = WAIT) -> dict:
        """The client's ack for the upstream message or receipt ``message_id``, once it came."""
        def acked() -> list[dict]:
            return [ack for ack in self.upstream_acks if ack.get("message_id") == message_id]

        self.wait_until(lambda: bool(acked()), f"the client's ack for {message_id}", timeout)
        return acked()[0]

    def received_on(self, connection: FakeConnection) -> list[Record]:
        return [record for record in self.received if record.connection == connection.number]

    def changed(self) -> None:
        self._changed.set()

    # -- protocol ----------------------------------------------------------------------

    def _serve(self, sock, address) -> None:
        connection = FakeConnection(self, sock, next(self._numbers))
        self.connections.append(connection)
        self.changed()
        connection.run()

    def _credentials_ok(self, response: bytes) -> bool:
        parts = response.split(b"\x00")
        if len(parts) != 3:
            return False
        _authzid, authcid, password = parts
        return authcid == f"{self.sender_id}@{DOMAIN}".encode() and password == self.api_key.encode()

    def _downstream(self, connection: FakeConnection, payload: dict, stanza_id: str) -> None:
        self.received.append(Record(connection.number, payload))
        connection.pending += 1
        connection.max_pending = max(connection.max_pending, connection.pending)
        self.changed()
        token, message_id = payload.get("to"), payload.get("message_id")
        if token in self._refused:
            connection.pending -= 1
            connection.send(
                f"<message id={quoteattr(stanza_id)} type='error'><gcm xmlns='{_NS_GCM}'>"
                f"{escape(json.dumps(payload))}</gcm><error code='400' type='modify'>"
                f"<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
            return
        if connection.draining:
            self._nack(connection, payload, "CONNECTION_DRAINING")
            return
        rule = self._nacks.get(token)
        if rule is not None:
            error, times = rule
            if times is not None:
                rule[1] = times - 1
                if rule[1] <= 0:
                    del self._nacks[token]
            self._nack(connection, payload, error)
        elif self._holding:
            connection.held.append(payload)
        elif isinstance(message_id, str):
            self._ack(connection, payload)

    def _ack(self, connection: FakeConnection, payload: dict) -> None:
        if connection.closed.is_set():
            return
        connection.pending -= 1
        self.delivered.append(Record(connection.number, payload))
        self.changed()
        connection.send_json({"from": payload["to"], "message_id": payload["message_id"], "message_type": "ack"})

    def _nack(self, connection: FakeConnection, payload: dict, error: str) -> None:
        connection.pending -= 1
        connection.nacked.append((payload, error))
        self.changed()
        connection.send_json({
            "message_type": "nack",
            "message_id": payload.get("message_id"),
            "from": payload.get("to"),
            "error": error,
            "error_description": f"fake CCS says {error}",
        })


class FakeConnection:
    """One client connection: its XMPP state and what went over it."""

    def __init__(self, server: FakeCcs, sock, number: int):
        self.server = server
        self.number = number
        self.authenticated = False
        self.bound = False
        self.draining = False
        self.pending = 0  # downstream messages neither acked nor nacked yet
        self.max_pending = 0
        self.held: list[dict] = []
        self.nacked: list[tuple[dict, str]] = []
        self.closed = gevent.event.Event()
        self.closed_by_client = False  # the client ended its stream
        self._sock = sock
        self._write_lock = gevent.lock.Semaphore()
        self._reset_parser()

    def run(self) -> None:
        # A cut connection (OSError, SSLError) ends the loop like an EOF.
        with contextlib.suppress(OSError):
            while not self.closed.is_set():
                data = self._sock.recv(65536)
                if not data:
                    break
                self._feed(data)
        self.cut()

    def send_json(self, payload: dict) -> None:
        text = escape(json.dumps(payload))
        self.send(f'<message id=""><gcm xmlns="{_NS_GCM}">{text}</gcm></message>')

    def send(self, text: str) -> None:
        if self.closed.is_set():
            return
        try:
            with self._write_lock:
                self._sock.sendall(text.encode())
        except OSError:
            self.cut()

    def cut(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.server.changed()
        with contextlib.suppress(OSError):  # the peer may be gone already
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    # -- XMPP ----------------------------------------------------------------------------

    def _reset_parser(self) -> None:
        self._parser = ET.XMLPullParser(("start", "end"))
        self._depth = 0

    def _feed(self, data: bytes) -> None:
        self._parser.feed(data)
        for event, element in self._parser.read_events():
            if event == "start":
                if self._depth == 0 and not self._open_stream(element):
                    return
                self._depth += 1
                continue
            self._depth -= 1
            if self._depth == 0:  # the client ended its stream
                self.closed_by_client = True
                self.send("</stream:stream>")
                self.cut()
                return
            if self._depth == 1:
                restart = self._stanza(element)
                if restart:
                    # The client opens a new stream after <success/>; nothing else is in flight.
                    self._reset_parser()
                    return

    def _open_stream(self, element: ET.Element) -> bool:
        header = (f"<?xml version='1.0'?><stream:stream from='{DOMAIN}' id='fake{self.number}' version='1.0' "
                  f"xmlns:stream='{_NS_STREAM}' xmlns='{_NS_CLIENT}'>")
        if element.tag != f"{{{_NS_STREAM}}}stream" or element.get("to") != DOMAIN:
            self.send(f"{header}<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                      f"</stream:error></stream:stream>")
            self.cut()
            return False
        if self.authenticated:
            features = f"<bind xmlns='{_NS_BIND}'/><session xmlns='{_NS_SESSION}'/>"
        else:
            mechanisms = "".join(f"<mechanism>{name}</mechanism>" for name in ("X-OAUTH2", "X-GOOGLE-TOKEN", "PLAIN"))
            features = f"<mechanisms xmlns='{_NS_SASL}'>{mechanisms}</mechanisms>"
        self.send(f"{header}<stream:features>{features}</stream:features>")
        return True

    def _stanza(self, element: ET.Element) -> bool:
        """Handle one stanza; True when the stream restarts after it."""
        if element.tag == f"{{{_NS_SASL}}}auth":
            return self._auth(element)
        if element.tag == f"{{{_NS_CLIENT}}}iq":
            self._iq(element)
        elif element.tag == f"{{{_NS_CLIENT}}}message" and self.bound:
            gcm = element.find(f"{{{_NS_GCM}}}gcm")
            if gcm is not None:
                self._gcm(json.loads(gcm.text or "null"), element.get("id", ""))
        return False

    def _auth(self, element: ET.Element) -> bool:
        try:
            response = base64.b64decode(element.text or "", validate=True)
        except ValueError:
            response = b""
        if element.get("mechanism") == "PLAIN" and self.server._credentials_ok(response):
            self.authenticated = True
            self.send(f"<success xmlns='{_NS_SASL}'/>")
            return True
        self.server.auth_failures += 1
        self.server.changed()
        self.send(f"<failure xmlns='{_NS_SASL}'><not-authorized/></failure>")
        return False

    def _iq(self, element: ET.Element) -> None:
        stanza_id = quoteattr(element.get("id", ""))
        if element.find(f"{{{_NS_BIND}}}bind") is not None and self.authenticated:
            resource = element.findtext(f"{{{_NS_BIND}}}bind/{{{_NS_BIND}}}resource") or f"fake{self.number}"
            jid = escape(f"{self.server.sender_id}@{DOMAIN}/{resource}")
            self.send(f"<iq id={stanza_id} type='result'><bind xmlns='{_NS_BIND}'><jid>{jid}</jid></bind></iq>")
            self.bound = True
            self.server.changed()
        elif element.find(f"{{{_NS_SESSION}}}session") is not None and self.authenticated:
            self.send(f"<iq id={stanza_id} type='result'/>")
        else:
            self.send(f"<iq id={stanza_id} type='error'><error type='cancel'>"
                      f"<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")

    def _gcm(self, payload: Any, stanza_id: str) -> None:
        if not isinstance(payload, dict):
            return
        if payload.get("message_type") == "ack":
            self.server.upstream_acks.append(payload)
            self.server.changed()
        elif payload.get("message_type") is None:
            self.server._downstream(self, payload, stanza_id)


@pytest.fixture
def fake_ccs(tmp_path: Path):
    """A started ``FakeCcs``, stopped after the test."""
    server = FakeCcs(tmp_path / "fake-ccs")
    server.start()
    yield server
    server.stop()
