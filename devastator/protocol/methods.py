"""Typed, validated params of the client-to-server methods (PROTOCOL.md section 4).

Pure functions from a decoded ``params`` value to a frozen dataclass; every
violation raises InvalidParams naming the field, or TooLarge for size limits.
Optional fields given as null are treated as absent, as most JSON encoders
emit null for an unset field; ``message`` is the exception, where null is a
legitimate payload and only a missing member is an error.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..records import frozen
from .errors import InvalidParams, TooLarge

__all__ = [
    "USER_ID_PATTERN",
    "MAX_JWT_CHARS",
    "MAX_PUSH_TOKEN_CHARS",
    "MAX_CSR_CHARS",
    "PUSH_PLATFORMS",
    "is_valid_user_id",
    "is_valid_device_id",
    "Limits",
    "SendParams",
    "parse_send",
    "EchoParams",
    "parse_echo",
    "JwtAuthParams",
    "parse_auth_jwt",
    "PushRegisterParams",
    "parse_push_register",
    "GoogleAuthParams",
    "parse_auth_google",
    "ReadParams",
    "parse_read",
    "SignalParams",
    "parse_signal",
    "HistoryParams",
    "parse_history",
    "MAX_HISTORY_PAGE",
    "DEFAULT_HISTORY_PAGE",
    "MAX_MESSAGE_ID_CHARS",
]

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_id_fullmatch = USER_ID_PATTERN.fullmatch

MAX_JWT_CHARS = 8192
MAX_PUSH_TOKEN_CHARS = 4096
# A PEM certificate signing request is a few kilobytes even with RSA-4096.
MAX_CSR_CHARS = 16384
PUSH_PLATFORMS = frozenset(("apns", "gcm", "fcm"))
# msg.history pages (PROTOCOL.md 7).
MAX_HISTORY_PAGE = 100
DEFAULT_HISTORY_PAGE = 50
# Message and receipt ids are the server's own (under 100 characters); longer is no id of ours.
MAX_MESSAGE_ID_CHARS = 256


def is_valid_user_id(s: Any) -> bool:
    return type(s) is str and _id_fullmatch(s) is not None


# Device ids follow the user id rule (they share the same contexts: paths,
# certificate names, log lines).
is_valid_device_id = is_valid_user_id


@frozen
class Limits:
    max_message_bytes: int = 65536
    max_recipients: int = 100
    default_ttl: int = 2419200  # 4 weeks, in seconds
    max_ttl: int = 2419200
    max_cid_length: int = 128
    max_signal_bytes: int = 4096
    max_read_ids: int = 1000


@frozen
class SendParams:
    to: tuple[str, ...]
    message_json: bytes
    cid: str | None
    ttl: int
    receipt: bool = False
    # "to" as sent, serialized: a string or an array (what copies to the sender's devices carry).
    to_json: bytes = b""


@frozen
class ReadParams:
    ids: tuple[str, ...]


@frozen
class SignalParams:
    to: tuple[str, ...]
    signal_json: bytes


@frozen
class HistoryParams:
    with_user: str
    before: str | None
    limit: int


@frozen
class EchoParams:
    message_json: bytes


@frozen
class JwtAuthParams:
    token: str


@frozen
class PushRegisterParams:
    platform: str
    token: str


@frozen
class GoogleAuthParams:
    token: str
    device: str | None
    csr: str | None


def _require_object(params: Any) -> dict:
    if type(params) is not dict:
        raise InvalidParams("params must be an object")
    return params


def _message_json(params: dict, limits: Limits) -> bytes:
    return _json_value(params, "message", limits.max_message_bytes)


def _json_value(params: dict, field: str, max_bytes: int) -> bytes:
    """The field's JSON value, serialized; at most ``max_bytes``. Null is a value, a missing field is not."""
    if field not in params:
        raise InvalidParams(f'missing field "{field}"')
    try:
        # Re-serializing normalizes the payload (compact, valid UTF-8) so the
        # stored bytes and the size check agree with what is delivered.
        value_json = orjson.dumps(params[field])
    except orjson.JSONEncodeError as exc:
        raise InvalidParams(f'"{field}" is not serializable: {exc}') from None
    if len(value_json) > max_bytes:
        raise TooLarge(f'"{field}" is {len(value_json)} bytes, over the limit of {max_bytes} bytes')
    return value_json


def _string(params: dict, field: str, max_chars: int, *, required: bool) -> str | None:
    value = params.get(field)
    if value is None:
        if required:
            raise InvalidParams(f'missing field "{field}"')
        return None
    if type(value) is not str or not value:
        raise InvalidParams(f'"{field}" must be a non-empty string')
    if len(value) > max_chars:
        raise InvalidParams(f'"{field}" is longer than {max_chars} characters')
    return value


def _recipients(params: dict, limits: Limits) -> tuple[str, ...]:
    to = params.get("to")
    if type(to) is str:
        if _id_fullmatch(to) is None:
            raise InvalidParams('"to" is not a valid user id')
        return (to,)
    if type(to) is not list or not to:
        raise InvalidParams('"to" must be a user id or a non-empty array of user ids')
    for user in to:
        if type(user) is not str or _id_fullmatch(user) is None:
            raise InvalidParams('"to" contains an invalid user id')
    # dict keeps first-seen order, which is the order the sender listed them.
    unique = tuple(dict.fromkeys(to))
    if len(unique) > limits.max_recipients:
        raise TooLarge(
            f'"to" has {len(unique)} recipients, over the limit of {limits.max_recipients}'
        )
    return unique


