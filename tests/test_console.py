"""bin/devastator-console as an operator uses it: subprocesses against a real running server.

The server runs in this process (the ``running`` fixture) and answers on
``<data_dir>/admin.sock``; the console is a real subprocess, one-shot with
pipes or interactive on a pseudo-terminal. gevent's subprocess and
non-blocking reads of the terminal keep the server's loop turning meanwhile.
"""
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import gevent
import gevent.os
import orjson
import pytest

from devastator.console import (
    AdminClient,
    AdminConnectionError,
    format_age,
    format_table,
    render_stats,
)
from devastator.protocol import ErrorResponse, Notification, Response, encode, encode_frames
from devastator.protocol.errors import RpcError

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = [sys.executable, str(ROOT / "bin" / "devastator-console")]
PROMPT = "devastator> "


@pytest.fixture
def env(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    # A dumb terminal: readline completes and keeps history, without escape sequences to wade through.
    return dict(os.environ, HOME=str(home), TERM="dumb")


def console(running, *args, env, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*CONSOLE, "--data-dir", str(running.settings.data_dir), *args],
        capture_output=True, text=True, timeout=20, env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, result.stderr
    return result


def json_of(running, *args, env):
    return orjson.loads(console(running, "--json", *args, env=env).stdout)


# -- one-shot commands ------------------------------------------------------------------------


def test_actors_lists_a_connected_device(running, env):
    running.connect("bob", "phone")
    listing = json_of(running, "actors", env=env)
    devices = [actor for actor in listing["actors"] if actor["kind"] == "DeviceActor"]
    assert [device["id"] for device in devices] == ["bob/phone"]
    assert devices[0]["remote"].startswith("127.0.0.1:")
    assert {"kind": "UserActor", "id": "bob", "inbox": 0} in listing["actors"]
    assert listing["kinds"]["DeviceActor"]["count"] == 1 and listing["truncated"] is False

    table = console(running, "actors", env=env).stdout
    assert "KIND" in table and "INBOX" in table and "REMOTE" in table
    assert any(line.split()[:2] == ["DeviceActor", "bob/phone"] for line in table.splitlines())


def test_user_and_device_show_the_messages_pending_for_an_offline_user(running, env):
    running.token("bob", "phone")
    sent = running.connect("alice").send("bob", {"text": "hello, bob"})

    (device,) = json_of(running, "user", "bob", env=env)["devices"]
    assert device["device"] == "phone" and device["online"] is False
    assert device["pending"] == 1 and device["oldest_pending_age_seconds"] >= 0

    table = console(running, "user", "bob", env=env).stdout
    assert "DEVICE" in table and "PENDING" in table and "None" not in table
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["phone"]

    detail = json_of(running, "device", "bob", "phone", env=env)
    (pending,) = detail["pending_messages"]
    assert pending["id"] == sent["id"] and pending["from"] == "alice" and pending["ts"] == sent["ts"]
    readable = console(running, "device", "bob", "phone", env=env).stdout
    assert sent["id"] in readable and "FROM" in readable and "alice" in readable and "ago" in readable


def test_kick_closes_the_connection_and_the_message_stays_pending(running, env):
    bob = running.connect("bob", "phone", auto_ack=False, dedupe=False)
    sent = running.connect("alice").send("bob", "are you there?")
    assert bob.receive(timeout=5)["id"] == sent["id"]  # delivered, not ACKed

    assert json_of(running, "kick", "bob", "phone", env=env) == {"closed": 1}
    assert bob.closed.wait(5)
    assert json_of(running, "device", "bob", "phone", env=env)["pending"] == 1

    bob.reconnect()
    assert bob.receive(timeout=5)["id"] == sent["id"]


def test_send_delivers_as_system_json_or_text(running, env):
    bob = running.connect("bob", "phone")
    out = console(running, "send", "bob", '{"text": "maintenance at noon"}', env=env).stdout
    message = bob.receive(timeout=5)
    assert message["from"] == "system" and message["message"] == {"text": "maintenance at noon"}
    assert out.startswith(f"sent {message['id']} to bob")

    result = json_of(running, "send", "bob", "plain", "words", env=env)
    message = bob.receive(timeout=5)
    assert message["id"] == result["id"] and message["message"] == "plain words"


def test_expire_drops_what_is_pending(running, env):
    running.token("bob", "phone")
    alice = running.connect("alice")
    alice.send("bob", 1)
    alice.send("bob", 2)
    assert json_of(running, "expire", "bob", env=env) == {"expired": 2}
    assert json_of(running, "user", "bob", env=env)["devices"][0]["pending"] == 0


def test_stats_as_json_and_as_a_readable_tree(running, env):
    running.connect("alice").send("alice", "note to self")
    stats = json_of(running, "stats", env=env)
    assert stats["messages"]["accepted"] >= 1 and stats["uptime_seconds"] >= 0
    readable = console(running, "stats", env=env).stdout
    assert readable.startswith("node ") and "\nmessages\n" in readable
    assert "{" not in readable and "None" not in readable


def test_stats_count_receipts_signals_and_history(running, env):
    alice, bob = running.connect("alice"), running.connect("bob")
    alice.send("bob", "ticks", receipt=True)
    bob.receive()
    alice.receive_receipt()
    alice.signal("bob", "typing")
    bob.receive_signal()
    alice.history("bob")
    stats = json_of(running, "stats", env=env)
    assert stats["receipts"] == {"stored": {"delivered": 1}, "delivered": 1}
    assert stats["signals"]["accepted"] == 1 and stats["history_pages"] == 1
    readable = console(running, "stats", env=env).stdout
    assert "\nreceipts\n  stored" in readable and "\nsignals\n  accepted" in readable


def test_watch_prints_one_json_line_per_event_and_stops_after_count(running, env):
    running.token("bob", "phone")
    alice = running.connect("alice")
    watcher = subprocess.Popen(
        [*CONSOLE, "--data-dir", str(running.settings.data_dir), "--json", "watch", "bob", "--count", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        with gevent.Timeout(10):
            assert watcher.stderr.readline().startswith("watching bob")
        ids = [alice.send("bob", n)["id"] for n in (1, 2)]
        out, err = watcher.communicate(timeout=10)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    events = [orjson.loads(line) for line in out.splitlines()]
    assert [(e["user"], e["event"], e["id"]) for e in events] == [("bob", "stored", i) for i in ids]


def test_watch_until_ctrl_c(running, env):
    running.token("bob", "phone")
    watcher = subprocess.Popen(
        [*CONSOLE, "--data-dir", str(running.settings.data_dir), "watch", "bob"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        with gevent.Timeout(10):
            assert watcher.stderr.readline().startswith("watching bob")
            sent = running.connect("alice").send("bob", "hi")
            line = watcher.stdout.readline()
        assert line.split()[1:] == ["stored", "bob", "-", sent["id"]]
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=10)
    finally:
        watcher.kill()
    assert watcher.returncode == 0 and "Traceback" not in err


def test_errors_are_one_line_and_exit_1(running, env):
    unknown = console(running, "user", "nobody", env=env, check=False)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "nobody" in unknown.stderr and "-32602" in unknown.stderr

    running.token("bob", "phone")
    assert console(running, "device", "bob", "tablet", env=env, check=False).returncode == 1
    typo = console(running, "frobnicate", env=env, check=False)
    assert typo.returncode == 2 and "unknown command" in typo.stderr
    usage = console(running, "device", "bob", env=env, check=False)
    assert usage.returncode == 2 and "usage: device USER DEVICE" in usage.stderr


# -- the interactive shell ----------------------------------------------------------------------


class Terminal:
    """A program on a pseudo-terminal; ``expect`` reads without blocking the gevent loop."""

    def __init__(self, args: list[str], env: dict):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True)
        os.close(slave)
        gevent.os.make_nonblocking(self.master)
        self.output = ""
        self._position = 0

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def expect(self, text: str, timeout: float = 10) -> str:
        """Everything from the last match up to ``text``, once it appears."""
        with gevent.Timeout(timeout, AssertionError(f"no {text!r} after {self.output[self._position:]!r}")):
            while (found := self.output.find(text, self._position)) < 0:
                try:
                    chunk = gevent.os.nb_read(self.master, 65536)
                except OSError as error:  # EIO: the program closed the terminal
                    if error.errno != errno.EIO:
                        raise
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed before {text!r}: {self.output[self._position:]!r}")
                self.output += chunk.decode(errors="replace").replace("\r\n", "\n")
        seen = self.output[self._position:found]
        self._position = found + len(text)
        return seen

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        os.close(self.master)


def test_interactive_session_with_completion_help_and_history(running, env):
    running.connect("bob", "phone")
    terminal = Terminal([*CONSOLE, "--data-dir", str(running.settings.data_dir)], env)
    try:
        assert "`help` lists the commands" in terminal.expect(PROMPT)

        terminal.type("actors\r")
        actors = terminal.expect(PROMPT)
        assert "KIND" in actors and "bob/phone" in actors and "UserActor" in actors

        terminal.type("user b\t\r")  # the user id completed from the listing
        user = terminal.expect(PROMPT)
        assert "user bob: its user actor runs" in user
        heading, row = user.splitlines()[-2:]
        assert heading.split()[:2] == ["DEVICE", "REGISTERED"] and row.split()[0] == "phone"

        terminal.type("device bob p\t\r")  # and the device from the listing too
        assert "127.0.0.1:" in terminal.expect(PROMPT)

        terminal.type("sta\t\r")  # completed to stats
        assert "uptime_seconds" in terminal.expect(PROMPT)

        terminal.type("help\r")
        listing = terminal.expect(PROMPT)
        assert "WHAT IT DOES" in listing and "kick USER [DEVICE]" in listing
        terminal.type("help watch\r")
        assert "--count" in terminal.expect(PROMPT)

        terminal.type("user nobody\r")
        assert "error: no user 'nobody'" in terminal.expect(PROMPT)

        terminal.type("quit\r")
        assert terminal.process.wait(10) == 0
    finally:
        terminal.close()
    assert "Traceback" not in terminal.output and "{'" not in terminal.output and "None" not in terminal.output
    history = Path(env["HOME"], ".devastator_console_history")
    assert {"actors", "quit"} <= set(history.read_text().splitlines())
    assert history.stat().st_mode & 0o777 == 0o600  # typed messages stay private


# -- a server that cannot be reached --------------------------------------------------------------


def test_no_server_is_one_clear_line(tmp_path, env):
    data_dir = tmp_path / "data"
    for args in (["actors"], []):  # one-shot, and the shell (which checks before its prompt)
        result = subprocess.run([*CONSOLE, "--data-dir", str(data_dir), *args], capture_output=True,
                                text=True, timeout=20, env=env, stdin=subprocess.DEVNULL)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert str(data_dir / "admin.sock") in result.stderr and "bin/devastator --data-dir" in result.stderr

    data_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # bound, never listening: what a killed server leaves
    stale.bind(str(data_dir / "admin.sock"))
    stale.close()
    result = subprocess.run([*CONSOLE, "--socket", str(data_dir / "admin.sock"), "stats"],
                            capture_output=True, text=True, timeout=20, env=env)
    assert result.returncode == 1 and "connection refused" in result.stderr
    assert "Traceback" not in result.stderr


NOBODY = 65534


def python_nobody_can_run() -> str | None:
    """A Python of this one's version that the user nobody may start (this venv may sit in a private home)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", None),
                  shutil.which("python3"), f"/usr/bin/python{version}", "/usr/bin/python3"]
    for python in dict.fromkeys(filter(None, candidates)):
        try:
            probe = subprocess.run([python, "-I", "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                                   capture_output=True, text=True, timeout=20, cwd="/",
                                   user=NOBODY, group=NOBODY, extra_groups=[])
        except PermissionError:
            continue  # under a directory nobody may not enter
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return python
    return None


@pytest.fixture
def console_for_nobody():
    """The console command as the user nobody can run it, wherever this checkout is.

    A clone under a private directory (root's home is 0700) is out of nobody's
    reach, and so is its .venv: the console, the package and the one library
    it needs (orjson) are copied where anyone may read them, to be run by a
    Python that nobody may start.
    """
    python = python_nobody_can_run()
    assert python is not None, "no Python of this version that the user nobody may run"
    import orjson as orjson_package

    copy = Path(tempfile.mkdtemp(prefix="devastator-console-"))
    try:
        copy.chmod(0o755)
        (copy / "bin").mkdir(mode=0o755)
        shutil.copy(ROOT / "bin" / "devastator-console", copy / "bin")
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / "devastator", copy / "devastator", ignore=ignore)
        shutil.copytree(Path(orjson_package.__file__).parent, copy / "orjson", ignore=ignore)
        for path in copy.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield [python, "-I", str(copy / "bin" / "devastator-console")], copy
    finally:
        shutil.rmtree(copy)


def test_another_unix_user_is_refused_clearly(running, env, request):
    if os.geteuid() == 0:
        # Root reads any directory; the console runs as "nobody", as another operator would.
        command, copy = request.getfixturevalue("console_for_nobody")
        result = subprocess.run([*command, "--data-dir", str(running.settings.data_dir), "actors"],
                                capture_output=True, text=True, timeout=20, env=env, cwd=copy,
                                user=NOBODY, group=NOBODY, extra_groups=[])
    else:
        data_dir = running.settings.data_dir
        data_dir.chmod(0o000)  # as the data directory looks to another user
        try:
            result = console(running, "actors", env=env, check=False)
        finally:
            data_dir.chmod(0o700)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "permission denied" in result.stderr and str(running.settings.admin_socket) in result.stderr
    assert "Traceback" not in result.stderr


# -- the client and the formatting, without a server ---------------------------------------------


def test_client_keeps_notifications_and_drops_answers_it_gave_up_on(tmp_path):
    ours, theirs = socket.socketpair()
    client = AdminClient(ours, tmp_path / "admin.sock")
    event = {"user": "bob", "event": "stored", "ts": 1}
    theirs.sendall(encode_frames([
        encode(Notification("watch.event", event)),
        encode(Response(99, "an answer to a call given up on")),
        encode(Response(1, "pong")),
        encode(ErrorResponse(2, -32602, "no user 'nobody'")),
    ]))
    assert client.call("ping") == "pong"
    with pytest.raises(RpcError) as raised:
        client.call("user", {"user": "nobody"})
    assert (raised.value.code, raised.value.message) == (-32602, "no user 'nobody'")
    assert client.next_notification(timeout=1).params == event
    with pytest.raises(TimeoutError):
        client.call("ping", timeout=0.05)
    theirs.close()
    with pytest.raises(AdminConnectionError):
        client.call("ping")
    client.close()


def test_the_console_module_leaves_gevent_alone():
    code = "import sys, devastator.console; sys.exit('gevent' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=20).returncode == 0


def test_readable_formats():
    assert [format_age(s) for s in (0.4, 3, 125, 3 * 3600 + 5, 2 * 86400, None)] == ["0s", "3s", "2m", "3h", "2d", "-"]
    assert format_table(("NAME", "N"), [("bob", 1), ("alexandra", 12)]).splitlines() == [
        "NAME        N",
        "bob         1",
        "alexandra  12",
    ]
    tree = render_stats({"node": "n:1", "commit_seconds": {"count": 2, "p50": 0.0004}, "errors": {}})
    assert tree.splitlines() == ["node            n:1", "commit_seconds  count 2  p50 0.4ms", "errors          -"]
