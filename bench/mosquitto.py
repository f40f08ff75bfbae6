"""The Mosquitto that ``bench/run.py --peer mosquitto`` compares Devastator with, and its MQTT clients.

``MosquittoProcess`` starts /usr/sbin/mosquitto (the Debian package) on a
free port with a config file of its own in a temporary directory: one TLS
listener on loopback (a certificate from ``devastator.pki.ensure_pki``, which
the clients verify), persistence in that directory, QoS 1 queues and
in-flight windows large enough for the load, anonymous clients. It never
touches a system Mosquitto (port 1883).

The clients mirror bench/run.py's Devastator clients message for message:
a sender PUBLISHes QoS 1 to its recipient's topic ``u/<recipient>``, keeping
``window`` PUBLISHes awaiting their PUBACK, with the same 64-byte message
(``measure.message_json``: sequence number and send time); a recipient
(clean_session false, its user name as client id) subscribes QoS 1 and
PUBACKs each message, checked like Devastator's (in order, duplicates,
misaddressed). ``MosquittoTarget`` hands them to the same conductor
(run.py's ``Bench``), so both servers get the same load and the same meter.
"""
from __future__ import annotations

import getpass
import os
import ssl
import struct
import time
from pathlib import Path

import gevent
import gevent.event
import orjson

from measure import MESSAGE_BYTES, ArrivalChecks, BenchError, ChildServer, TlsConnection, WindowedSender, free_port, message_json
from mqtt import (
    CONNACK, DISCONNECT_PACKET, PINGREQ_PACKET, PINGRESP, PUBACK, PUBLISH, SUBACK, SUBACK_FAILURE, MqttError,
    PacketDecoder, connect_packet, packet_id_of, parse_publish, publish_head, puback_packet, subscribe_packet,
)

DEFAULT_EXECUTABLE = "/usr/sbin/mosquitto"
# Mosquitto's own default (30 minutes), written out: it saves its in-memory state to disk
# at this interval and at shutdown, not before each PUBACK (bench/README.md says what differs).
AUTOSAVE_INTERVAL_S = 1800
MAX_INFLIGHT = 1000  # QoS 1 messages on their way to one subscriber, unacknowledged
PACKET_ID_MODULUS = 65535  # packet ids run 1..65535

_loads = orjson.loads
_now = time.perf_counter
_u16 = struct.Struct(">H").pack


def topic_of(user: str) -> str:
    return f"u/{user}"


class MosquittoProcess(ChildServer):
    """Mosquitto as a subprocess in its own session, on a free port, stopped with SIGTERM
    (it saves its persistence file, then exits)."""

    name = "mosquitto"

    def __init__(self, work_dir: Path, host: str, executable: str = DEFAULT_EXECUTABLE):
        super().__init__(work_dir / "mosquitto.log", host)
        self.work_dir = work_dir
        self.executable = executable
        self.port = free_port(host)
        self.config_path = work_dir / "mosquitto.conf"
        self.persistence_dir = work_dir / "persistence"
        self.ca_path: Path | None = None

    def config(self, certificate: Path, key: Path) -> str:
        return "\n".join([
            "# Written by bench/mosquitto.py for one benchmark run.",
            f"user {getpass.getuser()}",  # stay who started it: the files here are private to that user
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
            f"max_inflight_messages {MAX_INFLIGHT}",
            "max_queued_messages 0",  # no limit: the offline mode queues everything for absent recipients
            "max_queued_bytes 0",
            "set_tcp_nodelay true",  # as Devastator's clients and the bench's: no Nagle delay on small packets
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {self.port} {self.host}",
            f"certfile {certificate}",
            f"keyfile {key}",
            "allow_anonymous true",
            "",
        ])

    def start(self, timeout: float = 30.0) -> None:
        from devastator.pki import ensure_pki

        if not os.access(self.executable, os.X_OK):
            raise BenchError(f"{self.executable} is not there (Debian's package: apt-get install mosquitto)")
        pki = ensure_pki(self.work_dir / "pki", ("localhost", "127.0.0.1"))
        self.ca_path = pki.ca_cert
        self.persistence_dir.mkdir(mode=0o700, exist_ok=True)
        self.config_path.write_text(self.config(pki.server_cert, pki.server_key))
        self._launch([self.executable, "-c", str(self.config_path)], self.port, cwd=self.work_dir, timeout=timeout)


# -- the clients ---------------------------------------------------------------------------


class MqttConnection(TlsConnection):
    """An MQTT 3.1.1 client over TLS: CONNECT first, with the user's name as client id; keepalive off."""

    framing_error = MqttError
    clean_session = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decoder = PacketDecoder()
        self.decode = self._decoder.feed

    def hello(self) -> bytes:
        return connect_packet(self.user, clean_session=self.clean_session)

    def _connack(self, body: bytes) -> bool:
        """True if the broker accepted the connection; else the refusal is kept and auth is over."""
        if body[1] != 0:
            self.auth_error = f"CONNACK return code {body[1]}"
            self.authenticated.set()
            return False
        return True

    def _read_connack(self) -> bool:
        while not self.authenticated.is_set():
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed by the broker before CONNACK")
            for kind, _, body in self._decoder.feed(data):
                if kind == CONNACK:
                    if self._connack(body):
                        self.authenticated.set()
                else:
                    self.run_state.error(f"{self.user} before CONNACK", f"MQTT packet type {kind}")
        return self.auth_error is None


