"""The command line: ``devastator`` runs the server; the other commands are for operators.

``token``, ``cert issue``, ``user``, ``device`` and ``jwt rotate`` work on the
data directory directly, also while a server runs on it: SQLite serialises
the writes, a running server closes the connections of a removed device
within a second, and picks up rotated JWT keys at their next use.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from .config import Settings, SettingsError, load_settings
from .identity import DeviceIdentity
from .pki import ensure_private_dir
from .protocol import is_valid_device_id, is_valid_user_id
from .store import Store, StoreError
from .store.factory import make_store

DEFAULT_DEVICE = "default"
# Set by the supervisor in each worker's environment (--workers N).
WORKER_INDEX_ENV = "DEVASTATOR_WORKER_INDEX"
WORKER_RESTART_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(config_file=getattr(args, "config", None), overrides=_overrides(args))
    except SettingsError as error:
        print(f"devastator: {error}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    command = args.command or "serve"
    try:
        return _COMMANDS[command](settings, args)
    except StoreError as error:  # the store failed, not the command: Redis down, a database locked too long
        print(f"devastator: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help="data directory (./devastator-data)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML settings file")

    server_flags = argparse.ArgumentParser(add_help=False)
    server_flags.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (127.0.0.1)")
    server_flags.add_argument("--tls-port", default=argparse.SUPPRESS, help="TLS endpoint port (3001)")
    server_flags.add_argument("--http-port", default=argparse.SUPPRESS, help="HTTP/WebSocket port (3000)")
    server_flags.add_argument(
        "--workers", default=argparse.SUPPRESS, help="server processes sharing the ports (1; more need store=redis)"
    )

    parser = argparse.ArgumentParser(
        prog="devastator", parents=[common, server_flags], description="Devastator messaging server."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common, server_flags], help="run the server (the default)")

    token = commands.add_parser("token", parents=[common], help="print a JWT for a user's device")
    token.add_argument("user")
    token.add_argument("--device", default=DEFAULT_DEVICE, help=f"device id ({DEFAULT_DEVICE})")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds (token_ttl setting)")

    page = commands.add_parser(
        "open", parents=[common, server_flags], help="print a URL that opens the chat page signed in as a user"
    )
    page.add_argument("user")
    page.add_argument("--device", default=None, help="device id (web-<random>: each page its own device)")
    page.add_argument("--ttl", type=int, default=None, help="the token's lifetime in seconds (token_ttl setting)")

    user = commands.add_parser("user", parents=[common], help="manage users")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_commands.add_parser("add", parents=[common], help="create a user")
    add.add_argument("user")
    user_commands.add_parser("list", parents=[common], help="list users and their devices")

    device = commands.add_parser("device", parents=[common], help="manage a user's devices")
    device_commands = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    device_list = device_commands.add_parser("list", parents=[common], help="list a user's devices")
    device_list.add_argument("user")
    remove = device_commands.add_parser(
        "remove", parents=[common], help="remove a device: its certificate and tokens stop working"
    )
    remove.add_argument("user")
    remove.add_argument("device")

    cert = commands.add_parser("cert", parents=[common], help="client certificates")
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    issue = cert_commands.add_parser(
        "issue", parents=[common], help="write a key, a client certificate and the CA (PEM) for a device"
    )
    issue.add_argument("user")
    issue.add_argument("--device", default=DEFAULT_DEVICE, help=f"device id ({DEFAULT_DEVICE})")
    issue.add_argument("--out", required=True, help="directory for key.pem, cert.pem and ca.pem")
    issue.add_argument("--days", type=int, default=None, help="lifetime in days (cert_days setting)")

    jwt = commands.add_parser("jwt", parents=[common], help="JWT signing keys")
    jwt_commands = jwt.add_subparsers(dest="jwt_command", metavar="ACTION", required=True)
    jwt_commands.add_parser(
        "rotate", parents=[common], help="sign new tokens with a new key; tokens already issued stay valid"
    )

    apikey = commands.add_parser("apikey", parents=[common], help="keys for the server API (/api/v1/)")
    apikey_commands = apikey.add_subparsers(dest="apikey_command", metavar="ACTION", required=True)
    apikey_create = apikey_commands.add_parser(
        "create", parents=[common], help="make a key and print it (once: only its hash is kept)"
    )
    apikey_create.add_argument("name")
    apikey_commands.add_parser("list", parents=[common], help="list the keys' names, ids and creation times")
    apikey_remove = apikey_commands.add_parser(
        "remove", parents=[common], help="revoke a key: a running server refuses it at its next use"
    )
    apikey_remove.add_argument("name")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    names = {"data_dir": "data_dir", "host": "host", "tls_port": "tls_port", "http_port": "http_port",
             "workers": "workers"}
    return {setting: getattr(args, flag) for flag, setting in names.items() if hasattr(args, flag)}


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # The push libraries narrate every connection at INFO; their trouble is
    # reported by our providers, once per outage.
    for chatty in ("hyper", "slixmpp", "asyncio"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _serve(settings: Settings, args) -> int:
    if settings.workers > 1 and WORKER_INDEX_ENV not in os.environ:
        return _supervise(settings)
    import gevent

    from .server import Server, StartFailed  # the server stack is only imported to serve

    # gevent keeps, for every greenlet, the stack that spawned it and a tree of
    # parents, for debugging only: ~1 KiB per greenlet, 2.8 KiB of an idle
    # connection's 65 (its reader, device and user actors each have one).
    gevent.config.track_greenlet_tree = False
    server = Server(settings)
    try:
        server.start()
    except (OSError, SettingsError, StartFailed) as error:
        logging.getLogger("devastator").error("cannot start: %s", error)
        return 1
    # What start-up built lives as long as the process: keep the collector off it,
    # and let the young generation grow before it is scanned (every message
    # allocates a few short-lived containers).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    return server.serve_forever()  # not 0 when a core actor died: the supervisor starts it again


def _supervise(settings: Settings) -> int:
    """Run ``settings.workers`` server processes on the same ports; restart any that dies.

    Each worker is a node of the cluster (the Redis store), named after this
    one with its index. SIGTERM or SIGINT stops them all.
    """
    import gevent
    import gevent.event

    from .pki import ensure_pki, server_names
    from .secrets import ensure_jwt_keys

    log = logging.getLogger("devastator")
    # Made once here, so that workers starting together do not race to make them.
    ensure_pki(settings.data_dir, server_names(settings.host))
    ensure_jwt_keys(settings.data_dir)
    base = settings.node_name or socket.gethostname().replace(":", "-")[:60]
    command = [sys.executable, "-m", "devastator", *sys.argv[1:]]
    stopping = gevent.event.Event()
    workers: dict[int, subprocess.Popen] = {}

    def start(index: int) -> None:
        env = {**os.environ, WORKER_INDEX_ENV: str(index), "DEVASTATOR_NODE_NAME": f"{base}-w{index}"}
        workers[index] = subprocess.Popen(command, env=env)

    def stop() -> None:
        stopping.set()
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop)
    for index in range(settings.workers):
        start(index)
    log.info("supervising %d workers on ports %d and %d", settings.workers, settings.tls_port, settings.http_port)
    while not stopping.is_set():
        for index, worker in list(workers.items()):
            code = worker.poll()
            if code is not None and not stopping.is_set():
                log.error("worker %d exited with %s; starting it again", index, code)
                stopping.wait(WORKER_RESTART_SECONDS)
                if not stopping.is_set():
                    start(index)
        stopping.wait(0.2)
    for worker in workers.values():
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def _open_store(settings: Settings) -> Store:
    store = make_store(settings)
    store.open()
    return store


def _check_ids(user: str, device: str | None = None) -> bool:
    """True if the ids are valid; else says why on stderr."""
    for kind, value in (("user", user), ("device", device)):
        if value is not None and not (is_valid_user_id(value) if kind == "user" else is_valid_device_id(value)):
            print(f"devastator: invalid {kind} id {value!r} (1-64 of A-Z a-z 0-9 . _ @ -)", file=sys.stderr)
            return False
    return True


def _register_device(settings: Settings, user: str, device: str) -> DeviceIdentity:
    """Create the user if new and register the device: what credentials are issued for."""
    store = _open_store(settings)
    try:
        now_ms = int(time.time() * 1000)
        with store.batch():
            if store.add_user(user, now_ms):
                print(f"created user {user}", file=sys.stderr)
            return DeviceIdentity(user, device, store.add_device(user, device, now_ms))
    finally:
        store.close()


def _token(settings: Settings, args) -> int:
    from .auth import JwtAuthority
    from .secrets import JwtKeyFile

    if not _check_ids(args.user, args.device):
        return 2
    ensure_private_dir(settings.data_dir)
    identity = _register_device(settings, args.user, args.device)
    print(JwtAuthority(JwtKeyFile(settings.data_dir)).mint(identity, args.ttl or settings.token_ttl))
    return 0


def _open(settings: Settings, args) -> int:
    """The chat page's URL with a JWT in its fragment: a fragment is never sent in a request line."""
    import secrets

    from .auth import JwtAuthority
    from .secrets import JwtKeyFile

    device = args.device or f"web-{secrets.token_hex(4)}"
    if not _check_ids(args.user, device):
        return 2
    ensure_private_dir(settings.data_dir)
    identity = _register_device(settings, args.user, device)
    token = JwtAuthority(JwtKeyFile(settings.data_dir)).mint(identity, args.ttl or settings.token_ttl)
    host = "localhost" if settings.host in ("127.0.0.1", "::1", "0.0.0.0", "::") else settings.host
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.ws_tls else "http"
    print(f"{scheme}://{host}:{settings.http_port}/#token={token}")
    return 0


