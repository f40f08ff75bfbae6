"""The server API's requests and answers (PROTOCOL.md 8), sans-IO.

Routes by path, request bodies to typed requests, and errors to HTTP
answers: every error is ``{"error": {"code", "message", "data"?}}`` with the
JSON-RPC code of the same failure on a socket, and the HTTP status section 8
gives it. No sockets here: transports/api.py reads and writes, the API actor
(actors/api.py) does the work.
"""
from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import errors
from .errors import InvalidParams, InvalidRequest, MethodNotFound, ParseError, RpcError
from .methods import Limits, SendParams, is_valid_device_id, is_valid_user_id, parse_send

PREFIX = "/api/"
SEND = "/api/v1/send"
TOKENS = "/api/v1/tokens"
USER = "/api/v1/users/{user}"
DEVICE = "/api/v1/users/{user}/devices/{device}"
UNKNOWN_ROUTE = "other"  # the telemetry label of a path that is no route
# A body is read up to the message limit and this much for the rest of it (the envelope, "to", "cid").
BODY_ALLOWANCE = 16384

# The methods each route takes; HEAD goes with GET.
ALLOWED = {SEND: ("POST",), TOKENS: ("POST",), USER: ("GET", "HEAD"), DEVICE: ("DELETE",)}
BODY_ROUTES = frozenset((SEND, TOKENS))  # the routes that take a JSON body

# HTTP status of each JSON-RPC code (PROTOCOL.md 8); what is not here is 500.
STATUS = {
    errors.PARSE_ERROR: 415,
    errors.INVALID_REQUEST: 400,
    errors.METHOD_NOT_FOUND: 404,
    errors.INVALID_PARAMS: 400,
    errors.NOT_AUTHENTICATED: 401,
    errors.FORBIDDEN: 401,
    errors.OVERLOADED: 429,
    errors.TOO_LARGE: 413,
    errors.UNKNOWN_RECIPIENT: 404,
    errors.INTERNAL_ERROR: 500,
}


def is_api_path(path: str) -> bool:
    return path == PREFIX[:-1] or path.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: str  # the pattern, e.g. USER: what telemetry counts
    params: dict[str, str] = field(default_factory=dict)  # the path's segments, percent-decoded

    @property
    def allowed(self) -> tuple[str, ...]:
        return ALLOWED[self.route]


def match_route(path: str) -> RouteMatch | None:
    """The route a path names, or None (404). Segments are split, then percent-decoded."""
    if path == SEND or path == TOKENS:
        return RouteMatch(path)
    parts = path.split("/")
    # "", "api", "v1", "users", user[, "devices", device]
    if len(parts) in (5, 7) and parts[:4] == ["", "api", "v1", "users"] and parts[4]:
        if len(parts) == 5:
            return RouteMatch(USER, {"user": _unquote(parts[4])})
        if parts[5] == "devices" and parts[6]:
            return RouteMatch(DEVICE, {"user": _unquote(parts[4]), "device": _unquote(parts[6])})
    return None


def _unquote(segment: str) -> str:
    try:
        return urllib.parse.unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return segment  # not UTF-8 once decoded: kept as sent, and refused as an invalid id


def check_path_ids(match: RouteMatch) -> None:
    """Raises InvalidParams for a user or device id in the path that no user or device can have."""
    user = match.params.get("user")
    if user is not None and not is_valid_user_id(user):
        raise InvalidParams("the user id in the path is not valid (1 to 64 of [A-Za-z0-9._@-])")
    device = match.params.get("device")
    if device is not None and not is_valid_device_id(device):
        raise InvalidParams("the device id in the path is not valid (1 to 64 of [A-Za-z0-9._@-])")


def max_body_bytes(limits: Limits) -> int:
    return limits.max_message_bytes + BODY_ALLOWANCE


def is_json_content_type(value: bytes | None) -> bool:
    """``application/json``, with parameters (``; charset=utf-8``) or without."""
    if value is None:
        return False
    media_type = value.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json"