class MqttSender(WindowedSender, MqttConnection):
    """``window`` QoS 1 PUBLISHes to the recipient's topic awaiting their PUBACK; a new one for each PUBACK."""

    def __init__(self, *args, recipient: str, window: int, quota: int | None, receipt: bool = False, **kwargs):
        if receipt:
            raise BenchError("MQTT has no delivery receipts (--receipt goes without --peer)")
        super().__init__(*args, **kwargs)
        self.init_window(window, quota)
        self.recipient = recipient
        self._head = publish_head(topic_of(recipient), MESSAGE_BYTES)
        self._acked = 0

    def _loop(self) -> None:
        if not self._read_connack():
            return
        self.open_window()
        super()._loop()

    def encode_send(self, n: int, sent_at: bytes) -> bytes:
        return self._head + _u16(n % PACKET_ID_MODULUS + 1) + message_json(n, sent_at)

    def on_frames(self, packets):
        each = not self.coalesce
        answered = 0
        for kind, _, body in packets:
            if kind != PUBACK:
                self.run_state.error(f"{self.user} unexpected", f"MQTT packet type {kind}")
                continue
            # One connection's PUBLISHes are answered in the order they were sent.
            expected = self._acked % PACKET_ID_MODULUS + 1
            self._acked += 1
            if packet_id_of(body) != expected:
                self.errors += 1
                self.run_state.error(f"{self.user} PUBACK", f"packet id {packet_id_of(body)}, expected {expected}")
            if each:
                self.settle(1, 1)
            else:
                answered += 1
        return None if each else self.settle(answered, answered)

    def on_closed(self) -> None:
        self.drained.set()


class MqttRecipient(ArrivalChecks, MqttConnection):
    """Subscribes QoS 1 to its topic (unless its session has it already) and PUBACKs each message, checked."""

    clean_session = False  # a persistent session: what it missed while away is queued for it

    def __init__(self, *args, sender: str, subscribe: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_arrivals()
        self.sender = sender
        self.subscribe = subscribe
        self._topic = topic_of(self.user).encode()
        self.pong = gevent.event.Event()

    def on_frames(self, packets):
        now = _now()
        measuring = self.run_state.measuring
        each = not self.coalesce
        sendall = self.sock.sendall
        acks = []
        for kind, flags, body in packets:
            if kind == PUBLISH:
                topic, packet_id, payload = parse_publish(flags, body)
                if topic != self._topic:
                    self.misaddressed += 1
                else:
                    self.arrived(_loads(payload), now, measuring)
                if each:
                    sendall(puback_packet(packet_id))
                else:
                    acks.append(puback_packet(packet_id))
            elif kind == CONNACK:
                if self._connack(body):
                    if self.subscribe:
                        sendall(subscribe_packet(1, topic_of(self.user)))
                    else:
                        self.authenticated.set()
            elif kind == SUBACK:
                if body[2] == SUBACK_FAILURE:
                    self.auth_error = "SUBACK: subscription refused"
                self.authenticated.set()
            elif kind == PINGRESP:
                self.pong.set()
            else:
                self.run_state.error(f"{self.user} unexpected", f"MQTT packet type {kind}")
        return b"".join(acks) if acks else None

    def after_frames(self) -> None:
        self.arrivals_written()

    def on_closed(self) -> None:
        self.done.set()


class MqttIdle(MqttConnection):
    """Connects (a persistent session, as a device's) and sits after its CONNACK."""

    clean_session = False

    def on_frames(self, packets):
        for kind, _, body in packets:
            if kind == CONNACK:
                if self._connack(body):
                    self.authenticated.set()
            else:
                self.run_state.error(f"{self.user} unexpected", f"MQTT packet type {kind}")
        return None


class MosquittoTarget:
    """What run.py's conductor needs of the broker: its address, pid, clients' classes and drain barrier."""

    name = "mosquitto"
    sender_class = MqttSender
    recipient_class = MqttRecipient
    idle_class = MqttIdle

    def __init__(self, broker: MosquittoProcess):
        self.server = broker
        self.pid = broker.pid
        self.address = (broker.host, broker.port)
        self.ssl_context = ssl.create_default_context(cafile=str(broker.ca_path))

    def credentials(self, users: list[str]) -> dict[str, None]:
        return dict.fromkeys(users)  # anonymous: the client id is the user

    def prepare_offline(self, bench) -> None:
        """Each recipient subscribes once and leaves (DISCONNECT): the broker queues for its session."""
        first = [
            bench._open(MqttRecipient(bench.run, recipient, None, self.ssl_context, self.address, sender=sender))
            for sender, recipient in bench.pairs
        ]
        bench.authenticate(first)
        for connection in first:
            connection.closing = True
            connection.sock.sendall(DISCONNECT_PACKET)  # its greenlet only reads by now
            connection.close()

    def wait_retired(self, bench, timeout: float) -> int | None:
        """Until the broker has handled every PUBACK: a PINGREQ after them, answered, on each connection.

        The broker reads a connection's packets in order, so its PINGRESP comes
        after it has applied the PUBACKs before it. 0 when every recipient
        got its PINGRESP, else None (not known).
        """
        done = [r for r in bench.recipients if r.done.is_set() and r.sock is not None and not r.closing]
        if len(done) < len(bench.recipients):
            return None
        try:
            for recipient in done:  # each recipient's greenlet only reads once it is done
                recipient.sock.sendall(PINGREQ_PACKET)
        except OSError:
            return None  # a connection lost: the checks report it
        deadline = time.monotonic() + timeout
        for recipient in done:
            if not recipient.pong.wait(max(0.0, deadline - time.monotonic())):
                return None
        return 0

    def overload_figures(self, run) -> None:
        return None