def _cert(settings: Settings, args) -> int:
    from . import pki

    if not _check_ids(args.user, args.device):
        return 2
    days = args.days or settings.cert_days
    if days <= 0:
        print("devastator: --days must be positive", file=sys.stderr)
        return 2
    # The names the server would give its certificate, were this its first start.
    paths = pki.ensure_pki(settings.data_dir, pki.server_names(settings.host))
    identity = _register_device(settings, args.user, args.device)
    key_pem, csr_pem = pki.new_client_key_and_csr()
    ca = pki.CertificateAuthority.load(paths)
    certificate = ca.issue_client_certificate(pki.load_csr(csr_pem), identity, days=days)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pki.write_file_atomically(out / "key.pem", key_pem, mode=pki.PRIVATE_FILE_MODE)
    pki.write_file_atomically(out / "cert.pem", certificate, mode=pki.PUBLIC_FILE_MODE)
    pki.write_file_atomically(out / "ca.pem", ca.certificate_pem, mode=pki.PUBLIC_FILE_MODE)
    print(f"wrote {out / 'key.pem'}, {out / 'cert.pem'} and {out / 'ca.pem'} for {args.user}/{args.device}")
    return 0


def _user(settings: Settings, args) -> int:
    if args.user_command == "add" and not _check_ids(args.user):
        return 2
    ensure_private_dir(settings.data_dir)
    store = _open_store(settings)
    try:
        if args.user_command == "add":
            created = store.add_user(args.user, int(time.time() * 1000))
            print(f"{'created' if created else 'exists'}: {args.user}")
        else:
            for user in store.list_users():
                print(f"{user}\t{' '.join(record.device for record in store.list_devices(user))}")
    finally:
        store.close()
    return 0