def _ttl(params: dict, limits: Limits) -> int:
    ttl = params.get("ttl")
    if ttl is None:
        return min(limits.default_ttl, limits.max_ttl)
    t = type(ttl)
    if t is float and ttl.is_integer():
        # Some encoders (JavaScript's included, via doubles) write 60.0.
        ttl = int(ttl)
    elif t is not int:
        raise InvalidParams('"ttl" must be a positive integer number of seconds')
    if ttl <= 0:
        raise InvalidParams('"ttl" must be a positive integer number of seconds')
    return min(ttl, limits.max_ttl)


def _to_json(to: tuple[str, ...], params: dict) -> bytes:
    return orjson.dumps(to[0] if type(params["to"]) is str else list(to))


def _boolean(params: dict, field: str) -> bool:
    value = params.get(field)
    if value is None:
        return False
    if type(value) is not bool:
        raise InvalidParams(f'"{field}" must be true or false')
    return value


def parse_send(params: Any, limits: Limits) -> SendParams:
    """Validate ``msg.send`` params."""
    params = _require_object(params)
    to = _recipients(params, limits)
    message_json = _message_json(params, limits)
    cid = _string(params, "cid", limits.max_cid_length, required=False)
    receipt = _boolean(params, "receipt")
    return SendParams(to, message_json, cid, _ttl(params, limits), receipt, _to_json(to, params))


def parse_read(params: Any, limits: Limits) -> ReadParams:
    """Validate ``msg.read`` params: ``{"ids": [message ids]}``."""
    ids = _require_object(params).get("ids")
    if type(ids) is not list:
        raise InvalidParams('"ids" must be an array of message ids')
    for message_id in ids:
        if type(message_id) is not str or not message_id or len(message_id) > MAX_MESSAGE_ID_CHARS:
            raise InvalidParams('"ids" must be an array of message ids (non-empty strings)')
    unique = tuple(dict.fromkeys(ids))
    if len(unique) > limits.max_read_ids:
        raise TooLarge(f'"ids" has {len(unique)} ids, over the limit of {limits.max_read_ids}')
    return ReadParams(unique)


def parse_signal(params: Any, limits: Limits) -> SignalParams:
    """Validate ``msg.signal`` params: ``{"to", "signal"}``, the signal at most ``max_signal_bytes``."""
    params = _require_object(params)
    to = _recipients(params, limits)
    return SignalParams(to, _json_value(params, "signal", limits.max_signal_bytes))


def parse_history(params: Any) -> HistoryParams:
    """Validate ``msg.history`` params: ``{"with", "before"?, "limit"?}``."""
    params = _require_object(params)
    with_user = params.get("with")
    if not is_valid_user_id(with_user):
        raise InvalidParams('"with" must be a user id')
    before = _string(params, "before", MAX_MESSAGE_ID_CHARS, required=False)
    limit = params.get("limit")
    if limit is None:
        limit = DEFAULT_HISTORY_PAGE
    elif type(limit) is float and limit.is_integer():
        limit = int(limit)
    if type(limit) is not int or not 1 <= limit <= MAX_HISTORY_PAGE:
        raise InvalidParams(f'"limit" must be an integer from 1 to {MAX_HISTORY_PAGE}')
    return HistoryParams(with_user, before, limit)


def parse_echo(params: Any, limits: Limits) -> EchoParams:
    """Validate ``msg.echo`` params."""
    return EchoParams(_message_json(_require_object(params), limits))


def parse_auth_jwt(params: Any) -> JwtAuthParams:
    """Validate ``auth.jwt`` params (shape only; the signature is checked elsewhere)."""
    params = _require_object(params)
    return JwtAuthParams(_string(params, "token", MAX_JWT_CHARS, required=True))  # type: ignore[arg-type]


def parse_push_register(params: Any) -> PushRegisterParams:
    """Validate ``push.register`` params."""
    params = _require_object(params)
    platform = params.get("platform")
    if type(platform) is not str or platform not in PUSH_PLATFORMS:
        raise InvalidParams('"platform" must be one of "apns", "gcm", "fcm"')
    token = _string(params, "token", MAX_PUSH_TOKEN_CHARS, required=True)
    return PushRegisterParams(platform, token)  # type: ignore[arg-type]


def parse_auth_google(params: Any) -> GoogleAuthParams:
    """Validate ``auth.google`` params (shape only; token and CSR are verified elsewhere)."""
    params = _require_object(params)
    token = _string(params, "token", MAX_JWT_CHARS, required=True)
    device = params.get("device")
    if device is not None and not is_valid_device_id(device):
        raise InvalidParams('"device" must be 1 to 64 characters of [A-Za-z0-9._@-]')
    csr = _string(params, "csr", MAX_CSR_CHARS, required=False)
    return GoogleAuthParams(token, device, csr)  # type: ignore[arg-type]
