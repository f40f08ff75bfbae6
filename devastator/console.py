"""The operator's console: a blocking client of the admin socket and a shell on top of it.

``bin/devastator-console`` runs one command (``actors``, ``user bob``) and
exits, or, without one, an interactive shell with completion and history.
It speaks the TLS endpoint's framing and JSON-RPC over
``<data_dir>/admin.sock`` through ``devastator.protocol`` (the client half
of the connection session, ``protocol.session.ClientSession``). It is a plain
blocking program: no gevent, no actors.
"""
from __future__ import annotations

import argparse
import cmd
import collections
import contextlib
import inspect
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from .config import SettingsError, load_settings
from .protocol import FrameDecoder, Notification, encode_frame
from .protocol.errors import RpcError
from .protocol.session import Answer, ClientSession
from .unix_socket import usable_path

PROG = "devastator-console"
HISTORY_FILE = ".devastator_console_history"
HISTORY_LENGTH = 1000
CALL_TIMEOUT = 30.0  # seconds: `actors` asks every user and device actor in turn
WATCH_POLL_SECONDS = 0.2  # how soon `watch` notices Ctrl-C
# The server is trusted: a listing of many actors may exceed a device's frame limit.
MAX_FRAME_BYTES = 64 << 20
READ_SIZE = 65536
_DEFAULT: Any = object()


class AdminConnectionError(Exception):
    """The admin socket cannot be reached, or the connection broke; the message is one line for an operator."""


class UsageError(Exception):
    """A command was typed with the wrong arguments; the message says how to type it."""


# -- the client ---------------------------------------------------------------------------


