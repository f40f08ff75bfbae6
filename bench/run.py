#!/usr/bin/env python3
"""Benchmark a real Devastator server over TLS: throughput, latency and CPU per message.

Starts the server as a subprocess on free ports with a fresh data directory,
mints tokens for N sender/recipient pairs, and drives it with a lean load
generator (one greenlet per connection, big reads). As a chat client does,
each msg.send goes in its own frame and its own write, and each ACK too, as
each message arrives; ``--coalesce`` writes what one read made room for at
once (ACKs in JSON-RPC batches):

    online   recipients connected; senders keep W sends in flight for the
             warm-up and the measured duration; latency is receive - send time.
    offline  recipients away; senders store M messages; then the recipients
             connect and the bench times the drain of the backlog.
    idle     N authenticated connections held open: server memory per connection.
    overload bystanders' latency while other users flood the server.

``--peer mosquitto`` runs the same load against a Mosquitto of its own
(bench/mosquitto.py: MQTT QoS 1 over TLS) in the same invocation, one server
after the other, and reports both and their ratio.

Every received message is checked (addressed to this recipient, from its
sender, in order per sender); JSON-RPC errors, lost messages and order
violations are reported and make the exit status non-zero. See bench/README.md.
"""
from gevent import monkey

monkey.patch_all()  # before anything imports socket, ssl, subprocess or threading

import argparse  # noqa: E402
import array  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pool import Group  # noqa: E402
import orjson  # noqa: E402
from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import AcceptConnection, Message, RejectConnection, Request, TextMessage  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # measure.py, mqtt.py, mosquitto.py: this checkout's load generator

from measure import (  # noqa: E402
    ERRORS_KEPT, READ_SIZE, ArrivalChecks, BenchError, ChildServer, CpuMeter, Run, TlsConnection, WindowedSender, free_port,
    mark, message_json, per_msg_us, percentile_ms, process_cpu_seconds, process_rss_mb, rounded as _round,
)


def _server_root(argv: list[str]) -> Path:
    """The checkout whose server (``bin/devastator``) and ``devastator`` package the bench uses.

    This file's own checkout, unless ``--server-root DIR`` names another one
    (bench/compare.py: the same load generator against an older commit's
    server). Read before argparse runs: the package is imported below.
    """
    for i, arg in enumerate(argv):
        if arg == "--server-root" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if arg.startswith("--server-root="):
            return Path(arg.split("=", 1)[1]).resolve()
    return BENCH_DIR.parent


ROOT = _server_root(sys.argv[1:])
sys.path.insert(0, str(ROOT))  # run from a checkout even when the package is not installed

from devastator.protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, RpcError  # noqa: E402
from devastator.protocol.errors import OVERLOADED  # noqa: E402
from mosquitto import DEFAULT_EXECUTABLE as DEFAULT_MOSQUITTO, MosquittoProcess, MosquittoTarget  # noqa: E402

DEVICE = "bench"
ACK_BATCH = 100  # --coalesce: ACKs go back in batches like the server's delivery chunks
# What the server can do, not what it lets one user do: every mode but --overload turns the
# overload control and the send rate limits off (unless the environment sets them).
CAPACITY_SETTINGS = {
    "DEVASTATOR_OVERLOAD_CPU_PERCENT": "0",
    "DEVASTATOR_OVERLOAD_LOOP_LAG": "0",
    "DEVASTATOR_OVERLOAD_SEND_WAIT": "0",
    "DEVASTATOR_USER_SEND_RATE": "0",
    "DEVASTATOR_CONNECTION_SEND_RATE": "0",
    "DEVASTATOR_MAX_SENDS_IN_FLIGHT": "0",
}

_pack_header = struct.Struct("<I").pack
_loads = orjson.loads
_dumps = orjson.dumps
_now = time.perf_counter


class ServerProcess(ChildServer):
    """``bin/devastator`` as a subprocess in its own session, stopped with SIGTERM."""

    name = "the server"

    def __init__(self, data_dir: Path, host: str, *, env: dict[str, str] | None = None, workers: int = 1):
        super().__init__(data_dir / "server.log", host)
        self.data_dir = data_dir
        self.env = {**os.environ, **(env or {})}
        self.workers = workers
        self.tls_port = free_port(host)
        self.http_port = free_port(host)
        while self.http_port == self.tls_port:
            self.http_port = free_port(host)

    def start(self, timeout: float = 30.0) -> None:
        command = [
            sys.executable, str(ROOT / "bin" / "devastator"),
            "--data-dir", str(self.data_dir), "--host", self.host,
            "--tls-port", str(self.tls_port), "--http-port", str(self.http_port),
            "--workers", str(self.workers),
        ]
        self._launch(command, self.tls_port, cwd=ROOT, env=self.env, timeout=timeout)


# -- tokens --------------------------------------------------------------------------


def store_settings(data_dir: Path, env: dict[str, str]):
    """The settings the server runs with, for the bench to reach the same store."""
    from devastator.config import load_settings

    return load_settings(env=env, overrides={"data_dir": str(data_dir)})


def mint_tokens(settings, users: list[str]) -> dict[str, str]:
    """Create the users and their device in the server's store and mint their JWTs.

    In-process rather than one ``devastator token`` per user, which takes long
    for many users. The server must have created its data directory first:
    ensure_jwt_keys would otherwise write keys the server never reads.
    """
    from devastator.auth import JwtAuthority
    from devastator.identity import DeviceIdentity
    from devastator.secrets import JwtKeyFile, jwt_keys_path
    from devastator.store.factory import make_store

    if not jwt_keys_path(settings.data_dir).exists():
        raise BenchError(f"{settings.data_dir} holds no server data (jwt-keys.json)")
    authority = JwtAuthority(JwtKeyFile(settings.data_dir))
    store = make_store(settings)
    store.open()
    try:
        now_ms = int(time.time() * 1000)
        with store.batch():
            identities = []
            for user in users:
                store.add_user(user, now_ms)
                identities.append(DeviceIdentity(user, DEVICE, store.add_device(user, DEVICE, now_ms)))
    finally:
        store.close()
    return {identity.user: authority.mint(identity, 24 * 3600) for identity in identities}


def pending_count(settings, users: list[str]) -> int:
    """Deliveries the server still keeps pending for ``users`` (its ACKs not yet applied)."""
    from devastator.store.factory import make_store

    store = make_store(settings)
    store.open()
    try:
        now_ms = int(time.time() * 1000)
        return sum(count for user in users for count, _ in store.backlog(user, now_ms).values())
    finally:
        store.close()


# -- the load generator ------------------------------------------------------------


class Connection(TlsConnection):
    """A Devastator client: length-prefixed JSON-RPC frames, auth.jwt first."""

    framing_error = RpcError  # the server broke the framing

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self.decode = self._decoder.feed

    def hello(self) -> bytes:
        auth = {"jsonrpc": "2.0", "id": "auth", "method": "auth.jwt", "params": {"token": self._token}}
        return frame(_dumps(auth))

    def _auth_answer(self, obj) -> None:
        if "error" in obj:
            self.auth_error = obj["error"]
        self.authenticated.set()

    def _read_auth_answer(self) -> bool:
        """Read until the auth answer (the only frame that can come before we send); True if authenticated."""
        sock = self.sock
        while not self.authenticated.is_set():
            data = sock.recv(READ_SIZE)
            if not data:
                raise ConnectionError("closed by the server during auth")
            for body in self._decoder.feed(data):
                obj = _loads(body)
                if type(obj) is dict and obj.get("id") == "auth":
                    self._auth_answer(obj)
                else:
                    self.run_state.error(f"{self.user} before auth", obj)
        return self.auth_error is None


