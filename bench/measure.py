"""What every target of bench/run.py is measured and checked with, whatever its protocol.

A server process's CPU and memory from /proc (the same meter for Devastator
and for the Mosquitto it is compared with), the message both carry, and the
checks a recipient makes of what arrives (in order per sender, no
duplicates, nothing lost). No protocol and no server here: bench/run.py
(Devastator's JSON-RPC) and bench/mosquitto.py (MQTT) build on it.
"""
from __future__ import annotations

import array
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event

READ_SIZE = 256 * 1024
ERRORS_KEPT = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGE_BYTES = 64  # what one user message weighs on either server (issue 13's load)

_now = time.perf_counter


class BenchError(Exception):
    """The benchmark cannot go on (server did not start, auth failed, ...)."""


class ChildServer:
    """A server run as a subprocess in its own session: started until it listens, stopped with SIGTERM.

    A Ctrl-C in the terminal reaches only the bench (its own session), which
    then stops the server as an operator would.
    """

    name = "the server"

    def __init__(self, log_path: Path, host: str):
        self.log_path = log_path
        self.host = host
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    def _launch(self, command: list[str], port: int, *, cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(cwd), start_new_session=True, env=env,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self._process.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection((self.host, port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not listen within {timeout:.0f} s:\n{self.log_tail()}")
                gevent.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        process = self._process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"bench: {self.name} ignored SIGTERM for {timeout:.0f} s; killing it", file=sys.stderr)
            process.kill()
            return process.wait()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log of {self.name})"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# -- CPU and memory of a process -------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a --workers supervisor and its workers)."""
    pids, index = [pid], 0
    while index < len(pids):
        try:
            with open(f"/proc/{pids[index]}/task/{pids[index]}/children") as children:
                pids.extend(int(child) for child in children.read().split())
        except OSError:
            pass
        index += 1
    return pids


def process_cpu_seconds(pid: int | None) -> tuple[float, float] | None:
    """(utime, stime) in seconds of ``pid`` and its children: fields 14 and 15 of /proc/PID/stat."""
    if pid is None:
        return None
    user = system = 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            if member == pid:
                return None
            continue
        # The command name (field 2) may hold spaces: count the fields after its ")".
        fields = data[data.rindex(b")") + 2:].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def process_runqueue_seconds(pid: int | None) -> float | None:
    """Seconds the threads of ``pid`` and its children were ready to run but waited for a CPU.

    The second field of /proc/PID/task/TID/schedstat. Over a window, divided
    by its length, it says how much of a core the machine's other load kept
    from the server: on a busy machine a server below a whole core was
    starved, not idle.
    """
    if pid is None:
        return None
    total = None
    for member in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{member}/task/{task}/schedstat") as schedstat:
                    total = (total or 0.0) + int(schedstat.read().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                continue
    return total


def process_rss_mb(pid: int | None) -> float | None:
    """Resident memory of ``pid`` and its children."""
    if pid is None:
        return None
    total = None
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total = (total or 0.0) + int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds of the server and of this process between ``start`` and ``stop``."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid

    def start(self) -> None:
        self.started = _now()
        self._server = process_cpu_seconds(self.server_pid)
        self._waited = process_runqueue_seconds(self.server_pid)
        self._own = own_cpu_seconds()

    def stop(self) -> None:
        self.wall = _now() - self.started
        end = process_cpu_seconds(self.server_pid)
        if end is None or self._server is None:
            self.server = self.server_user = self.server_sys = None
        else:
            self.server_user = end[0] - self._server[0]
            self.server_sys = end[1] - self._server[1]
            self.server = self.server_user + self.server_sys
        waited = process_runqueue_seconds(self.server_pid)
        self.server_waited = None if waited is None or self._waited is None else waited - self._waited
        self.own = own_cpu_seconds() - self._own


def percentile_ms(sorted_values, q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000


def per_msg_us(seconds: float | None, count: int) -> float | None:
    if seconds is None or not count:
        return None
    return seconds / count * 1e6


def rounded(value, digits):
    return None if value is None else round(value, digits)


# -- the load ----------------------------------------------------------------------------


def message_json(n: int, sent_at: bytes) -> bytes:
    """The message both servers carry: ``{"n": n, "t": send time, "p": padding}``, MESSAGE_BYTES of JSON.

    ``sent_at`` is ``repr(perf_counter())`` encoded; the padding makes every
    message weigh the same, on Devastator (the ``message`` of a msg.send) and
    on Mosquitto (the payload of a PUBLISH).
    """
    head = b'{"n":%d,"t":%s,"p":"' % (n, sent_at)
    return head + b"x" * (MESSAGE_BYTES - 2 - len(head)) + b'"}'


class Run:
    """State the connections share with the conductor: flags read once per socket read."""

    def __init__(self):
        self.measuring = False
        self.stopping = False
        self.errors: list = []  # the first few error answers, for the report
        self.error_count = 0
        self.connection_errors: list[str] = []

    def error(self, where: str, obj) -> None:
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append((where, obj))


def make_room(seen: bytearray, n: int) -> None:
    """Grow a bytearray indexed by message number so that ``seen[n]`` exists (doubling: n grows by one)."""
    if n >= len(seen):
        seen.extend(bytes(max(n + 1 - len(seen), len(seen))))


def mark(seen: bytearray, n: int) -> None:
    """Set ``seen[n]`` (n: a message's number, dense from 0)."""
    make_room(seen, n)
    seen[n] = 1


class ArrivalChecks:
    """A recipient's tally of one sender's messages: in order, duplicates, latency while measuring.

    Mixed into each protocol's recipient connection; ``done`` is set once
    ``expect`` distinct messages have arrived (and been acknowledged: call
    ``arrivals_written`` after writing the acknowledgements).
    """

    def init_arrivals(self) -> None:
        self.latencies = array.array("d")
        self.sent_times = array.array("d")  # the "t" of each latency: when it was sent
        self.distinct = 0
        self.measured = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.misaddressed = 0
        self.last_n = -1
        self.seen = bytearray(1024)  # by n: received already
        self.expect: int | None = None  # distinct messages to wait for, once known
        self.done = gevent.event.Event()
        self.done_at = 0.0

    def arrived(self, message: dict, now: float, measuring: bool) -> None:
        n = message["n"]
        seen = self.seen
        make_room(seen, n)
        if n > self.last_n:
            self.last_n = n
            seen[n] = 1
            self.distinct += 1
            if measuring:
                self.measured += 1
                self.latencies.append(now - message["t"])
                self.sent_times.append(message["t"])
        elif seen[n]:
            self.duplicates += 1
        else:
            self.out_of_order += 1
            seen[n] = 1
            self.distinct += 1

    def arrivals_written(self) -> None:
        if self.expect is not None and not self.done.is_set() and self.distinct >= self.expect:
            self.done_at = _now()
            self.done.set()

    def set_expect(self, count: int) -> None:
        self.expect = count
        self.arrivals_written()


# -- a client connection and its sending window -----------------------------------------


class MemoryTls:
    """A client's TLS over a plain socket through memory BIOs: ``sendall``, ``recv``, ``close``.

    One ``recv`` takes whatever the kernel holds, many TLS records at once,
    and decrypts them all: a server that writes each packet as a record of
    its own (Mosquitto) costs the bench one system call per read, not one or
    more per record as an ``ssl.SSLSocket`` (OpenSSL without read-ahead) would. Each
    ``sendall`` is one record and one ``send``, as before.
    """

    def __init__(self, raw: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self._raw = raw
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing

    @classmethod
    def handshake(cls, raw: socket.socket, context: ssl.SSLContext, server_hostname: str = "localhost") -> "MemoryTls":
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    raw.sendall(pending)
                data = raw.recv(READ_SIZE)
                if not data:
                    raise ConnectionError("closed by the server during the TLS handshake")
                incoming.write(data)
        pending = outgoing.read()
        if pending:
            raw.sendall(pending)
        raw.settimeout(None)
        return cls(raw, tls, incoming, outgoing)

    def sendall(self, data: bytes) -> None:
        self._tls.write(data)
        self._raw.sendall(self._outgoing.read())

    def recv(self, size: int) -> bytes:
        """The plaintext of every whole record received so far (waits for one); b"" at the end."""
        read, chunks = self._tls.read, []
        while True:
            try:
                while True:
                    chunks.append(read(size))
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # the server's close_notify
                return b"".join(chunks)
            if self._outgoing.pending:  # e.g. an answer to a key update
                self._raw.sendall(self._outgoing.read())
            if chunks:
                return b"".join(chunks)
            data = self._raw.recv(size)
            if not data:
                return b""
            self._incoming.write(data)

    def close(self) -> None:
        self._raw.close()


class TlsConnection:
    """One TLS connection and its greenlet: connect, wait for ``go``, say hello, then serve the socket.

    A protocol's subclass gives its ``hello`` (auth.jwt, CONNECT), its
    decoder (``decode``: bytes in, whole frames or packets out) and the error
    that decoder raises on broken framing, and turns what it decodes into a
    reply (``on_frames``). With ``coalesce`` a subclass answers everything one
    read brought in one write; without, each frame goes in its own write as
    it is made, as a chat client sends. Only this greenlet writes, except
    where a subclass says otherwise, so writes never interleave.
    """

    framing_error: type[Exception] = ValueError

    def __init__(self, run: Run, user: str, token: str | None, ssl_context, address, *, coalesce: bool = False):
        self.run_state = run
        self.user = user
        self._token = token
        self._ssl_context = ssl_context
        self._address = address
        self.coalesce = coalesce
        self.sock = None
        self.connected = gevent.event.Event()
        self.go = gevent.event.Event()  # authenticate now
        self.authenticated = gevent.event.Event()
        self.auth_error = None
        self.closing = False

    def hello(self) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> list:
        raise NotImplementedError

    def on_frames(self, frames: list) -> bytes | None:
        raise NotImplementedError

    def after_frames(self) -> None:
        """After the frames of one read were handled and their answers written."""

    def on_closed(self) -> None:
        pass

    def _connect(self) -> None:
        raw = socket.create_connection(self._address, timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = MemoryTls.handshake(raw, self._ssl_context)

    def main(self) -> None:
        try:
            self._connect()
            self.connected.set()
            self.go.wait()
            self.sock.sendall(self.hello())
            self._loop()
        # Framing: the server broke it. ValueError: ssl's word for a read on a socket closed under us.
        except (OSError, ValueError, self.framing_error) as error:
            if not self.closing:
                self.run_state.connection_errors.append(f"{self.user}: {type(error).__name__}: {error}")
        finally:
            self.connected.set()  # never leave the conductor waiting on a dead connection
            self.authenticated.set()
            self.on_closed()

    def _loop(self) -> None:
        sock = self.sock
        recv = sock.recv
        decode = self.decode
        while True:
            data = recv(READ_SIZE)
            if not data:
                if not self.closing:
                    self.run_state.connection_errors.append(f"{self.user}: closed by the server")
                return
            frames = decode(data)
            if frames:
                out = self.on_frames(frames)
                if out:
                    sock.sendall(out)
                self.after_frames()

    def close(self) -> None:
        self.closing = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


class WindowedSender:
    """A sender's window, mixed into a TlsConnection: ``window`` sends in flight, a new one as each is answered.

    The protocol gives ``encode_send(n, sent_at)``: one whole frame carrying
    ``message_json(n, sent_at)``. Without ``coalesce`` every send is written
    alone, with its own send time; with it, the sends one read made room
    for leave in one write with one send time.
    """

    def init_window(self, window: int, quota: int | None) -> None:
        self.window = window
        self.quota = quota  # None: until the run stops
        self.start = gevent.event.Event()
        self.drained = gevent.event.Event()  # nothing in flight and nothing more to send
        self.next_n = 0
        self.in_flight = 0
        self.ok = 0
        self.ok_measured = 0
        self.errors = 0

    def encode_send(self, n: int, sent_at: bytes) -> bytes:
        raise NotImplementedError

    def open_window(self) -> None:
        """The first ``window`` sends, once ``start`` is set."""
        self.start.wait()
        out = self.send_more(self.window)
        if out:
            self.sock.sendall(out)
        if self.in_flight <= 0:
            self.drained.set()

    def send_more(self, count: int) -> bytes:
        """Up to ``count`` new sends: written one by one, or (coalesce) returned as one buffer."""
        if self.run_state.stopping:
            count = 0
        elif self.quota is not None:
            count = min(count, self.quota - self.next_n)
        if count <= 0:
            return b""
        n = self.next_n
        self.next_n = n + count
        self.in_flight += count
        encode = self.encode_send
        if self.coalesce:
            sent_at = repr(_now()).encode()  # the requests leave together
            return b"".join([encode(i, sent_at) for i in range(n, n + count)])
        sendall = self.sock.sendall
        for i in range(n, n + count):
            sendall(encode(i, repr(_now()).encode()))
        return b""

    def settle(self, answered: int, ok: int) -> bytes:
        """``answered`` sends were answered, ``ok`` of them as stored: count them and refill the window."""
        self.ok += ok
        if self.run_state.measuring:
            self.ok_measured += ok
        self.in_flight -= answered
        out = self.send_more(answered)
        if self.in_flight <= 0:
            self.drained.set()
        return out