def _device(settings: Settings, args) -> int:
    if not _check_ids(args.user, getattr(args, "device", None)):
        return 2
    ensure_private_dir(settings.data_dir)
    store = _open_store(settings)
    try:
        if args.device_command == "list":
            records = store.list_devices(args.user)
            if not records:
                print(f"devastator: user {args.user!r} has no devices", file=sys.stderr)
                return 1
            print("DEVICE\tREGISTERED\tFIRST AUTHENTICATED")
            for record in records:
                print(f"{record.device}\t{_time(record.created)}\t{_time(record.attached)}")
        elif store.remove_device(args.user, args.device, int(time.time() * 1000)):
            print(f"removed {args.user}/{args.device}: its certificate and tokens no longer work")
        else:
            print(f"devastator: user {args.user!r} has no device {args.device!r}", file=sys.stderr)
            return 1
    finally:
        store.close()
    return 0


def _jwt(settings: Settings, args) -> int:
    from .secrets import rotate_jwt_keys

    ensure_private_dir(settings.data_dir)
    keys = rotate_jwt_keys(settings.data_dir)
    print(f"new signing key {keys.current_kid}; {len(keys.keys) - 1} older key(s) still verify tokens")
    return 0


def _apikey(settings: Settings, args) -> int:
    from . import api_keys

    data_dir = settings.data_dir
    try:
        if args.apikey_command == "create":
            key, _ = api_keys.create_api_key(data_dir, args.name)
            print(f"created API key {args.name!r}; it is shown this once, keep it secret:", file=sys.stderr)
            print(key)
        elif args.apikey_command == "list":
            print("NAME\tID\tCREATED")
            for entry in api_keys.load_api_keys(data_dir):
                print(f"{entry.name}\t{entry.id}\t{_time(entry.created)}")
        elif api_keys.remove_api_key(data_dir, args.name):
            print(f"removed API key {args.name!r}: it no longer works")
        else:
            print(f"devastator: no API key named {args.name!r}", file=sys.stderr)
            return 1
    except api_keys.ApiKeyError as error:
        print(f"devastator: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a broken keys file
        print(f"devastator: {error}", file=sys.stderr)
        return 1
    return 0


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


_COMMANDS = {
    "serve": _serve,
    "token": _token,
    "open": _open,
    "cert": _cert,
    "user": _user,
    "device": _device,
    "jwt": _jwt,
    "apikey": _apikey,
}