def frame(body: bytes) -> bytes:
    return _pack_header(len(body)) + body


def ack_body(request_id) -> bytes:
    return b'{"jsonrpc":"2.0","result":"ACK","id":' + _dumps(request_id) + b"}"


class SenderConnection(WindowedSender, Connection):
    """Keeps ``window`` msg.send requests in flight; a new one as each is answered."""

    def __init__(self, *args, recipient: str, window: int, quota: int | None, receipt: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_window(window, quota)
        self.recipient = recipient
        # --receipt: each send asks for receipts; the recipient's ACK makes a delivered receipt,
        # which comes back here as a msg.receipt request, checked and ACKed.
        self.receipt = receipt
        self.message_ids: dict[str, int] = {}  # message id (from the send's answer) -> n
        self.sent_at = array.array("d")  # by n (receipt mode): when it was sent
        self.receipts_seen: set[str] = set()  # message ids a delivered receipt came for
        self.receipts_measured = 0
        self.receipt_latencies = array.array("d")  # send -> its delivered receipt, in the window
        self.receipt_duplicates = 0
        self.receipt_misaddressed = 0
        self._receipt_id_suffix = ".d." + recipient
        self._prefix = (
            b'{"jsonrpc":"2.0","method":"msg.send","params":{"to":'
            + _dumps(recipient)
            + (b',"receipt":true' if receipt else b"")
            + b',"message":'
        )

    def _loop(self) -> None:
        if not self._read_auth_answer():
            return
        self.open_window()
        super()._loop()

    def encode_send(self, n: int, sent_at: bytes) -> bytes:
        if self.receipt:
            self.sent_at.append(float(sent_at))
        body = b'%s%s},"id":%d}' % (self._prefix, message_json(n, sent_at), n)
        return _pack_header(len(body)) + body

    def on_frames(self, frames):
        # One write per frame: each answer makes room for the next send at once, and each
        # receipt is ACKed as it comes. --coalesce: everything this read asked for, in one write.
        each = not self.coalesce
        sendall = self.sock.sendall
        answered = ok = 0
        acks = []
        for body in frames:
            obj = _loads(body)
            items = obj if type(obj) is list else (obj,)
            for item in items:
                if "result" in item:
                    self.on_accepted(item)
                    if each:
                        self.settle(1, 1)
                        continue
                    answered += 1
                    ok += 1
                elif "error" in item:
                    self.on_error(item)
                    if item.get("id") is not None:
                        if each:
                            self.settle(1, 0)
                            continue
                        answered += 1
                elif self.receipt and item.get("method") == "msg.receipt":
                    self.on_receipt(item)
                    if each:
                        sendall(frame(ack_body(item["id"])))
                    else:
                        acks.append(ack_body(item["id"]))
                else:
                    self.run_state.error(f"{self.user} unexpected", item)
        if each:
            return None
        out = self.settle(answered, ok)
        if acks:
            out = encode_acks(acks) + out
        return out

    def on_accepted(self, item) -> None:
        if self.receipt:
            self.message_ids[item["result"]["id"]] = item["id"]

    def on_receipt(self, item) -> None:
        """A delivered receipt: for a message of ours, by our recipient, once; its latency from the send."""
        params = item["params"]
        message_id = params.get("message")
        if (
            params.get("type") != "delivered" or params.get("by") != self.recipient
            or type(message_id) is not str or item["id"] != message_id + self._receipt_id_suffix
            or params.get("id") != item["id"]
        ):
            self.receipt_misaddressed += 1
            self.run_state.error(f"{self.user} msg.receipt", item)
            return
        if message_id in self.receipts_seen:
            self.receipt_duplicates += 1
            return
        self.receipts_seen.add(message_id)
        if self.run_state.measuring:
            self.receipts_measured += 1
            n = self.message_ids.get(message_id)  # None: the receipt came before the send's answer
            if n is not None:
                self.receipt_latencies.append(_now() - self.sent_at[n])

    def receipts_missing(self) -> int:
        """Messages answered as stored whose delivered receipt never came."""
        return sum(1 for message_id in self.message_ids if message_id not in self.receipts_seen)

    def receipts_unknown(self) -> int:
        """Receipts for a message id no send of ours was answered with."""
        return sum(1 for message_id in self.receipts_seen if message_id not in self.message_ids)

    def on_error(self, item) -> None:
        self.errors += 1
        self.run_state.error(f"{self.user} msg.send", item)

    def on_closed(self) -> None:
        self.drained.set()


def encode_acks(acks: list[bytes]) -> bytes:
    """--coalesce: ACK responses as frames: one alone, else JSON-RPC batches of at most ACK_BATCH."""
    if len(acks) == 1:
        return frame(acks[0])
    parts = []
    for start in range(0, len(acks), ACK_BATCH):
        body = b"[" + b",".join(acks[start:start + ACK_BATCH]) + b"]"
        parts.append(_pack_header(len(body)))
        parts.append(body)
    return b"".join(parts)


class RecipientConnection(ArrivalChecks, Connection):
    """ACKs every msg.recv, each in its own write as it is read (--coalesce: one write per read), and checks it."""

    def __init__(self, *args, sender: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_arrivals()
        self.sender = sender
        self._to = self.user

    def on_frames(self, frames):
        now = _now()
        measuring = self.run_state.measuring
        each = not self.coalesce
        sendall = self.sock.sendall
        acks = []
        for body in frames:
            obj = _loads(body)
            items = obj if type(obj) is list else (obj,)
            for item in items:
                if item.get("method") != "msg.recv":
                    if item.get("id") == "auth" and "method" not in item:
                        self._auth_answer(item)
                    elif "error" in item:
                        self.run_state.error(f"{self.user} (recipient)", item)
                    else:
                        self.run_state.error(f"{self.user} unexpected", item)
                    continue
                params = item["params"]
                if params["to"] != self._to or params["from"] != self.sender:
                    self.misaddressed += 1
                else:
                    self.arrived(params["message"], now, measuring)
                if each:
                    sendall(frame(ack_body(item["id"])))
                else:
                    acks.append(ack_body(item["id"]))
        return encode_acks(acks) if acks else None

    def after_frames(self) -> None:
        self.arrivals_written()

    def on_closed(self) -> None:
        self.done.set()


# -- the conductor -------------------------------------------------------------------


class IdleConnection(Connection):
    """Authenticates, then sits: what one connected device costs the server at rest."""

    def on_frames(self, frames):
        for body in frames:
            obj = _loads(body)
            if type(obj) is dict and obj.get("id") == "auth":
                self._auth_answer(obj)
            else:
                self.run_state.error(f"{self.user} unexpected", obj)
        return None


class IdleWebSocketConnection(IdleConnection):
    """An idle browser: a WebSocket on the HTTP port (``/ws``, plain ws://), auth.jwt, then it sits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ws = WSConnection(ConnectionType.CLIENT)
        self.decode = self._decode_messages

    def _connect(self) -> None:
        raw = socket.create_connection(self._address, timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = self._address
        raw.sendall(self._ws.send(Request(host=f"{host}:{port}", target="/ws", subprotocols=["devastator.v1"])))
        while True:
            data = raw.recv(READ_SIZE)
            if not data:
                raise ConnectionError("closed by the server during the WebSocket upgrade")
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, AcceptConnection):
                    self.sock = raw
                    return
                if isinstance(event, RejectConnection):
                    raise ConnectionError(f"WebSocket upgrade refused: {event.status_code}")

    def hello(self) -> bytes:
        auth = {"jsonrpc": "2.0", "id": "auth", "method": "auth.jwt", "params": {"token": self._token}}
        return self._ws.send(Message(data=_dumps(auth).decode()))

    def _decode_messages(self, data: bytes) -> list[str]:
        self._ws.receive_data(data)
        return [event.data for event in self._ws.events() if isinstance(event, TextMessage)]


def missing(answered: bytearray, received: bytearray) -> int:
    """Messages answered as stored that never arrived."""
    return sum(1 for n, ok in enumerate(answered) if ok and (n >= len(received) or not received[n]))


def retry_after_seconds(item) -> float | None:
    """The retry_after_ms of a -32003 answer, in seconds; None if it has none (a contract violation)."""
    data = item["error"].get("data")
    wait = data.get("retry_after_ms") if isinstance(data, dict) else None
    return wait / 1000 if isinstance(wait, int) and not isinstance(wait, bool) and wait >= 0 else None


class FloodSender(SenderConnection):
    """A flooder: ``window`` sends in flight, a new one for each answer, -32003 included.

    It ignores ``retry_after_ms``: the worst a client can do short of not
    reading at all, and what the server must contain without the flood
    raising anybody else's latency.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accepted = bytearray()  # by n: answered as stored
        self.shed = 0  # answered -32003
        self.shed_without_retry_after = 0

    def on_accepted(self, item) -> None:
        mark(self.accepted, item["id"])

    def on_error(self, item) -> None:
        if item["error"].get("code") != OVERLOADED:
            super().on_error(item)
            return
        self.shed += 1
        if retry_after_seconds(item) is None:
            self.shed_without_retry_after += 1


class PacedSender(Connection):
    """A bystander: one msg.send at a time, ``rate`` a second, as a chat client sends.

    After a -32003 it waits the ``retry_after_ms`` it was told and sends the
    same message again; a message carries the time of its first attempt, so
    the wait counts in its latency.
    """

    def __init__(self, *args, recipient: str, rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.interval = 1.0 / rate
        self.accepted = bytearray()
        self.ok = self.shed = self.errors = 0
        self._answer: gevent.event.AsyncResult | None = None
        self._prefix = (
            b'{"jsonrpc":"2.0","method":"msg.send","params":{"to":' + _dumps(recipient) + b',"message":'
        )

    def _loop(self) -> None:
        if self._read_auth_answer():
            super()._loop()

    def pace(self) -> None:
        """The sending greenlet (the conductor runs it once authenticated); the reading one answers it."""
        next_at, n = _now(), 0
        try:
            while not self.run_state.stopping:
                gevent.sleep(max(0.0, next_at - _now()))
                first = repr(_now()).encode()
                while not self.run_state.stopping:
                    self._answer = gevent.event.AsyncResult()
                    body = b'%s%s},"id":%d}' % (self._prefix, message_json(n, first), n)
                    self.sock.sendall(_pack_header(len(body)) + body)
                    wait = self._answer.get()  # None: stored; else seconds to wait before sending it again
                    if wait is None:
                        break
                    gevent.sleep(wait)
                n += 1
                next_at = max(next_at + self.interval, _now())  # late: on from now, not a burst to catch up
        except OSError:
            return  # the reading greenlet reports the connection's end

    def on_frames(self, frames):
        for body in frames:
            obj = _loads(body)
            for item in obj if type(obj) is list else (obj,):
                if "result" in item:
                    self.ok += 1
                    mark(self.accepted, item["id"])
                    self._answer.set(None)
                elif "error" in item and item["error"].get("code") == OVERLOADED:
                    self.shed += 1
                    wait = retry_after_seconds(item)
                    if wait is None:
                        self.run_state.error(f"{self.user} -32003 without retry_after_ms", item)
                    self._answer.set(1.0 if wait is None else wait)
                else:
                    self.errors += 1
                    self.run_state.error(f"{self.user} msg.send", item)
                    self._answer.set(None)  # not retried: counted as an error
        return None

    def on_closed(self) -> None:
        if self._answer is not None:
            self._answer.set(None)


def wait_all(events, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for event in events:
        if not event.wait(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def check_auth(connections) -> None:
    for connection in connections:
        if connection.auth_error is not None:
            raise BenchError(f"{connection.user} was refused: {connection.auth_error}")
        if not connection.authenticated.is_set() or connection.sock is None:
            raise BenchError(f"{connection.user} could not connect")


class DevastatorTarget:
    """What the conductor needs of a Devastator server: its address, pid, users, and its clients' classes."""

    name = "devastator"
    sender_class = SenderConnection
    recipient_class = RecipientConnection
    idle_class = IdleConnection

    def __init__(self, settings, address, server_pid: int | None, server: ServerProcess | None,
                 websocket_address=None):
        self.settings = settings
        self.address = address
        self.websocket_address = websocket_address  # (host, HTTP port): --websocket's
        self.pid = server_pid
        self.server = server
        self.ssl_context = ssl.create_default_context(cafile=str(settings.data_dir / "ca.pem"))

    def credentials(self, users: list[str]) -> dict[str, str]:
        return mint_tokens(self.settings, users)

    def prepare_offline(self, bench: "Bench") -> None:
        """Nothing: a user's device is registered, so messages to it wait in its mailbox."""

    def wait_retired(self, bench: "Bench", timeout: float) -> int | None:
        """Until the server has applied the drain's ACKs (no pending rows left); the rows left."""
        users = [recipient for _, recipient in bench.pairs]
        deadline = time.monotonic() + timeout
        left = None
        while True:
            try:
                left = pending_count(self.settings, users)
            except sqlite3.Error:
                left = None
            if left == 0 or time.monotonic() > deadline:
                return left
            gevent.sleep(0.05)

    def overload_figures(self, run: Run) -> dict | None:
        """What the server counted (its /debug/vars "overload"), when the bench started it."""
        if self.server is None:
            return None
        url = f"http://{self.server.host}:{self.server.http_port}/debug/vars"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return _loads(answer.read()).get("overload")
        except OSError as error:
            run.connection_errors.append(f"{url}: {error}")
            return None


class Bench:
    """The conductor: one load, the same for every target (Devastator here, Mosquitto in bench/mosquitto.py)."""

    def __init__(self, args, target):
        self.args = args
        self.target = target
        self.address = target.address
        self.server_pid = target.pid
        self.ssl_context = target.ssl_context
        self.run = Run()
        self.group = Group()
        self.tag = tag = secrets.token_hex(3)  # fresh users each run, also against a long-running server
        self.pairs = [(f"bench-{tag}-s{i}", f"bench-{tag}-r{i}") for i in range(args.pairs)]
        self.idle: list = []
        self.senders: list = []
        self.recipients: list = []
        # --overload: bystanders (paced senders) and flooders, each pair with its recipient.
        self.bystanders: list[PacedSender] = []
        self.bystander_recipients: list[RecipientConnection] = []
        self.flooders: list[FloodSender] = []
        self.flood_recipients: list[RecipientConnection] = []

    def _open(self, connection: Connection) -> Connection:
        greenlet = self.group.spawn(connection.main)
        greenlet.link_exception(
            lambda g, user=connection.user: self.run.connection_errors.append(f"{user}: crashed: {g.exception!r}")
        )
        return connection

    def setup(self, quotas: list[int] | None) -> None:
        users = [user for pair in self.pairs for user in pair]
        tokens = self.target.credentials(users)
        args, target = self.args, self.target
        for i, (sender, recipient) in enumerate(self.pairs):
            self.recipients.append(self._open(target.recipient_class(
                self.run, recipient, tokens[recipient], self.ssl_context, self.address, sender=sender,
                coalesce=args.coalesce)))
            self.senders.append(self._open(target.sender_class(
                self.run, sender, tokens[sender], self.ssl_context, self.address,
                recipient=recipient, window=args.window, quota=None if quotas is None else quotas[i],
                receipt=getattr(args, "receipt", False), coalesce=args.coalesce)))
        wait_all([c.connected for c in self.senders + self.recipients], 60, "TLS connections")

    def authenticate(self, connections) -> None:
        for connection in connections:
            connection.go.set()
        wait_all([c.authenticated for c in connections], 60, "auth.jwt answers")
        check_auth(connections)

    def finish_sending(self) -> None:
        self.run.stopping = True
        wait_all([s.drained for s in self.senders], 60, "the answers to the sends in flight")

    def wait_delivered(self, timeout: float) -> None:
        for sender, recipient in zip(self.senders, self.recipients):
            recipient.set_expect(sender.ok)
        deadline = time.monotonic() + timeout
        for recipient in self.recipients:
            recipient.done.wait(max(0.0, deadline - time.monotonic()))

    def wait_receipts(self, timeout: float) -> None:
        """--receipt: until every sender has a delivered receipt for each message answered as stored."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            len(s.receipts_seen) < s.ok and not s.closing and s.sock is not None for s in self.senders
        ):
            gevent.sleep(0.05)

    def run_online(self) -> dict:
        args = self.args
        self.setup(quotas=None)
        self.authenticate(self.recipients)  # online before the first send
        self.authenticate(self.senders)
        for sender in self.senders:
            sender.start.set()
        gevent.sleep(args.warmup)
        meter = CpuMeter(self.server_pid)
        self.run.measuring = True
        meter.start()
        gevent.sleep(args.duration)
        self.run.measuring = False
        meter.stop()
        delivered = sum(r.measured for r in self.recipients)
        sent = sum(s.ok_measured for s in self.senders)
        rss = process_rss_mb(self.server_pid)
        receipts = sum(s.receipts_measured for s in self.senders) if args.receipt else 0
        self.finish_sending()
        self.wait_delivered(args.grace)
        if args.receipt:
            self.wait_receipts(args.grace)
        latencies = sorted(x for r in self.recipients for x in r.latencies)
        result = {
            "mode": "online",
            "pairs": args.pairs,
            "window": args.window,
            "receipt": args.receipt,
            "coalesce": args.coalesce,
            "duration": round(meter.wall, 3),
            "delivered": delivered,
            "delivered_per_s": round(delivered / meter.wall, 1),
            "sent_ok_per_s": round(sent / meter.wall, 1),
            "p50_ms": _round(percentile_ms(latencies, 0.50), 3),
            "p99_ms": _round(percentile_ms(latencies, 0.99), 3),
            "max_ms": _round(latencies[-1] * 1000 if latencies else None, 3),
        }
        if args.receipt:
            receipt_latencies = sorted(x for s in self.senders for x in s.receipt_latencies)
            result.update({
                "receipts": receipts,
                "receipts_per_s": round(receipts / meter.wall, 1),
                "receipt_p50_ms": _round(percentile_ms(receipt_latencies, 0.50), 3),
                "receipt_p99_ms": _round(percentile_ms(receipt_latencies, 0.99), 3),
                "receipts_seen": sum(len(s.receipts_seen) for s in self.senders),
                "receipts_missing": sum(s.receipts_missing() for s in self.senders),
                "receipts_unknown": sum(s.receipts_unknown() for s in self.senders),
                "receipt_duplicates": sum(s.receipt_duplicates for s in self.senders),
                "receipts_misaddressed": sum(s.receipt_misaddressed for s in self.senders),
            })
        result.update(self._cpu_fields(meter, delivered, rss))
        result.update(self._checks())
        return result

    def run_offline(self) -> dict:
        args = self.args
        base, extra = divmod(args.messages, args.pairs)
        quotas = [base + (1 if i < extra else 0) for i in range(args.pairs)]
        self.target.prepare_offline(self)
        self.setup(quotas)
        self.authenticate(self.senders)
        fill = CpuMeter(self.server_pid)
        fill.start()
        for sender in self.senders:
            sender.start.set()
        wait_all([s.drained for s in self.senders], args.grace + args.messages / 100, "the sends to be answered")
        fill.stop()
        stored = sum(s.ok for s in self.senders)
        for sender in self.senders:  # the drain measures the recipients' side alone
            sender.close()
        for sender, recipient in zip(self.senders, self.recipients):
            recipient.set_expect(sender.ok)
        drain = CpuMeter(self.server_pid)
        drain.start()
        self.authenticate(self.recipients)
        deadline = time.monotonic() + args.grace + args.messages / 100
        for recipient in self.recipients:
            recipient.done.wait(max(0.0, deadline - time.monotonic()))
        if all(r.done_at for r in self.recipients):
            drained_at = max(r.done_at for r in self.recipients)
        else:  # timed out or lost a connection: the checks below report what is missing
            drained_at = _now()
        drain_wall = drained_at - drain.started
        # Until the server has applied the ACKs (its pending rows are gone), so the
        # CPU counted is all the work the drain cost it.
        retired = self.target.wait_retired(self, args.grace)
        drain.stop()
        rss = process_rss_mb(self.server_pid)
        delivered = sum(r.distinct for r in self.recipients)
        result = {
            "mode": "offline",
            "pairs": args.pairs,
            "window": args.window,
            "coalesce": args.coalesce,
            "duration": round(drain_wall, 3),
            "delivered": delivered,
            "delivered_per_s": round(delivered / drain_wall, 1) if drain_wall > 0 else None,
            "p50_ms": None,
            "p99_ms": None,
            "messages": args.messages,
            "stored": stored,
            "fill_s": round(fill.wall, 3),
            "fill_per_s": round(stored / fill.wall, 1),
            "fill_server_cpu_us_per_msg": _round(per_msg_us(fill.server, stored), 1),
            "fill_bench_cpu_us_per_msg": _round(per_msg_us(fill.own, stored), 1),
            "drain_s": round(drain_wall, 3),
            "drain_per_s": round(delivered / drain_wall, 1) if drain_wall > 0 else None,
            "server_pending_after_drain": retired,
        }
        result.update(self._cpu_fields(drain, delivered, rss))
        result.update(self._checks())
        return result

    def run_idle(self) -> dict:
        """Server memory per authenticated, idle connection."""
        users = [f"bench-{self.tag}-idle{i}" for i in range(self.args.connections)]
        tokens = self.target.credentials(users)
        gevent.sleep(1)  # let the server settle before the baseline
        before = process_rss_mb(self.server_pid)
        idle_class, address = self.target.idle_class, self.address
        if self.args.websocket:
            idle_class, address = IdleWebSocketConnection, self.target.websocket_address
        for start in range(0, len(users), 200):  # in steps, not one accept storm
            step = [self._open(idle_class(self.run, user, tokens[user], self.ssl_context, address))
                    for user in users[start:start + 200]]
            wait_all([c.connected for c in step], 60, "connections")
            self.authenticate(step)
            self.idle.extend(step)
        gevent.sleep(1)
        after = process_rss_mb(self.server_pid)
        per_connection = None if before is None or after is None else (after - before) * 1024 / len(users)
        return {
            "mode": "idle",
            "transport": "websocket" if self.args.websocket else "tls",
            "connections": len(users),
            "server_rss_before_mb": _round(before, 1),
            "server_rss_after_mb": _round(after, 1),
            "server_kb_per_connection": _round(per_connection, 1),
            "rpc_errors": self.run.error_count,
            "connection_errors": len(self.run.connection_errors),
        }

    def run_overload(self) -> dict:
        """Bystanders' latency alone, then while other users flood the server; what the flood got; server CPU."""
        args = self.args
        bystanders = [(f"bench-{self.tag}-b{i}", f"bench-{self.tag}-br{i}") for i in range(args.pairs)]
        flood = [(f"bench-{self.tag}-f{i}", f"bench-{self.tag}-fr{i}") for i in range(args.flooders)]
        tokens = self.target.credentials([user for pair in bystanders + flood for user in pair])

        def open_connection(kind, user, **options):
            return self._open(kind(self.run, user, tokens[user], self.ssl_context, self.address, **options))

        for sender, recipient in bystanders:
            self.bystander_recipients.append(open_connection(RecipientConnection, recipient, sender=sender,
                                                             coalesce=args.coalesce))
            self.bystanders.append(open_connection(PacedSender, sender, recipient=recipient, rate=args.rate))
        for sender, recipient in flood:
            self.flood_recipients.append(open_connection(RecipientConnection, recipient, sender=sender,
                                                         coalesce=args.coalesce))
            self.flooders.append(open_connection(FloodSender, sender, recipient=recipient, window=args.window,
                                                 quota=None, coalesce=args.coalesce))
        recipients = self.bystander_recipients + self.flood_recipients
        wait_all([c.connected for c in recipients + self.bystanders + self.flooders], 60, "TLS connections")
        self.authenticate(recipients)
        self.authenticate(self.bystanders + self.flooders)
        self.run.measuring = True  # every latency is kept with its send time, to tell the phases apart
        pacers = Group()
        for sender in self.bystanders:
            pacers.add(self.group.spawn(sender.pace))
        gevent.sleep(args.warmup)
        alone = CpuMeter(self.server_pid)
        alone.start()
        gevent.sleep(args.duration)
        alone.stop()
        flooded = CpuMeter(self.server_pid)
        flooded.start()
        for flooder in self.flooders:
            flooder.start.set()
        per_second = self._server_cores_per_second(args.duration)
        flooded.stop()
        rss = process_rss_mb(self.server_pid)
        server_figures = self.target.overload_figures(self.run)
        self.run.stopping = True
        wait_all([f.drained for f in self.flooders], 60, "the answers to the flood's sends in flight")
        pacers.join(timeout=60)
        for sender, recipient in zip(self.bystanders + self.flooders, recipients):
            recipient.set_expect(sum(sender.accepted))
        deadline = time.monotonic() + args.grace
        for recipient in recipients:
            recipient.done.wait(max(0.0, deadline - time.monotonic()))

        def latencies(meter: CpuMeter) -> list[float]:
            start, end = meter.started, meter.started + meter.wall
            return sorted(latency for r in self.bystander_recipients
                          for sent, latency in zip(r.sent_times, r.latencies) if start <= sent < end)

        calm, stormy = latencies(alone), latencies(flooded)
        flood_ok = sum(sum(f.accepted) for f in self.flooders)
        flood_shed = sum(f.shed for f in self.flooders)
        pairs = list(zip(self.bystanders + self.flooders, recipients))
        return {
            "mode": "overload",
            "pairs": args.pairs,
            "rate": args.rate,
            "flooders": args.flooders,
            "window": args.window,
            "duration": round(flooded.wall, 3),
            "baseline_messages": len(calm),
            "baseline_p50_ms": _round(percentile_ms(calm, 0.50), 3),
            "baseline_p99_ms": _round(percentile_ms(calm, 0.99), 3),
            "flood_messages": len(stormy),
            "p50_ms": _round(percentile_ms(stormy, 0.50), 3),
            "p99_ms": _round(percentile_ms(stormy, 0.99), 3),
            "max_ms": _round(stormy[-1] * 1000 if stormy else None, 3),
            "bystander_shed": sum(b.shed for b in self.bystanders),
            "flood_sent_ok": flood_ok,
            "flood_ok_per_s": round(flood_ok / flooded.wall, 1),
            "flood_shed": flood_shed,
            "flood_shed_per_s": round(flood_shed / flooded.wall, 1),
            "flood_shed_ratio": round(flood_shed / (flood_shed + flood_ok), 3) if flood_shed + flood_ok else None,
            "flood_shed_without_retry_after": sum(f.shed_without_retry_after for f in self.flooders),
            "server_cpu_cores_baseline": _round(None if alone.server is None else alone.server / alone.wall, 2),
            "server_cpu_cores": _round(None if flooded.server is None else flooded.server / flooded.wall, 2),
            "server_cpu_cores_max_1s": _round(max(per_second) if per_second else None, 2),
            "bench_cpu_cores": round(flooded.own / flooded.wall, 2),
            "server_rss_mb": _round(rss, 1),
            "server_overload": server_figures,
            "lost": sum(missing(sender.accepted, recipient.seen) for sender, recipient in pairs),
            "duplicates": sum(r.duplicates for r in recipients),
            "out_of_order": sum(r.out_of_order for r in recipients),
            "misaddressed": sum(r.misaddressed for r in recipients),
            "rpc_errors": self.run.error_count,
            "connection_errors": len(self.run.connection_errors),
        }

    def _server_cores_per_second(self, duration: float) -> list[float]:
        """Sleep ``duration`` seconds, measuring the server's CPU use (in cores) in each second of it."""
        cores = []
        end = _now() + duration
        last_at, last = _now(), process_cpu_seconds(self.server_pid)
        while _now() < end:
            gevent.sleep(min(1.0, end - _now()))
            at, cpu = _now(), process_cpu_seconds(self.server_pid)
            if cpu is not None and last is not None and at - last_at >= 0.5:
                cores.append((sum(cpu) - sum(last)) / (at - last_at))
            last_at, last = at, cpu
        return cores

    def _cpu_fields(self, meter: CpuMeter, delivered: int, rss) -> dict:
        return {
            "server_cpu_us_per_msg": _round(per_msg_us(meter.server, delivered), 1),
            "server_cpu_cores": _round(None if meter.server is None else meter.server / meter.wall, 2),
            # How much more it would have run: on a busy machine, the CPU it waited for.
            "server_runqueue_cores": _round(
                None if meter.server_waited is None else meter.server_waited / meter.wall, 2),
            "server_sys_us_per_msg": _round(per_msg_us(meter.server_sys, delivered), 1),
            "bench_cpu_us_per_msg": _round(per_msg_us(meter.own, delivered), 1),
            "bench_cpu_cores": round(meter.own / meter.wall, 2),
            "server_rss_mb": _round(rss, 1),
        }

    def _checks(self) -> dict:
        accepted = sum(s.ok for s in self.senders)
        distinct = sum(r.distinct for r in self.recipients)
        lost = sum(max(0, s.ok - r.distinct) for s, r in zip(self.senders, self.recipients))
        return {
            "sent_ok": accepted,
            "received_distinct": distinct,
            "send_errors": sum(s.errors for s in self.senders),
            "rpc_errors": self.run.error_count,
            "lost": lost,
            "duplicates": sum(r.duplicates for r in self.recipients),
            "out_of_order": sum(r.out_of_order for r in self.recipients),
            "misaddressed": sum(r.misaddressed for r in self.recipients),
            "connection_errors": len(self.run.connection_errors),
        }

    def close(self) -> None:
        for connection in (self.senders + self.recipients + self.idle + self.bystanders + self.bystander_recipients
                           + self.flooders + self.flood_recipients):
            connection.close()
        self.group.kill(timeout=5)


# -- reporting -----------------------------------------------------------------------


def summary(result: dict, run: Run, name: str = "devastator") -> str:
    def fmt(value, unit="", digits=1):
        if value is None:
            return "n/a"
        return f"{value:,.{digits}f}{unit}" if isinstance(value, float) else f"{value:,}{unit}"

    if result["mode"] == "overload":
        return overload_summary(result, run, fmt)
    if result["mode"] == "idle":
        lines = [
            f"{name} bench: mode=idle connections={result['connections']}"
            + (" websocket" if result.get("transport") == "websocket" else ""),
            f"  server RSS      {fmt(result['server_rss_before_mb'], ' MB')} before,"
            f" {fmt(result['server_rss_after_mb'], ' MB')} with every connection authenticated:"
            f" {fmt(result['server_kb_per_connection'], ' kB')} per connection",
            f"  checks          {'errors' if name == 'mosquitto' else 'RPC errors'} {result['rpc_errors']},"
            f" connection errors {result['connection_errors']}",
        ]
        lines += [f"  connection      {problem}" for problem in run.connection_errors[:ERRORS_KEPT]]
        return "\n".join(lines)
    lines = [f"{name} bench: mode={result['mode']} pairs={result['pairs']} window={result['window']}"
             + (" receipt" if result.get("receipt") else "") + (" coalesce" if result.get("coalesce") else "")]
    if result["mode"] == "online":
        lines += [
            f"  measured        {fmt(result['duration'], ' s', 2)}",
            f"  delivered       {fmt(result['delivered'])} messages, {fmt(result['delivered_per_s'], '/s')}"
            f" (sends answered {fmt(result['sent_ok_per_s'], '/s')})",
            f"  latency         p50 {fmt(result['p50_ms'], ' ms', 2)}, p99 {fmt(result['p99_ms'], ' ms', 2)},"
            f" max {fmt(result['max_ms'], ' ms', 2)}",
        ]
        if result.get("receipt"):
            lines += [
                f"  receipts        {fmt(result['receipts'])} delivered receipts, {fmt(result['receipts_per_s'], '/s')};"
                f" send -> receipt p50 {fmt(result['receipt_p50_ms'], ' ms', 2)},"
                f" p99 {fmt(result['receipt_p99_ms'], ' ms', 2)}",
                f"                  checked: {fmt(result['receipts_seen'])} in all, missing {result['receipts_missing']},"
                f" for unknown messages {result['receipts_unknown']}, misaddressed {result['receipts_misaddressed']},"
                f" duplicates {result['receipt_duplicates']}",
            ]
    else:
        lines += [
            f"  fill            {fmt(result['stored'])} stored in {fmt(result['fill_s'], ' s', 2)}:"
            f" {fmt(result['fill_per_s'], '/s')}"
            f" (server {fmt(result['fill_server_cpu_us_per_msg'], ' us/msg')},"
            f" bench {fmt(result['fill_bench_cpu_us_per_msg'], ' us/msg')})",
            f"  drain           {fmt(result['delivered'])} received and ACKed in {fmt(result['drain_s'], ' s', 2)}:"
            f" {fmt(result['drain_per_s'], '/s')}",
        ]
        if name == "mosquitto":
            applied = result["server_pending_after_drain"] == 0
            lines.append("  server pending  " + ("none: a PINGRESP came after the last PUBACK on each connection"
                                                 if applied else "not known: no PINGRESP"))
        else:
            lines.append(f"  server pending  {fmt(result['server_pending_after_drain'])} rows left after the drain")
    lines += [
        f"  server CPU      {fmt(result['server_cpu_us_per_msg'], ' us/msg')}"
        f" (of which system {fmt(result['server_sys_us_per_msg'], ' us')};"
        f" {fmt(result['server_cpu_cores'], ' cores', 2)}), RSS {fmt(result['server_rss_mb'], ' MB')}",
        f"  bench CPU       {fmt(result['bench_cpu_us_per_msg'], ' us/msg')}"
        f" ({fmt(result['bench_cpu_cores'], ' cores', 2)})",
        f"  checks          sent ok {fmt(result['sent_ok'])}, received {fmt(result['received_distinct'])},"
        f" lost {result['lost']}, duplicates {result['duplicates']}, out of order {result['out_of_order']},"
        f" misaddressed {result['misaddressed']}, {'errors' if name == 'mosquitto' else 'RPC errors'}"
        f" {result['rpc_errors']}, connection errors {result['connection_errors']}",
    ]
    for where, obj in run.errors:
        lines.append(f"  error           {where}: {_dumps(obj).decode()[:300]}")
    for problem in run.connection_errors[:ERRORS_KEPT]:
        lines.append(f"  connection      {problem}")
    return "\n".join(lines)


def overload_summary(result: dict, run: Run, fmt) -> str:
    shed, ok = result["flood_shed"], result["flood_sent_ok"]
    lines = [
        f"devastator bench: mode=overload bystanders={result['pairs']} pairs at {fmt(result['rate'], '/s', 0)},"
        f" flooders={result['flooders']} window={result['window']}",
        f"  bystanders      alone: p50 {fmt(result['baseline_p50_ms'], ' ms', 2)}, p99"
        f" {fmt(result['baseline_p99_ms'], ' ms', 2)} ({fmt(result['baseline_messages'])} messages)",
        f"                  with the flood: p50 {fmt(result['p50_ms'], ' ms', 2)},"
        f" p99 {fmt(result['p99_ms'], ' ms', 2)}, max {fmt(result['max_ms'], ' ms', 2)}"
        f" ({fmt(result['flood_messages'])} messages);"
        f" {fmt(result['bystander_shed'])} answered -32003",
        f"  flood           {fmt(ok + shed)} answers in {fmt(result['duration'], ' s', 2)}:"
        f" {fmt(result['flood_ok_per_s'], '/s')} stored, {fmt(result['flood_shed_per_s'], '/s')} answered -32003"
        f" ({fmt(None if result['flood_shed_ratio'] is None else result['flood_shed_ratio'] * 100, '%')}),"
        f" {fmt(result['flood_shed_without_retry_after'])} of them without retry_after_ms",
        f"  server CPU      alone {fmt(result['server_cpu_cores_baseline'], ' cores', 2)}, with the flood"
        f" {fmt(result['server_cpu_cores'], ' cores', 2)} (busiest second"
        f" {fmt(result['server_cpu_cores_max_1s'], ' cores', 2)}), RSS {fmt(result['server_rss_mb'], ' MB')};"
        f" bench {fmt(result['bench_cpu_cores'], ' cores', 2)}",
    ]
    figures = result["server_overload"]
    if figures is not None:
        lines.append(
            f"  server counted  shed {figures['sends_shed']}, rate limited {figures['sends_rate_limited']},"
            f" connections refused {figures['connections_refused']}"
        )
    lines.append(
        f"  checks          lost {result['lost']}, duplicates {result['duplicates']}, out of order"
        f" {result['out_of_order']}, misaddressed {result['misaddressed']}, RPC errors {result['rpc_errors']},"
        f" connection errors {result['connection_errors']}"
    )
    lines += [f"  error           {where}: {_dumps(obj).decode()[:300]}" for where, obj in run.errors]
    lines += [f"  connection      {problem}" for problem in run.connection_errors[:ERRORS_KEPT]]
    return "\n".join(lines)


def failed(result: dict) -> bool:
    # Lost in online mode too: after the grace period everything accepted must
    # have reached its online recipient.
    return bool(
        result["rpc_errors"] or result.get("lost") or result.get("out_of_order") or result.get("misaddressed")
        or result["connection_errors"] or result.get("receipts_missing") or result.get("receipts_unknown")
        or result.get("receipts_misaddressed")
    )


# -- beside a peer ---------------------------------------------------------------------

# The figures set side by side, per mode, and how each reads: True where more is better.
PEER_FIGURES = {
    "online": [
        ("delivered_per_s", "delivered", "/s", True),
        ("server_cpu_us_per_msg", "server CPU", " us/msg", False),
        ("server_sys_us_per_msg", "  of which system", " us/msg", False),
        ("server_cpu_cores", "server cores", "", False),
        ("server_runqueue_cores", "  waiting for a CPU", " cores", False),
        ("p50_ms", "latency p50", " ms", False),
        ("p99_ms", "latency p99", " ms", False),
        ("server_rss_mb", "server RSS", " MB", False),
        ("bench_cpu_us_per_msg", "bench CPU", " us/msg", False),
    ],
    "offline": [
        ("fill_per_s", "fill", "/s", True),
        ("fill_server_cpu_us_per_msg", "fill server CPU", " us/msg", False),
        ("drain_per_s", "drain", "/s", True),
        ("server_cpu_us_per_msg", "drain server CPU", " us/msg", False),
        ("server_cpu_cores", "drain server cores", "", False),
        ("server_runqueue_cores", "  waiting for a CPU", " cores", False),
        ("server_rss_mb", "server RSS", " MB", False),
        ("bench_cpu_us_per_msg", "drain bench CPU", " us/msg", False),
    ],
    "idle": [
        ("server_kb_per_connection", "memory per connection", " kB", False),
        ("server_rss_before_mb", "server RSS before", " MB", False),
        ("server_rss_after_mb", "server RSS after", " MB", False),
    ],
}
# The run's shape, the same in every round.
CONFIG_KEYS = ("pairs", "window", "connections", "messages", "flooders", "rate")
# One Python process drives the load: near a whole core, it rather than the server sets the pace.
BENCH_BOUND_CORES = 0.85
# Counts that a failed check shows in: over several rounds they add up, never a median.
CHECK_KEYS = ("lost", "duplicates", "out_of_order", "misaddressed", "rpc_errors", "connection_errors",
              "send_errors", "sent_ok", "received_distinct", "delivered")


def merge_rounds(results: list[dict]) -> dict:
    """One result of several rounds: medians of the figures, sums of the checks' counts."""
    if len(results) == 1:
        return dict(results[0])
    merged = {}
    for key, value in results[0].items():
        values = [result.get(key) for result in results]
        if key in CONFIG_KEYS:
            merged[key] = value
        elif key in CHECK_KEYS and all(isinstance(v, int) for v in values):
            merged[key] = sum(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = round(statistics.median(values), 3)
        elif key == "server_pending_after_drain":
            merged[key] = None if None in values else max(values)
        else:
            merged[key] = value
    merged["rounds"] = len(results)
    return merged


def ratio(ours, theirs) -> float | None:
    if ours is None or theirs is None or not theirs:
        return None
    return round(ours / theirs, 3)


def peer_ratios(mode: str, ours: dict, theirs: dict, rounds: list[tuple[dict, dict]]) -> dict:
    """Devastator / peer for each figure: of the medians, and (several rounds) the median of each round's."""
    ratios = {}
    for key, *_ in PEER_FIGURES[mode]:
        ratios[key] = ratio(ours.get(key), theirs.get(key))
        if len(rounds) > 1:
            paired = [r for r in (ratio(a.get(key), b.get(key)) for a, b in rounds) if r is not None]
            ratios[key + "_paired"] = round(statistics.median(paired), 3) if paired else None
    return ratios


def peer_summary(mode: str, peer: str, ours: dict, theirs: dict, ratios: dict, rounds: int) -> str:
    def fmt(value, unit):
        return "n/a" if value is None else f"{value:,.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"

    title = f"devastator / {peer}" + (f" (medians of {rounds} rounds)" if rounds > 1 else "")
    lines = [f"{title}: mode={mode}", f"  {'':24}{'devastator':>16}{peer:>16}{'ratio':>9}"
             + ("  paired" if rounds > 1 else "")]
    for key, label, unit, _ in PEER_FIGURES[mode]:
        value = ratios.get(key)
        line = (f"  {label:24}{fmt(ours.get(key), unit):>16}{fmt(theirs.get(key), unit):>16}"
                f"{'n/a' if value is None else f'{value:.2f}x':>9}")
        if rounds > 1:
            paired = ratios.get(key + "_paired")
            line += f"  {'n/a' if paired is None else f'{paired:.2f}x'}"
        lines.append(line)
    for name, result in (("devastator", ours), (peer, theirs)):
        cores = result.get("bench_cpu_cores")
        if cores is not None and cores >= BENCH_BOUND_CORES:
            lines.append(f"  note: the bench used {cores:.2f} cores with {name}: its own CPU, not {name}'s,"
                         " may have set that rate")
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a Devastator server over TLS.")
    parser.add_argument("--mode", choices=("online", "offline", "idle", "overload"), default="online")
    parser.add_argument("--overload", action="store_const", dest="mode", const="overload",
                        help="the same as --mode overload: bystanders' latency while --flooders flood the server")
    parser.add_argument("--pairs", type=int, default=20, help="sender/recipient pairs (20)")
    parser.add_argument("--window", type=int, default=50, help="msg.send in flight per sender (50)")
    parser.add_argument("--duration", type=float, default=10.0, help="online: measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="online: seconds before measuring (2)")
    parser.add_argument("--messages", type=int, default=50000, help="offline: messages in all (50000)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to wait for the last answers and deliveries (30)")
    parser.add_argument("--connections", type=int, default=2000,
                        help="idle: authenticated connections to hold open (2000)")
    parser.add_argument("--websocket", action="store_true",
                        help="idle: the connections are WebSockets on the HTTP port (/ws, as browsers connect)"
                             " instead of TLS")
    parser.add_argument("--flooders", type=int, default=40,
                        help="overload: users flooding, each with --window sends in flight (40)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="overload: msg.send per second of each bystander, one at a time (20)")
    parser.add_argument("--receipt", action="store_true",
                        help="online: every send asks for receipts; senders check and ACK the delivered receipts")
    parser.add_argument("--coalesce", action="store_true",
                        help="write what one read made room for at once: sends in one write, ACKs in JSON-RPC"
                             " batches of 100 (default: each send and each ACK its own frame and write)")
    parser.add_argument("--peer", choices=("mosquitto",),
                        help="also run the same load against a Mosquitto of the bench's own, after Devastator,"
                             " and report both and their ratio (online, offline, idle)")
    parser.add_argument("--mosquitto", default=DEFAULT_MOSQUITTO, help=f"with --peer: its binary ({DEFAULT_MOSQUITTO})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each server, alternating (A B, B A, ...); medians reported (1)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line of results")
    parser.add_argument("--host", default="127.0.0.1", help="address of the server (127.0.0.1)")
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data dir and server log")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite", help="the server's store (sqlite)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="with --store redis")
    parser.add_argument("--workers", type=int, default=1, help="server processes (1; more need --store redis)")
    parser.add_argument("--server-root", type=Path, default=ROOT,
                        help="the checkout whose bin/devastator and devastator package to use (this one)")
    existing = parser.add_argument_group("an already running server (instead of starting one)")
    existing.add_argument("--server-data-dir", type=Path, help="its data dir (ca.pem, jwt-keys.json, db)")
    existing.add_argument("--tls-port", type=int, help="its TLS port")
    existing.add_argument("--server-pid", type=int, help="its pid, to measure its CPU and RSS")
    existing.add_argument("--http-port", type=int, help="its HTTP port (with --websocket)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.window < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--pairs and --window must be at least 1, --duration positive, --warmup not negative")
    if args.mode == "overload" and (args.flooders < 1 or args.rate <= 0):
        parser.error("--flooders must be at least 1 and --rate positive")
    if args.mode == "offline" and args.messages < args.pairs:
        parser.error("--messages must be at least --pairs")
    if args.workers > 1 and args.store != "redis":
        parser.error("--workers above 1 needs --store redis")
    if (args.server_data_dir is None) != (args.tls_port is None):
        parser.error("--server-data-dir and --tls-port go together")
    if args.websocket and (args.mode != "idle" or args.peer):
        parser.error("--websocket goes with --mode idle, without --peer")
    if args.websocket and args.server_data_dir is not None and args.http_port is None:
        parser.error("--websocket with a running server needs its --http-port")
    if args.receipt and args.mode != "online":
        parser.error("--receipt goes with --mode online")
    if args.peer and args.mode not in PEER_FIGURES:
        parser.error(f"--peer goes with --mode {', '.join(PEER_FIGURES)}")
    if args.peer and args.receipt:
        parser.error("--peer goes without --receipt (MQTT has no delivery receipts)")
    if args.peer == "mosquitto" and not os.access(args.mosquitto, os.X_OK):
        parser.error(f"--peer mosquitto: {args.mosquitto} is not there (Debian's package: apt-get install mosquitto)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.server_root.resolve() != ROOT:
        parser.error("--server-root must be given on the command line (it is read before the package is imported)")
    return args


def bench_devastator(args) -> tuple[dict, Run, bool]:
    """One run against Devastator: (result, run, whether the server stopped cleanly)."""
    server = tmp_dir = bench = None
    clean = kept = True
    try:
        # A key prefix of its own: a shared Redis keeps the runs apart, and counts stay ours.
        env = {**({} if args.mode == "overload" else CAPACITY_SETTINGS), **os.environ,
               "DEVASTATOR_STORE": args.store, "DEVASTATOR_REDIS_URL": args.redis_url}
        if args.server_data_dir is None:
            env["DEVASTATOR_REDIS_PREFIX"] = f"bench-{secrets.token_hex(4)}:"
        if args.server_data_dir is not None:
            data_dir, server_pid = args.server_data_dir, args.server_pid
            address = (args.host, args.tls_port)
            websocket_address = (args.host, args.http_port)
        else:
            tmp_dir = Path(tempfile.mkdtemp(prefix="devastator-bench-"))
            server = ServerProcess(tmp_dir, args.host, env=env, workers=args.workers)
            server.start()
            data_dir, server_pid = tmp_dir, server.pid
            address = (args.host, server.tls_port)
            websocket_address = (args.host, server.http_port)
            print(f"bench: server pid {server.pid} on TLS port {server.tls_port}, data {tmp_dir}", file=sys.stderr)
        settings = store_settings(data_dir, env)
        bench = Bench(args, DevastatorTarget(settings, address, server_pid, server, websocket_address))
        result = run_mode(bench, args)
        if server is not None and not server.alive():
            bench.run.connection_errors.append("the server process died")
            result["connection_errors"] += 1
        kept = args.keep_data or failed(result)
        return result, bench.run, clean
    finally:
        if bench is not None:
            bench.close()
        if server is not None:
            code = server.stop()
            if code not in (0, None):
                print(f"bench: the server exited with status {code}; log tail:\n{server.log_tail()}",
                      file=sys.stderr)
                clean = False
        if tmp_dir is not None:
            if kept or not clean:
                print(f"bench: data and server log kept in {tmp_dir}", file=sys.stderr)
            else:
                shutil.rmtree(tmp_dir, ignore_errors=True)


def bench_mosquitto(args) -> tuple[dict, Run, bool]:
    """The same load against a Mosquitto of our own (bench/mosquitto.py): (result, run, stopped cleanly)."""
    tmp_dir = Path(tempfile.mkdtemp(prefix="devastator-bench-mosquitto-"))
    broker = MosquittoProcess(tmp_dir, args.host, executable=args.mosquitto)
    bench = None
    clean = kept = True
    try:
        broker.start()
        print(f"bench: mosquitto pid {broker.pid} on TLS port {broker.port}, data {tmp_dir}", file=sys.stderr)
        bench = Bench(args, MosquittoTarget(broker))
        result = run_mode(bench, args)
        if not broker.alive():
            bench.run.connection_errors.append("the mosquitto process died")
            result["connection_errors"] += 1
        kept = args.keep_data or failed(result)
        return result, bench.run, clean
    finally:
        if bench is not None:
            bench.close()
        code = broker.stop()
        if code not in (0, None):
            print(f"bench: mosquitto exited with status {code}; log tail:\n{broker.log_tail()}", file=sys.stderr)
            clean = False
        if kept or not clean:
            print(f"bench: mosquitto's config, data and log kept in {tmp_dir}", file=sys.stderr)
        else:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def run_mode(bench: Bench, args) -> dict:
    runs = {"online": bench.run_online, "offline": bench.run_offline, "idle": bench.run_idle,
            "overload": bench.run_overload}
    return runs[args.mode]()


BENCHES = {"devastator": bench_devastator, "mosquitto": bench_mosquitto}


def main(argv=None) -> int:
    args = parse_args(argv)
    main_greenlet = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, lambda: main_greenlet.throw(SystemExit(128 + signal.SIGTERM)))
    # Ctrl-C still reaches the main greenlet; the hub need not print a traceback for it.
    hub = gevent.get_hub()
    hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)
    status = 1
    try:
        names = ["devastator"] + ([args.peer] if args.peer else [])
        results: dict[str, list[dict]] = {name: [] for name in names}
        status = 0
        for round_number in range(args.rounds):
            # One server after the other, never both at once; the order flipped every round
            # so that a machine getting busier or quieter weighs on both alike.
            for name in names if round_number % 2 == 0 else names[::-1]:
                result, run, clean = BENCHES[name](args)
                results[name].append(result)
                if len(names) > 1 or args.rounds > 1:
                    print(f"-- round {round_number + 1} of {args.rounds}: {name}")
                print(summary(result, run, name))
                if failed(result) or not clean:
                    status = 1
        ours = merge_rounds(results["devastator"])
        if args.peer:
            theirs = merge_rounds(results[args.peer])
            ratios = peer_ratios(args.mode, ours, theirs, list(zip(results["devastator"], results[args.peer])))
            print(peer_summary(args.mode, args.peer, ours, theirs, ratios, args.rounds))
            ours = {**ours, "peer": {"name": args.peer, **theirs}, "ratios": ratios}
        elif args.rounds > 1:
            print(f"devastator: medians of {args.rounds} rounds: " + ", ".join(
                f"{key} {ours.get(key)}" for key, *_ in PEER_FIGURES.get(args.mode, ())))
        if args.rounds > 1:
            ours["runs"] = results
        if args.json:
            print(_dumps(ours).decode())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        status = 130
    except SystemExit as stop:
        print("bench: terminated", file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
