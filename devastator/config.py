"""The server's configuration: one typed, validated ``Settings`` object.

``load_settings`` builds it once at start from four layers, each overriding the
one before: the defaults below, an optional TOML file, ``DEVASTATOR_*``
environment variables and command-line overrides. Every value is checked in
one place, and a ``SettingsError`` always names the setting and where its value
came from. Tests skip the layers and use ``Settings().replace(...)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "DEVASTATOR_"
CONFIG_FILE_ENV = "DEVASTATOR_CONFIG"

SQLITE_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(ValueError):
    """A setting has a bad value, or names no setting at all.

    ``setting`` is the setting's name and ``origin`` where the value came from
    (``"from DEVASTATOR_TLS_PORT"``), so that the launcher can print the
    message as is and exit.
    """

    def __init__(self, setting: str, problem: str, *, origin: str | None = None) -> None:
        self.setting = setting
        self.problem = problem
        self.origin = origin
        message = f"setting {setting!r}: {problem}"
        if origin:
            message += f" ({origin})"
        super().__init__(message)

    def located(self, origin: str) -> SettingsError:
        """The same error, saying where the offending value came from."""
        return SettingsError(self.setting, self.problem, origin=origin)


# Room for the rest of a msg.recv request around a message (ids, users, times).
MSG_RECV_ENVELOPE_BYTES = 1024


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with.

    Durations are in seconds, sizes in bytes. Construction validates every
    field, so a ``Settings`` that exists is a valid one.
    """

    data_dir: Path = Path("./devastator-data")
    host: str = "127.0.0.1"
    tls_port: int = 3001  # 0: an ephemeral port (tests)
    http_port: int = 3000  # 0: an ephemeral port (tests)
    ws_tls: bool = False  # serve wss:// with the server certificate
    web_page: bool = True  # serve the chat page at / and the JS client at /client/
    max_connections: int = 10000
    max_frame_bytes: int = 1048576
    max_batch: int = 100
    max_message_bytes: int = 65536
    max_recipients: int = 100
    max_cid_length: int = 128
    default_ttl: int = 2419200  # seconds (4 weeks)
    max_ttl: int = 2419200  # seconds
    # msg.history keeps messages this long whatever their TTL (PROTOCOL.md 7); 0: history off.
    history_period: int = 2592000  # seconds (30 days)
    max_signal_bytes: int = 4096  # a msg.signal's "signal", serialized
    signal_rate: int = 20  # msg.signal per second per connection (a token bucket); 0: no limit
    signal_burst: int = 40  # msg.signal a connection may send at once beyond its rate
    # Unsent output beyond which a connection's signals are dropped: they never delay its messages.
    signal_drop_bytes: int = 262144
    max_read_ids: int = 1000  # message ids in one msg.read
    read_timeout: float = 300.0  # seconds without input before a connection is closed (4003)
    ws_ping_interval: float = 25.0  # seconds of quiet before the server pings a WebSocket
    http_header_timeout: float = 10.0  # seconds for a TLS handshake plus a whole HTTP request head
    frame_timeout: float = 10.0  # seconds for a whole TLS frame once its first byte arrived
    ack_timeout: float = 30.0  # seconds before an unacked delivery is sent again
    delivery_window: int = 1000  # unacked deliveries in flight per device
    max_pending_requests: int = 1000  # unanswered requests per connection before -32003
    max_outbound_bytes: int = 8388608  # unsent output that gets a connection dropped
    # Overload (admission.py, PROTOCOL.md 7): past a limit new sends get -32003, new connections 1013; 0: off.
    overload_cpu_percent: int = 85  # of one core, the process's CPU use over the last 0.2 s
    overload_loop_lag: float = 0.1  # seconds the event loop runs late, on average
    overload_send_wait: float = 0.02  # seconds sends wait for the store longer than usual
    overload_store_queue: int = 20000  # requests waiting for the store actor
    overload_memory_percent: int = 50  # of the machine's memory, the process's resident memory
    overload_retry_after: float = 1.0  # seconds told to a send shed for the store queue, memory, its share
    max_sends_in_flight: int = 500  # msg.send waiting for the store; beyond, each connection a fair share
    user_send_rate: int = 2000  # msg.send per second per user (a token bucket); 0: no limit
    user_send_burst: int = 4000  # msg.send a user may send at once beyond its rate
    connection_send_rate: int = 1000  # msg.send per second per connection; 0: no limit
    connection_send_burst: int = 2000  # msg.send a connection may send at once beyond its rate
    max_connections_per_user: int = 100  # 0: no cap
    user_idle_timeout: float = 60.0  # seconds before an idle user actor is stopped
    tick_interval: float = 1.0  # seconds between timer ticks
    sqlite_synchronous: str = "FULL"  # one of SQLITE_SYNCHRONOUS_MODES
    # Beyond one machine: the Redis store, shared by every node.
    store: str = "sqlite"  # "sqlite" (embedded, one process) or "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster_nodes: tuple[str, ...] = ()  # "host:port" of Redis Cluster nodes; empty: redis_url
    redis_prefix: str = "dv:"  # of every key, so that a shared Redis stays tidy
    redis_socket_timeout: float = 2.0  # seconds a Redis command may take before it fails (-32603), not hangs
    redis_connect_timeout: float = 1.0  # seconds to open a connection to Redis
    node_name: str = ""  # this node's name in the cluster (and its admin socket's); empty: host:pid
    workers: int = 1  # processes sharing the ports (SO_REUSEPORT); more than 1 needs the Redis store
    token_ttl: int = 2592000  # seconds a minted JWT lives by default (30 days)
    cert_days: int = 365  # days an issued client certificate lives
    log_level: str = "INFO"  # one of LOG_LEVELS
    log_json: bool = False
    # auth.google: any OpenID Connect provider; Google's by default. No audiences
    # (your OAuth client ids) means sign-in is off.
    oidc_issuers: tuple[str, ...] = ("https://accounts.google.com", "accounts.google.com")
    oidc_audiences: tuple[str, ...] = ()
    oidc_jwks_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    oidc_ca_file: Path | None = None  # a CA to trust for the key set URL; None: the system's
    oidc_user_prefix: str = "google"  # user ids are "<prefix>-<subject>"
    oidc_clock_skew: float = 60.0  # seconds of leeway on exp and iat
    oidc_refresh_interval: float = 10.0  # seconds at least between key set fetches for unknown kids
    # Push notifications. A provider whose credentials are not set is not started.
    push_quiet_period: float = 300.0  # seconds before an offline device is pushed to again
    push_content: bool = False  # let the newest message's content through Apple or Google
    apns_topic: str = ""  # the app's bundle id; APNs is off without it
    apns_key_file: Path | None = None  # token credentials: the .p8 key...
    apns_key_id: str = ""  # ...its key id...
    apns_team_id: str = ""  # ...and the team id
    apns_cert_file: Path | None = None  # or certificate credentials (PEM with its key)
    apns_sandbox: bool = False  # api.sandbox.push.apple.com instead of api.push.apple.com
    apns_host: str = ""  # another host (a test server); empty: Apple's
    apns_port: int = 443
    apns_ca_file: Path | None = None  # a CA to trust for apns_host
    apns_push_type: str = "alert"  # or "background" (silent, content-available)
    apns_priority: int = 0  # 10 or 5; 0: 10 for alert pushes, 5 for background ones
    apns_expiration: int = 604800  # seconds Apple keeps trying an offline phone; 0: once
    apns_collapse_id: str = "devastator"
    gcm_sender_id: str = ""  # GCM CCS is off without it
    gcm_api_key: str = ""  # empty: GOOGLE_API_KEY (GOOGLE_PREPROD_API_KEY with gcm_preprod)
    gcm_preprod: bool = False  # the pre-production CCS endpoint
    gcm_host: str = ""  # another host (a test server); empty: Google's
    gcm_port: int = 0  # 0: Google's port for production or pre-production
    gcm_ca_file: Path | None = None  # a CA to trust for gcm_host
    gcm_time_to_live: int = 2419200  # seconds Google keeps trying an offline phone
    fcm_service_account_file: Path | None = None  # FCM HTTP v1 is off without it
    fcm_project_id: str = ""  # empty: the service account's project
    fcm_endpoint: str = ""  # another FCM endpoint (a test server); empty: Google's
    fcm_token_uri: str = ""  # another OAuth2 token endpoint; empty: the service account's
    fcm_ca_file: Path | None = None  # a CA to trust for those

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            rule = _RULES[field.name]
            value = getattr(self, field.name)
            if not rule.accepts(value):
                raise SettingsError(field.name, f"expected {rule.expected}, got {value!r}")
            # Normalising here (str -> Path, int -> float, "full" -> "FULL")
            # lets every layer hand over values in their most natural form.
            object.__setattr__(self, field.name, rule.normalize(value))
        if self.workers > 1 and self.store != "redis":
            raise SettingsError(
                "workers",
                f"{self.workers} workers need the Redis store (store = \"redis\"): the embedded"
                " SQLite store is for one process",
            )
        if self.workers > 1 and 0 in (self.tls_port, self.http_port):
            raise SettingsError("workers", "workers share fixed ports: set tls_port and http_port (not 0)")
        if self.default_ttl > self.max_ttl:
            raise SettingsError(
                "default_ttl",
                f"expected at most max_ttl ({self.max_ttl}), got {self.default_ttl!r}",
            )
        # A message must fit, with its msg.recv envelope, in one frame to the recipient.
        largest_message = self.max_frame_bytes - MSG_RECV_ENVELOPE_BYTES
        if self.max_message_bytes > largest_message:
            raise SettingsError(
                "max_message_bytes",
                f"expected at most max_frame_bytes - {MSG_RECV_ENVELOPE_BYTES} ({largest_message}),"
                f" got {self.max_message_bytes!r}",
            )

    @property
    def db_path(self) -> Path:
        """The SQLite database file."""
        return self.data_dir / "devastator.db"

    @property
    def admin_socket(self) -> Path:
        """The admin endpoint's Unix socket (the console's way in); one per named node."""
        return self.data_dir / (f"admin-{self.node_name}.sock" if self.node_name else "admin.sock")

    @property
    def pki_dir(self) -> Path:
        """Where the CA, server certificate and their keys live."""
        return self.data_dir

    def replace(self, **changes: object) -> Settings:
        """A validated copy with ``changes`` applied."""
        for name in changes:
            if name not in _RULES:
                raise _unknown_setting(name, origin="passed to Settings.replace()")
        try:
            return dataclasses.replace(self, **changes)
        except SettingsError as error:
            raise error.located("passed to Settings.replace()") from None


