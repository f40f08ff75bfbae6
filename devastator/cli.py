"""The command line: ``devastator`` runs the server; ``token`` and ``user`` are for operators."""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time

import orjson

from .config import Settings, SettingsError, load_settings
from .protocol import is_valid_device_id, is_valid_user_id
from .store import SqliteStore

DEFAULT_DEVICE = "default"


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
    return _COMMANDS[command](settings, args)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help="data directory (./devastator-data)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML settings file")

    server_flags = argparse.ArgumentParser(add_help=False)
    server_flags.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (127.0.0.1)")
    server_flags.add_argument("--tls-port", default=argparse.SUPPRESS, help="TLS endpoint port (3001)")
    server_flags.add_argument("--http-port", default=argparse.SUPPRESS, help="HTTP/WebSocket port (3000)")

    parser = argparse.ArgumentParser(
        prog="devastator", parents=[common, server_flags], description="Devastator messaging server."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common, server_flags], help="run the server (the default)")

    token = commands.add_parser("token", parents=[common], help="print a JWT for a user's device")
    token.add_argument("user")
    token.add_argument("--device", default=DEFAULT_DEVICE, help=f"device id ({DEFAULT_DEVICE})")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds (token_ttl setting)")

    user = commands.add_parser("user", parents=[common], help="manage users")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_commands.add_parser("add", parents=[common], help="create a user")
    add.add_argument("user")
    user_commands.add_parser("list", parents=[common], help="list users and their devices")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    names = {"data_dir": "data_dir", "host": "host", "tls_port": "tls_port", "http_port": "http_port"}
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
    from .server import Server  # the server stack is only imported to serve

    server = Server(settings)
    try:
        server.start()
    except OSError as error:
        logging.getLogger("devastator").error("cannot start: %s", error)
        return 1
    # What start-up built lives as long as the process: keep the collector off it,
    # and let the young generation grow before it is scanned (every message
    # allocates a few short-lived containers).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    server.serve_forever()
    return 0


def _open_store(settings: Settings) -> SqliteStore:
    store = SqliteStore(settings.db_path, synchronous=settings.sqlite_synchronous)
    store.open()
    return store


def _token(settings: Settings, args) -> int:
    from .auth import JwtAuthority
    from .pki import ensure_private_dir
    from .secrets import ensure_jwt_keys

    if not is_valid_user_id(args.user):
        print(f"devastator: invalid user id {args.user!r} (1-64 of A-Z a-z 0-9 . _ @ -)", file=sys.stderr)
        return 2
    if not is_valid_device_id(args.device):
        print(f"devastator: invalid device id {args.device!r} (1-64 of A-Z a-z 0-9 . _ @ -)", file=sys.stderr)
        return 2
    ensure_private_dir(settings.data_dir)
    authority = JwtAuthority(ensure_jwt_keys(settings.data_dir))
    store = _open_store(settings)
    try:
        now_ms = int(time.time() * 1000)
        with store.batch():
            if store.add_user(args.user, now_ms):
                print(f"created user {args.user}", file=sys.stderr)
            store.add_device(args.user, args.device, now_ms)
    finally:
        store.close()
    print(authority.mint(args.user, args.device, args.ttl or settings.token_ttl))
    return 0


def _user(settings: Settings, args) -> int:
    if args.user_command == "add" and not is_valid_user_id(args.user):
        print(f"devastator: invalid user id {args.user!r} (1-64 of A-Z a-z 0-9 . _ @ -)", file=sys.stderr)
        return 2
    from .pki import ensure_private_dir

    ensure_private_dir(settings.data_dir)
    store = _open_store(settings)
    try:
        if args.user_command == "add":
            created = store.add_user(args.user, int(time.time() * 1000))
            print(f"{'created' if created else 'exists'}: {args.user}")
        else:
            for user in store.list_users():
                print(f"{user}\t{' '.join(store.list_devices(user))}")
    finally:
        store.close()
    return 0


_COMMANDS = {"serve": _serve, "token": _token, "user": _user}