class AdminClient:
    """A blocking JSON-RPC client of the admin socket, one call at a time.

    Notifications (``watch.event``) that arrive while a call waits for its
    answer are kept for ``next_notification``. An answer to a call given up
    on (a timeout, Ctrl-C) is recognised by its id and dropped.
    """

    def __init__(self, sock: socket.socket, path: Path, *, timeout: float = CALL_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._sock = sock
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._session = ClientSession()
        # Bodies read, then handed to the session one at a time, when looked for: an answer
        # read ahead of its call's request is matched once that request is made.
        self._bodies: collections.deque = collections.deque()
        self._incoming: collections.deque = collections.deque()  # the session's events, not yet looked at
        self._notifications: collections.deque[Notification] = collections.deque()

    @classmethod
    def connect(cls, path: str | os.PathLike, *, timeout: float = CALL_TIMEOUT) -> AdminClient:
        """Connect to the socket at ``path``; raises AdminConnectionError saying why not."""
        path = Path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            with usable_path(path) as address:
                sock.connect(address)
        except OSError as error:
            sock.close()
            raise AdminConnectionError(connect_failure(path, error)) from None
        return cls(sock, path, timeout=timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, params: dict | list | None = None, *, timeout: float | None = _DEFAULT) -> Any:
        """The result of ``method``; raises the RpcError the server answered with, or TimeoutError."""
        if timeout is _DEFAULT:
            timeout = self.timeout
        request_id, body = self._session.request(method, params)
        try:
            try:
                self._sock.sendall(encode_frame(body))
            except OSError as error:
                raise AdminConnectionError(f"lost the connection to {self.path}: {_reason(error)}") from None
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                event = self._next_event(deadline, f"no answer to {method!r} within {timeout} s")
                if type(event) is Notification:
                    self._notifications.append(event)
                elif type(event) is Answer and event.id == request_id:
                    if event.error is not None:
                        raise event.error
                    return event.result
        except BaseException:  # a timeout, Ctrl-C: the answer, if it comes, is dropped
            self._session.forget(request_id)
            raise

    def next_notification(self, timeout: float | None = None) -> Notification:
        """The oldest notification not yet taken, waiting up to ``timeout`` (None: for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._notifications:
            event = self._next_event(deadline, f"no notification within {timeout} s")
            if type(event) is Notification:
                self._notifications.append(event)
        return self._notifications.popleft()

    def notifications(self) -> Iterator[Notification]:
        """Notifications as they come, for ever (until the connection closes)."""
        while True:
            yield self.next_notification()

    def discard_notifications(self) -> None:
        self._notifications.clear()

    def _next_event(self, deadline: float | None, timeout_message: str):
        while not self._incoming:
            if self._bodies:
                try:
                    self._incoming.extend(self._session.receive(self._bodies.popleft())[0])
                except RpcError as error:
                    raise AdminConnectionError(f"the server sent something unreadable: {error.message}") from None
                continue
            if deadline is None:
                self._sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(timeout_message)
                self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(READ_SIZE)
            except TimeoutError:
                raise TimeoutError(timeout_message) from None
            except OSError as error:
                raise AdminConnectionError(f"lost the connection to {self.path}: {_reason(error)}") from None
            if not data:
                raise AdminConnectionError(f"the server closed the connection ({self.path})")
            try:
                self._bodies.extend(self._decoder.feed(data))
            except RpcError as error:
                raise AdminConnectionError(f"the server sent something unreadable: {error.message}") from None
        return self._incoming.popleft()


def connect_failure(path: Path, error: OSError) -> str:
    """One line for an operator: why the console cannot reach the server at ``path``, and what to do."""
    start = f"start the server with: bin/devastator --data-dir {path.parent}"
    if isinstance(error, FileNotFoundError):
        return f"no server is running on {path} (the socket does not exist); {start}"
    if isinstance(error, ConnectionRefusedError):
        return f"no server is listening on {path} (connection refused: a stopped server's socket?); {start}"
    if isinstance(error, PermissionError):
        owner = _owner(path)
        who = f" ({owner})" if owner else ""
        return f"permission denied on {path}: only the server's Unix user{who} may connect; run the console as it"
    return f"cannot connect to {path}: {_reason(error)}"


def _owner(path: Path) -> str | None:
    """The user owning the socket, else its directory (the data directory is the server's too)."""
    for candidate in (path, path.parent):
        try:
            return pwd.getpwuid(candidate.stat().st_uid).pw_name
        except (OSError, KeyError):
            continue
    return None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


# -- readable output ------------------------------------------------------------------------


def format_table(headings: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()) -> str:
    """Columns as wide as their widest cell; numbers, and the columns in ``right``, aligned right."""
    rows = [list(row) for row in rows]
    right = set(right)
    for column in range(len(headings)):
        values = [row[column] for row in rows if row[column] is not None]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            right.add(column)
    cells = [list(headings)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headings))]
    lines = []
    for row in cells:
        padded = (
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_pairs(pairs: Iterable[tuple[str, Any]]) -> str:
    """``name  value`` lines, the values in one column."""
    pairs = [(name, _cell(value)) for name, value in pairs]
    width = max((len(name) for name, _ in pairs), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}".rstrip() for name, value in pairs)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def format_age(seconds: float | None) -> str:
    """A duration in its largest whole unit: 3s, 2m, 1h, 4d."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_seconds(seconds: float | None) -> str:
    """A latency: 0.41ms, 12.3ms, 2.5s; a minute or more as an age."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    return format_age(seconds)


def format_time(ms: int | None) -> str:
    """Milliseconds since the epoch as a local time, to the second."""
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def format_clock(ms: int) -> str:
    """Milliseconds since the epoch as the local time of day, to the millisecond."""
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{int(ms) % 1000:03d}"


def _ago(ms: int | None, now: float) -> str:
    if ms is None:
        return "-"
    return f"{format_time(ms)} ({format_age(now - ms / 1000)} ago)"


def _push(platform: str | None, token: str | None) -> str:
    if platform is None:
        return "-"
    if not token:
        return platform
    # Enough of the token to tell two apart, not enough to reuse it from a screenshot.
    return f"{platform} {token[:10]}..." if len(token) > 13 else f"{platform} {token}"


def render_actors(result: dict) -> str:
    actors = result.get("actors", [])
    kinds = result.get("kinds", {})
    total = sum(figures.get("count", 0) for figures in kinds.values())
    lines = [
        f"node {result.get('node', '?')}: {total} actors",
        format_table(
            ("KIND", "COUNT", "INBOX"),
            ((kind, figures.get("count"), figures.get("inbox")) for kind, figures in sorted(kinds.items())),
        ),
        "",
        format_table(
            ("KIND", "ID", "INBOX", "REMOTE"),
            ((a.get("kind"), a.get("id"), a.get("inbox"), a.get("remote", "")) for a in actors),
        ),
    ]
    if result.get("truncated"):
        lines.append(f"(the first {len(actors)} actors only: `actors LIMIT` lists more)")
    return "\n".join(lines)


def render_user(result: dict) -> str:
    live = "its user actor runs" if result.get("live") else "no user actor (no device online)"
    devices = result.get("devices", [])
    heading = f"user {result.get('user')}: {live}, {len(devices)} device(s)"
    if not devices:
        return heading
    table = format_table(
        ("DEVICE", "REGISTERED", "FIRST AUTHENTICATED", "ONLINE ON", "PENDING", "OLDEST", "IN FLIGHT", "PUSH"),
        (
            (
                d.get("device"),
                format_time(d.get("registered")),
                format_time(d.get("first_authenticated")),
                d.get("node") or "-" if d.get("online") else "no",
                d.get("pending"),
                format_age(d.get("oldest_pending_age_seconds")),
                d.get("in_flight"),
                _push(d.get("push_platform"), d.get("push_token")),
            )
            for d in devices
        ),
        right=(5,),
    )
    return f"{heading}\n{table}"


def render_device(result: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    pending = result.get("pending_messages", [])
    oldest = result.get("oldest_pending_age_seconds")
    summary = format_pairs((
        ("device", f"{result.get('user')}/{result.get('device')}"),
        ("registered", _ago(result.get("registered"), now)),
        ("first authenticated", _ago(result.get("first_authenticated"), now)),
        ("online", f"yes, on node {result.get('node')}, from {result.get('remote') or 'another node'}"
         if result.get("online") else "no"),
        ("pending", f"{result.get('pending')}" + (f" (oldest {format_age(oldest)})" if oldest is not None else "")),
        ("in flight", result.get("in_flight")),
        ("push", _push(result.get("push_platform"), result.get("push_token"))),
    ))
    if not pending:
        return summary
    table = format_table(
        ("ID", "FROM", "SENT", "EXPIRES", "BYTES"),
        (
            (
                m.get("id"),
                m.get("from"),
                f"{format_age(now - m['ts'] / 1000)} ago" if m.get("ts") else "-",
                f"in {format_age(m['expires'] / 1000 - now)}" if m.get("expires") else "-",
                m.get("bytes"),
            )
            for m in pending
        ),
        right=(2, 3),
    )
    more = "" if len(pending) >= (result.get("pending") or 0) else f"\n(the oldest {len(pending)} shown)"
    return f"{summary}\n\n{table}{more}"


def render_stats(stats: dict) -> str:
    """The figures as an indented tree; a small group of figures on one line, durations readable."""
    rows: list[tuple[str, str]] = []

    def walk(name: str, value: Any, depth: int, durations: bool) -> None:
        label = "  " * depth + name
        durations = durations or name.endswith("_seconds")
        if isinstance(value, dict):
            if not value:
                rows.append((label, "-"))
            elif len(value) <= 6 and not any(isinstance(v, (dict, list)) for v in value.values()):
                rows.append((label, "  ".join(f"{k} {_figure(k, v, durations)}" for k, v in value.items())))
            else:
                rows.append((label, ""))
                for key, inner in value.items():
                    walk(str(key), inner, depth + 1, durations)
        else:
            rows.append((label, _figure(name, value, durations)))

    for key, value in stats.items():
        walk(str(key), value, 0, False)
    return format_pairs(rows)


def _figure(name: str, value: Any, durations: bool) -> str:
    if durations and name != "count" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_seconds(value)
    return _cell(value)


def render_watch_event(params: dict) -> str:
    ts = params.get("ts")
    return "  ".join((
        format_clock(ts) if isinstance(ts, int) else "-",
        str(params.get("event", "?")).ljust(11),
        str(params.get("user", "?")),
        str(params.get("device") or "-"),
        str(params.get("id") or ""),
    )).rstrip()


# -- the shell --------------------------------------------------------------------------------


class ConsoleShell(cmd.Cmd):
    """The commands, for the interactive shell (``cmdloop``) and for one-shot runs (``execute``).

    ``onecmd`` reports a failed command and carries on, as a shell should;
    ``execute`` lets the error out, for ``main`` to turn into an exit code.
    """

    prompt = "devastator> "
    commands = ("actors", "user", "device", "stats", "kick", "send", "expire", "watch", "help", "quit")

    def __init__(
        self,
        connect: Callable[[], AdminClient],
        *,
        json_output: bool = False,
        stdout=None,
        stderr=None,
    ):
        super().__init__(stdout=stdout)
        self._connect = connect
        self._client: AdminClient | None = None
        self.json_output = json_output
        self.stderr = stderr if stderr is not None else sys.stderr
        self.interactive = False  # Ctrl-C in `watch` prints a newline, prompts follow
        # For completion: the users (and their devices) the last listings named.
        self.known: dict[str, set[str]] = {}

    @property
    def client(self) -> AdminClient:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def execute(self, line: str) -> bool:
        return super().onecmd(line)

    def onecmd(self, line: str) -> bool:
        try:
            return super().onecmd(line)
        except RpcError as error:
            self._error(f"{error.message} (error {error.code})")
        except UsageError as error:
            self._error(str(error))
        except (AdminConnectionError, TimeoutError) as error:
            self._error(str(error))
            self.close()  # the next command connects again
        return False

    def emptyline(self) -> bool:
        return False  # not cmd's default, which repeats the last command (a kick, a send)

    def default(self, line: str) -> bool:
        if line == "EOF":
            self._print("")
            return True
        raise UsageError(f"unknown command {line.split()[0]!r}: `help` lists the commands")

    def _print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _error(self, text: str) -> None:
        print(f"error: {text}", file=self.stderr, flush=True)

    def _show(self, result: Any, render: Callable[[Any], str]) -> None:
        if self.json_output:
            self._print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        else:
            self._print(render(result))

    def _remember(self, user: str, devices: Iterable[str] = ()) -> None:
        self.known.setdefault(user, set()).update(devices)

    # -- commands (the docstrings are the help: usage, a blank line, what it does) -----------------

    def do_actors(self, arg: str) -> None:
        """actors [LIMIT]

        The running actors, by kind and one by one. Each kind with its count
        and the messages waiting in their inboxes; then each actor (at most
        LIMIT, 1000 by default) with its id, inbox and, for a device, the
        remote address."""
        args = _args(arg, 0, 1, "actors [LIMIT]")
        params: dict = {}
        if args:
            if not args[0].isdigit():
                raise UsageError("usage: actors [LIMIT] (LIMIT: a number of actors)")
            params["limit"] = int(args[0])
        result = self.client.call("actors", params)
        for actor in result.get("actors", []):
            if actor.get("kind") == "UserActor":
                self._remember(actor["id"])
            elif actor.get("kind") == "DeviceActor" and "/" in actor.get("id", ""):
                user, device = actor["id"].split("/", 1)
                self._remember(user, (device,))
        self._show(result, render_actors)

    def do_user(self, arg: str) -> None:
        """user USER

        A user's devices and their pending messages. For each device: when it
        was registered and first authenticated, online or not, messages
        pending (and the oldest one's age), in flight, push token."""
        (user,) = _args(arg, 1, 1, "user USER")
        result = self.client.call("user", {"user": user})
        self._remember(user, (d.get("device") for d in result.get("devices", [])))
        self._show(result, render_user)

    def do_device(self, arg: str) -> None:
        """device USER DEVICE

        One device and its oldest pending messages. What `user` shows, the
        remote address, and the oldest 20 pending messages (id, sender, age,
        expiry, size)."""
        user, device = _args(arg, 2, 2, "device USER DEVICE")
        result = self.client.call("device", {"user": user, "device": device})
        self._remember(user, (device,))
        self._show(result, render_device)

    def do_stats(self, arg: str) -> None:
        """stats

        The server's figures. Connections, actors, messages, the store's
        commits, push, requests and errors, delivery latency."""
        _args(arg, 0, 0, "stats")
        self._show(self.client.call("stats"), render_stats)

    def do_kick(self, arg: str) -> None:
        """kick USER [DEVICE]

        Close a user's connections; messages stay pending. Only DEVICE's when
        given, else all the user's; the messages are delivered when the
        device reconnects."""
        args = _args(arg, 1, 2, "kick USER [DEVICE]")
        params = {"user": args[0]} if len(args) == 1 else {"user": args[0], "device": args[1]}
        result = self.client.call("kick", params)
        whose = "/".join(args)
        self._show(result, lambda r: f"closed {r.get('closed')} connection(s) of {whose}; their messages stay pending")

    def do_send(self, arg: str) -> None:
        """send USER[,USER...] MESSAGE

        Send a message as the user "system". MESSAGE is JSON if it parses as
        JSON, else the text as typed: send bob {"text": "hi"}, send bob hi there."""
        parts = arg.strip().split(None, 1)
        if len(parts) != 2:
            raise UsageError("usage: send USER[,USER...] MESSAGE")
        to_text, text = parts
        to: str | list[str] = to_text.split(",") if "," in to_text else to_text
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            message = text
        result = self.client.call("send", {"to": to, "message": message})
        self._show(result, lambda r: f"sent {r.get('id')} to {to_text} at {format_time(r.get('ts'))}")

    def do_expire(self, arg: str) -> None:
        """expire USER

        Expire a user's stored messages now. They will not be delivered."""
        (user,) = _args(arg, 1, 1, "expire USER")
        result = self.client.call("expire", {"user": user})
        self._show(result, lambda r: f"expired {r.get('expired')} message(s) of {user}")

    def do_watch(self, arg: str) -> None:
        """watch USER [--count N]

        Follow a user's deliveries live, until Ctrl-C. One line per event
        (stored, delivered, redelivered, acked, online, offline); with
        --count, stop after N events."""
        args = _args(arg, 1, 3, "watch USER [--count N]")
        count = None
        if len(args) == 3 and args[1] == "--count" and args[2].isdigit():
            count = int(args[2])
        elif len(args) != 1:
            raise UsageError("usage: watch USER [--count N]")
        self.watch(args[0], count)

    def watch(self, user: str, count: int | None = None) -> None:
        client = self.client
        client.call("watch", {"user": user})
        print(f"watching {user}: Ctrl-C to stop", file=self.stderr, flush=True)
        interrupted = []
        # Ctrl-C only sets a flag: a KeyboardInterrupt raised between a recv and the decoding of
        # what it read would lose those bytes, and the unwatch below would wait for an answer
        # that can no longer be read.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        try:
            seen = 0
            while (count is None or seen < count) and not interrupted:
                try:
                    notification = client.next_notification(timeout=WATCH_POLL_SECONDS)
                except TimeoutError:
                    continue
                if notification.method != "watch.event" or not isinstance(notification.params, dict):
                    continue
                if self.json_output:
                    self._print(orjson.dumps(notification.params).decode())
                else:
                    self._print(render_watch_event(notification.params))
                seen += 1
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted and self.interactive:
            self._print("")
        client.call("unwatch", {"user": user})
        client.discard_notifications()

    def do_help(self, arg: str) -> None:
        """help [COMMAND]

        The commands, or how to use one."""
        name = arg.strip()
        if name:
            method = getattr(self, f"do_{name}", None)
            if method is None or name not in self.commands + ("exit",):
                raise UsageError(f"no command {name!r}: `help` lists the commands")
            self._print(inspect.cleandoc(method.__doc__ or name))
            return
        rows = []
        for command in self.commands:
            usage, _, rest = inspect.cleandoc(getattr(self, f"do_{command}").__doc__).partition("\n\n")
            rows.append((usage, rest.replace("\n", " ").split(". ")[0].rstrip(".") + "."))
        self._print(format_table(("COMMAND", "WHAT IT DOES"), rows))

    def do_quit(self, arg: str) -> bool:
        """quit

        Leave the console (also: exit, Ctrl-D)."""
        return True

    def do_exit(self, arg: str) -> bool:
        """exit

        Leave the console (also: quit, Ctrl-D)."""
        return True

    # -- completion ------------------------------------------------------------------------------

    def completenames(self, text: str, *ignored) -> list[str]:
        return [name for name in (*self.commands, "exit") if name.startswith(text)]

    def _complete_ids(self, text: str, line: str, begidx: int, devices: bool) -> list[str]:
        words = line[:begidx].split()
        if len(words) == 1:
            candidates: Iterable[str] = self.known
        elif len(words) == 2 and devices:
            candidates = self.known.get(words[1], ())
        else:
            return []
        return sorted(candidate for candidate in candidates if candidate.startswith(text))

    def complete_user(self, text, line, begidx, endidx):
        return self._complete_ids(text, line, begidx, devices=False)

    complete_expire = complete_watch = complete_send = complete_user

    def complete_device(self, text, line, begidx, endidx):
        return self._complete_ids(text, line, begidx, devices=True)

    complete_kick = complete_device


def _args(arg: str, least: int, most: int, usage: str) -> list[str]:
    args = arg.split()
    if not least <= len(args) <= most:
        raise UsageError(f"usage: {usage}")
    return args


# -- the program ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.socket is not None:
        path = Path(args.socket)
    else:
        overrides = {"data_dir": args.data_dir} if args.data_dir is not None else {}
        try:
            settings = load_settings(config_file=args.config, overrides=overrides)
        except SettingsError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return 2
        path = settings.admin_socket
    shell = ConsoleShell(lambda: AdminClient.connect(path), json_output=args.json)
    try:
        if args.words:
            return _one_shot(shell, args.words, args.count)
        if args.count is not None:
            print(f"{PROG}: --count goes with the watch command", file=sys.stderr)
            return 2
        return _interactive(shell)
    except AdminConnectionError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output (`| head`) has gone; say nothing more to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        shell.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Inspect and steer a running Devastator server through its admin socket. "
            "With a COMMAND, run it and exit; without, an interactive shell "
            "(`help` lists the commands)."
        ),
        epilog="commands: actors [LIMIT] | user USER | device USER DEVICE | stats | kick USER [DEVICE] | "
        "send USER MESSAGE | expire USER | watch USER | help [COMMAND]",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", help="the server's data directory (./devastator-data), for its admin.sock")
    where.add_argument("--socket", help="the admin socket's path (DATA_DIR/admin.sock)")
    parser.add_argument("--config", help="the server's TOML settings file, for its data directory")
    parser.add_argument("--json", action="store_true", help="print results as JSON (watch: one JSON line per event)")
    parser.add_argument("--count", type=int, metavar="N", help="watch: stop after N events")
    parser.add_argument("words", nargs="*", metavar="COMMAND ARGS", help="the command to run, and its arguments")
    return parser


def _one_shot(shell: ConsoleShell, words: list[str], count: int | None) -> int:
    if count is not None:
        if words[0] != "watch":
            print(f"{PROG}: --count goes with the watch command", file=sys.stderr)
            return 2
        words = [*words, "--count", str(count)]
    try:
        shell.execute(" ".join(words))
    except UsageError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except RpcError as error:
        print(f"{PROG}: {error.message} (error {error.code})", file=sys.stderr)
        return 1
    except TimeoutError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0


def _interactive(shell: ConsoleShell) -> int:
    shell.interactive = True
    shell.client.call("ping")  # fail now, not at the first command, if no server answers
    if not sys.stdin.isatty():  # commands piped in: only the answers, and no history
        shell.prompt = ""
        shell.cmdloop("")
        return 0
    intro = f"Devastator console on {shell.client.path}: `help` lists the commands, `quit` leaves."
    with _history():
        while True:
            try:
                shell.cmdloop(intro)
                return 0
            except KeyboardInterrupt:
                # At the prompt or during a call: back to the prompt, as Python's own shell does.
                shell._print("^C")
                intro = ""


@contextlib.contextmanager
def _history() -> Iterator[None]:
    """readline's history in ~/.devastator_console_history (private: it holds typed messages)."""
    try:
        import readline
    except ImportError:  # Python built without it: no history, no completion
        yield
        return
    # Ids hold '-', '.' and '@'; only whitespace separates the words to complete.
    readline.set_completer_delims(" \t\n")
    readline.set_history_length(HISTORY_LENGTH)
    try:
        history = Path.home() / HISTORY_FILE
    except RuntimeError:  # no home directory
        yield
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    try:
        yield
    finally:
        try:
            readline.write_history_file(history)
            os.chmod(history, 0o600)
        except OSError as error:
            print(f"{PROG}: history not saved to {history}: {_reason(error)}", file=sys.stderr)