def load_settings(
    *,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build the settings from defaults < TOML file < environment < overrides.

    ``env`` defaults to ``os.environ``; ``config_file`` defaults to the file
    named by ``DEVASTATOR_CONFIG``, if any. ``overrides`` are command-line
    flags keyed by setting name; ``None`` means "flag not given". Raises
    ``SettingsError``.
    """
    if env is None:
        env = os.environ
    values: dict[str, object] = {}
    origins: dict[str, str] = {}

    if config_file is not None:
        file_origin = "from the config_file argument"
    else:
        config_file = env.get(CONFIG_FILE_ENV) or None
        file_origin = f"from {CONFIG_FILE_ENV}"
    if config_file is not None:
        path = Path(config_file)
        for name, value in _read_config_file(path, file_origin).items():
            values[name] = value
            origins[name] = f"from config file {path}"

    for name in _RULES:
        variable = ENV_PREFIX + name.upper()
        text = env.get(variable)
        # An empty variable counts as unset, as shells make it easy to blank
        # a variable but awkward to unset it in some contexts (docker, CI).
        if text is None or not text.strip():
            continue
        origin = f"from {variable}"
        values[name] = _parse_text(name, text, origin)
        origins[name] = origin

    for name, value in (overrides or {}).items():
        if value is None:
            continue
        origin = "from the command line"
        if name not in _RULES:
            raise _unknown_setting(name, origin=origin)
        # argparse without type= hands over strings: read them as env text.
        if isinstance(value, str):
            value = _parse_text(name, value, origin)
        values[name] = value
        origins[name] = origin

    try:
        return Settings(**values)  # type: ignore[arg-type]
    except SettingsError as error:
        raise error.located(origins.get(error.setting, "the default")) from None


def _read_config_file(path: Path, origin: str) -> dict[str, object]:
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except FileNotFoundError:
        raise SettingsError("config", f"config file {str(path)!r} does not exist", origin=origin) from None
    except OSError as error:
        raise SettingsError(
            "config", f"cannot read config file {str(path)!r}: {error.strerror}", origin=origin
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(
            "config", f"config file {str(path)!r} is not valid TOML: {error}", origin=origin
        ) from None
    for name in table:
        if name not in _RULES:
            raise _unknown_setting(name, origin=f"in config file {path}")
    return table


def _parse_text(name: str, text: str, origin: str) -> object:
    rule = _RULES[name]
    try:
        return rule.parse(text.strip())
    except ValueError:
        raise SettingsError(name, f"expected {rule.expected}, got {text!r}", origin=origin) from None


def _unknown_setting(name: str, *, origin: str) -> SettingsError:
    problem = "no such setting"
    close = difflib.get_close_matches(name, list(_RULES), n=1)
    if close:
        problem += f" (did you mean {close[0]!r}?)"
    return SettingsError(name, problem, origin=origin)


# --- How each setting is read from text, checked and normalised. -------------


@dataclass(frozen=True)
class _Rule:
    expected: str  # completes "expected ..." in error messages
    parse: Callable[[str], object]  # text from the environment or a flag
    accepts: Callable[[object], bool]
    normalize: Callable[[object], object] = lambda value: value


def _is_integer(value: object) -> bool:
    # bool is an int subclass; `tls_port = true` is a mistake, not port 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _port_rule() -> _Rule:
    return _Rule(
        expected="an integer from 0 to 65535",
        parse=int,
        accepts=lambda value: _is_integer(value) and 0 <= value <= 65535,  # type: ignore[operator]
    )


def _positive_integer_rule() -> _Rule:
    return _Rule(
        expected="a positive integer",
        parse=int,
        accepts=lambda value: _is_integer(value) and value > 0,  # type: ignore[operator]
    )


def _positive_seconds_rule() -> _Rule:
    return _Rule(
        expected="a positive number of seconds",
        parse=float,
        accepts=lambda value: (
            (_is_integer(value) or isinstance(value, float))
            and math.isfinite(value)  # type: ignore[arg-type]
            and value > 0  # type: ignore[operator]
        ),
        normalize=float,  # type: ignore[arg-type]
    )


_BOOLEAN_WORDS = types.MappingProxyType(
    {
        "1": True, "true": True, "yes": True, "on": True,
        "0": False, "false": False, "no": False, "off": False,
    }
)


def _parse_boolean(text: str) -> bool:
    try:
        return _BOOLEAN_WORDS[text.lower()]
    except KeyError:
        raise ValueError(text) from None


def _boolean_rule() -> _Rule:
    return _Rule(
        expected="a boolean (true/false, yes/no, on/off, 1/0)",
        parse=_parse_boolean,
        accepts=lambda value: isinstance(value, bool),
    )


def _choice_rule(choices: tuple[str, ...]) -> _Rule:
    return _Rule(
        expected="one of " + ", ".join(choices),
        parse=str,
        accepts=lambda value: isinstance(value, str) and value.upper() in choices,
        normalize=lambda value: value.upper(),  # type: ignore[attr-defined]
    )


def _host_rule() -> _Rule:
    return _Rule(
        expected="a host name or IP address",
        parse=str,
        accepts=lambda value: isinstance(value, str) and bool(value.strip()),
        normalize=lambda value: value.strip(),  # type: ignore[attr-defined]
    )


def _non_negative_seconds_rule() -> _Rule:
    return _Rule(
        expected="a number of seconds, 0 or more",
        parse=float,
        accepts=lambda value: (
            (_is_integer(value) or isinstance(value, float))
            and math.isfinite(value)  # type: ignore[arg-type]
            and value >= 0  # type: ignore[operator]
        ),
        normalize=float,  # type: ignore[arg-type]
    )


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _string_list_rule() -> _Rule:
    return _Rule(
        expected="a list of non-empty strings (comma-separated in the environment)",
        parse=_parse_list,
        accepts=lambda value: isinstance(value, (list, tuple))
        and all(isinstance(item, str) and item.strip() for item in value),  # type: ignore[union-attr]
        normalize=lambda value: tuple(item.strip() for item in value),  # type: ignore[union-attr]
    )


def _url_rule() -> _Rule:
    return _Rule(
        expected="an https:// URL",
        parse=str,
        accepts=lambda value: isinstance(value, str) and value.startswith("https://") and len(value) > 8,
    )


def _optional_file_rule() -> _Rule:
    return _Rule(
        expected="a file path, or empty for none",
        parse=lambda text: Path(text) if text else None,
        accepts=lambda value: value is None or (isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))),
        normalize=lambda value: None if value is None else Path(value).expanduser(),  # type: ignore[arg-type]
    )


def _text_rule() -> _Rule:
    return _Rule(
        expected="a string",
        parse=str,
        accepts=lambda value: isinstance(value, str),
        normalize=lambda value: value.strip(),  # type: ignore[attr-defined]
    )


def _word_choice_rule(choices: tuple[str, ...]) -> _Rule:
    return _Rule(
        expected="one of " + ", ".join(choices),
        parse=str,
        accepts=lambda value: isinstance(value, str) and value.lower() in choices,
        normalize=lambda value: value.lower(),  # type: ignore[attr-defined]
    )


def _integer_choice_rule(choices: tuple[int, ...]) -> _Rule:
    return _Rule(
        expected="one of " + ", ".join(map(str, choices)),
        parse=int,
        accepts=lambda value: _is_integer(value) and value in choices,
    )


def _non_negative_integer_rule() -> _Rule:
    return _Rule(
        expected="an integer, 0 or more",
        parse=int,
        accepts=lambda value: _is_integer(value) and value >= 0,  # type: ignore[operator]
    )


def _redis_url_rule() -> _Rule:
    return _Rule(
        expected="a redis://, rediss:// or unix:// URL",
        parse=str,
        accepts=lambda value: isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://")),
    )


def _pattern_rule(expected: str, pattern: str) -> _Rule:
    compiled = re.compile(pattern)
    return _Rule(
        expected=expected,
        parse=str,
        accepts=lambda value: isinstance(value, str) and compiled.fullmatch(value) is not None,
    )


def _directory_rule() -> _Rule:
    return _Rule(
        expected="a directory path",
        parse=Path,
        accepts=lambda value: isinstance(value, (str, os.PathLike)) and bool(os.fspath(value)),
        normalize=lambda value: Path(value).expanduser(),  # type: ignore[arg-type]
    )


_RULES: Mapping[str, _Rule] = types.MappingProxyType(
    {
        "data_dir": _directory_rule(),
        "host": _host_rule(),
        "tls_port": _port_rule(),
        "http_port": _port_rule(),
        "ws_tls": _boolean_rule(),
        "web_page": _boolean_rule(),
        "max_connections": _positive_integer_rule(),
        "max_frame_bytes": _positive_integer_rule(),
        "max_batch": _positive_integer_rule(),
        "max_message_bytes": _positive_integer_rule(),
        "max_recipients": _positive_integer_rule(),
        "max_cid_length": _positive_integer_rule(),
        "default_ttl": _positive_integer_rule(),
        "max_ttl": _positive_integer_rule(),
        "history_period": _non_negative_integer_rule(),
        "max_signal_bytes": _positive_integer_rule(),
        "signal_rate": _non_negative_integer_rule(),
        "signal_burst": _positive_integer_rule(),
        "signal_drop_bytes": _positive_integer_rule(),
        "max_read_ids": _positive_integer_rule(),
        "read_timeout": _positive_seconds_rule(),
        "ws_ping_interval": _positive_seconds_rule(),
        "http_header_timeout": _positive_seconds_rule(),
        "frame_timeout": _positive_seconds_rule(),
        "ack_timeout": _positive_seconds_rule(),
        "delivery_window": _positive_integer_rule(),
        "max_pending_requests": _positive_integer_rule(),
        "max_outbound_bytes": _positive_integer_rule(),
        "overload_cpu_percent": _non_negative_integer_rule(),
        "overload_loop_lag": _non_negative_seconds_rule(),
        "overload_send_wait": _non_negative_seconds_rule(),
        "overload_store_queue": _non_negative_integer_rule(),
        "overload_memory_percent": _non_negative_integer_rule(),
        "overload_retry_after": _positive_seconds_rule(),
        "max_sends_in_flight": _non_negative_integer_rule(),
        "user_send_rate": _non_negative_integer_rule(),
        "user_send_burst": _positive_integer_rule(),
        "connection_send_rate": _non_negative_integer_rule(),
        "connection_send_burst": _positive_integer_rule(),
        "max_connections_per_user": _non_negative_integer_rule(),
        "user_idle_timeout": _positive_seconds_rule(),
        "tick_interval": _positive_seconds_rule(),
        "sqlite_synchronous": _choice_rule(SQLITE_SYNCHRONOUS_MODES),
        "store": _word_choice_rule(("sqlite", "redis")),
        "redis_url": _redis_url_rule(),
        "redis_cluster_nodes": _string_list_rule(),
        "redis_prefix": _text_rule(),
        "redis_socket_timeout": _positive_seconds_rule(),
        "redis_connect_timeout": _positive_seconds_rule(),
        "node_name": _pattern_rule("up to 64 characters of A-Z a-z 0-9 . _ -", r"[A-Za-z0-9._-]{0,64}"),
        "workers": _positive_integer_rule(),
        "token_ttl": _positive_integer_rule(),
        "cert_days": _positive_integer_rule(),
        "log_level": _choice_rule(LOG_LEVELS),
        "log_json": _boolean_rule(),
        "oidc_issuers": _string_list_rule(),
        "oidc_audiences": _string_list_rule(),
        "oidc_jwks_url": _url_rule(),
        "oidc_ca_file": _optional_file_rule(),
        "oidc_user_prefix": _pattern_rule("1 to 16 characters of A-Z a-z 0-9 . _", r"[A-Za-z0-9._]{1,16}"),
        "oidc_clock_skew": _non_negative_seconds_rule(),
        "oidc_refresh_interval": _non_negative_seconds_rule(),
        "push_quiet_period": _non_negative_seconds_rule(),
        "push_content": _boolean_rule(),
        "apns_topic": _text_rule(),
        "apns_key_file": _optional_file_rule(),
        "apns_key_id": _text_rule(),
        "apns_team_id": _text_rule(),
        "apns_cert_file": _optional_file_rule(),
        "apns_sandbox": _boolean_rule(),
        "apns_host": _text_rule(),
        "apns_port": _port_rule(),
        "apns_ca_file": _optional_file_rule(),
        "apns_push_type": _word_choice_rule(("alert", "background")),
        "apns_priority": _integer_choice_rule((0, 5, 10)),
        "apns_expiration": _non_negative_integer_rule(),
        "apns_collapse_id": _text_rule(),
        "gcm_sender_id": _text_rule(),
        "gcm_api_key": _text_rule(),
        "gcm_preprod": _boolean_rule(),
        "gcm_host": _text_rule(),
        "gcm_port": _port_rule(),
        "gcm_ca_file": _optional_file_rule(),
        "gcm_time_to_live": _non_negative_integer_rule(),
        "fcm_service_account_file": _optional_file_rule(),
        "fcm_project_id": _text_rule(),
        "fcm_endpoint": _text_rule(),
        "fcm_token_uri": _text_rule(),
        "fcm_ca_file": _optional_file_rule(),
    }
)