def parse_body(content_type: bytes | None, body: bytes) -> dict:
    """The JSON object a body holds; ParseError (415) if it is no JSON, InvalidRequest (400) if no object."""
    if not is_json_content_type(content_type):
        raise ParseError("the body must be JSON, sent with 'Content-Type: application/json'")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ParseError(f"the body is not valid JSON: {error}") from None
    if type(value) is not dict:
        raise InvalidRequest("the body must be a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class ApiSend:
    sender: str
    send: SendParams


@dataclass(frozen=True, slots=True)
class TokenRequest:
    user: str
    device: str | None  # None: a new device id is made
    ttl: int  # seconds


@dataclass(frozen=True, slots=True)
class UserLookup:
    user: str


@dataclass(frozen=True, slots=True)
class DeviceRemoval:
    user: str
    device: str


def parse_api_send(body: dict, limits: Limits) -> ApiSend:
    """``POST /api/v1/send``: ``msg.send`` params (``parse_send``) and "from", a valid user id."""
    sender = body.get("from")
    if not is_valid_user_id(sender):
        raise InvalidParams('"from" must be a user id (1 to 64 of [A-Za-z0-9._@-])')
    return ApiSend(sender, parse_send(body, limits))


def parse_token_request(body: dict, max_ttl: int) -> TokenRequest:
    """``POST /api/v1/tokens``: ``{"user", "device"?, "ttl"?}``; ``ttl`` defaults to and is capped at ``max_ttl``."""
    user = body.get("user")
    if not is_valid_user_id(user):
        raise InvalidParams('"user" must be a user id (1 to 64 of [A-Za-z0-9._@-])')
    device = body.get("device")
    if device is not None and not is_valid_device_id(device):
        raise InvalidParams('"device" must be a device id (1 to 64 of [A-Za-z0-9._@-])')
    ttl = body.get("ttl")
    if ttl is None:
        ttl = max_ttl
    else:
        if type(ttl) is float and ttl.is_integer():
            ttl = int(ttl)
        if type(ttl) is not int or ttl <= 0:
            raise InvalidParams('"ttl" must be a positive integer number of seconds')
        ttl = min(ttl, max_ttl)
    return TokenRequest(user, device, ttl)


# -- answers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """An HTTP answer: status, JSON body (None: no body, as for 204) and headers beyond the usual."""

    status: int
    body: bytes | None
    headers: tuple[tuple[str, str], ...] = ()


def ok(result: Any, status: int = 200) -> ApiAnswer:
    return ApiAnswer(status, orjson.dumps(result))


NO_CONTENT = ApiAnswer(204, None)


def error_answer(error: RpcError, status: int | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> ApiAnswer:
    """The answer to a failure: its status (from its code unless given) and the headers it calls for."""
    status = status if status is not None else STATUS.get(error.code, 500)
    described: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        described["data"] = error.data
    if status == 401:
        # RFC 6750 3: a bad key is "invalid_token"; no key at all gets the bare challenge.
        challenge = 'Bearer realm="devastator"'
        if error.code == errors.FORBIDDEN:
            challenge += ', error="invalid_token"'
        headers = (*headers, ("WWW-Authenticate", challenge))
    if status == 429:
        wait_ms = error.data.get("retry_after_ms") if isinstance(error.data, dict) else None
        seconds = math.ceil(wait_ms / 1000) if isinstance(wait_ms, int) else 1
        headers = (*headers, ("Retry-After", str(max(1, seconds))))
    return ApiAnswer(status, orjson.dumps({"error": described}), headers)


def method_not_allowed(match: RouteMatch, method: str) -> ApiAnswer:
    allowed = ", ".join(match.allowed)
    return error_answer(MethodNotFound(f"{match.route} takes {allowed}, not {method}"), 405, (("Allow", allowed),))


def unknown_path(path: str) -> ApiAnswer:
    return error_answer(MethodNotFound(
        f"no API route {path!r}: POST {SEND}, POST {TOKENS}, GET {USER}, DELETE {DEVICE}"))
