"""The server API on the HTTP port (PROTOCOL.md 8): read a request, check its key, hand it on, write the answer.

transports/http.py hands this module every request under ``/api/`` once
its head is read. In order: the API key (401, for every ``/api/`` path, so
that a client without a key learns nothing, not even which paths exist),
the route (404) and method (405), the ids in the path (400), the body's
size from its Content-Length before any of it is read (413), the body
itself (413 as it is read when it is chunked), then its JSON (415, 400)
and params (400, 413). What passes is told to the API actor
(actors/api.py) as an ``ApiCall``; this greenlet waits for its answer up to
``deadline`` (then 503). Every answer is counted by route pattern and status.

A request answered before its body was read has the body read and dropped
when it is small enough, so that the connection stays in step for the next
request; otherwise (over the limit, or a client waiting for
``100 Continue``) the answer says ``Connection: close``.
"""
from __future__ import annotations

import http
import logging
from typing import Callable

import time

import gevent
import gevent.event
import gevent.lock
import h11
import pykka

from ..actors.messages import ApiCall
from ..admission import AdmissionControl, ConnectionAdmission
from ..api_keys import ApiKeyFile
from ..protocol import Limits
from ..protocol import api
from ..protocol.api import ApiAnswer, DeviceRemoval, RouteMatch, UserLookup, error_answer
from ..protocol.errors import Forbidden, InternalError, NotAuthenticated, RpcError, TooLarge
from ..telemetry import Telemetry
from .endpoint import half_close

log = logging.getLogger(__name__)

READ_SIZE = 65536
DEADLINE = 10.0  # seconds for the API actor to answer a request
ALIVE_CHECK_SECONDS = 0.5  # while waiting: how often to check that the API actor still runs
LINGER_SECONDS = 2.0  # after an answer that closes: how long the peer may take to read it
LINGER_BYTES = 1 << 20  # ...and how much of its unread input is dropped meanwhile


class ApiSession:
    """What an HTTP connection keeps between its API requests: its part in the admission control."""

    def __init__(self, admission: ConnectionAdmission | None):
        self.admission = admission


class ApiEndpoint:
    def __init__(
        self,
        *,
        keys: ApiKeyFile,
        start_actor: Callable[[], pykka.ActorRef],
        limits: Limits,
        token_ttl: int,
        admission: AdmissionControl | None = None,
        telemetry: Telemetry | None = None,
        deadline: float = DEADLINE,
    ):
        self._keys = keys
        self._start_actor = start_actor  # starts an ApiActor (and has the server track it)
        self._actor: pykka.ActorRef | None = None
        self._starting = gevent.lock.Semaphore()  # one actor started at a time, however many requests wait
        self._limits = limits
        self._max_body = api.max_body_bytes(limits)
        self._token_ttl = token_ttl
        self._admission = admission
        self._telemetry = telemetry or Telemetry()
        self._deadline = deadline

    def session(self) -> ApiSession:
        return ApiSession(self._admission.connection() if self._admission is not None else None)

    # -- reading (under the HTTP port's deadline for the request) ------------------------

    def read(self, conn: h11.Connection, sock, request: h11.Request, session: ApiSession):
        """The request's body read and checked: (route label, ApiAnswer or ApiCall request, close after?)."""
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        match = api.match_route(path)
        label = match.route if match is not None else api.UNKNOWN_ROUTE
        method = request.method.decode("ascii", "replace")
        headers = _headers(request)
        try:
            self._authenticate(headers)
        except RpcError as error:
            return label, *self._before_body(conn, sock, headers, error_answer(error))
        if match is None:
            return label, *self._before_body(conn, sock, headers, api.unknown_path(path))
        if method not in match.allowed:
            return label, *self._before_body(conn, sock, headers, api.method_not_allowed(match, method))
        try:
            api.check_path_ids(match)
            declared = _content_length(headers)
            if declared is not None and declared > self._max_body:
                raise TooLarge(f"the body is {declared} bytes, over the limit of {self._max_body} bytes")
        except RpcError as error:
            return label, *self._before_body(conn, sock, headers, error_answer(error))
        if conn.they_are_waiting_for_100_continue:
            sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = _read_body(conn, sock, self._max_body)
        if body is None:  # over the limit as it came (chunked): the rest is not read
            too_large = TooLarge(f"the body is over the limit of {self._max_body} bytes")
            return label, error_answer(too_large), True
        try:
            return label, self._request(match, headers, body), False
        except RpcError as error:
            return label, error_answer(error), False

    def _authenticate(self, headers: dict[bytes, list[bytes]]) -> None:
        values = headers.get(b"authorization", [])
        if not values:
            raise NotAuthenticated("an API key is required: 'Authorization: Bearer <key>'")
        scheme, _, key = values[0].strip().partition(b" ")
        if len(values) > 1 or scheme.lower() != b"bearer" or not key.strip():
            raise NotAuthenticated("an API key is required: one 'Authorization: Bearer <key>' header")
        if self._keys.verify(key.strip().decode("latin-1")) is None:
            raise Forbidden("invalid or revoked API key")

    def _request(self, match: RouteMatch, headers: dict[bytes, list[bytes]], body: bytes):
        if match.route == api.USER:
            return UserLookup(match.params["user"])
        if match.route == api.DEVICE:
            return DeviceRemoval(match.params["user"], match.params["device"])
        content_types = headers.get(b"content-type", [])
        parsed = api.parse_body(content_types[0] if len(content_types) == 1 else None, body)
        if match.route == api.SEND:
            return api.parse_api_send(parsed, self._limits)
        return api.parse_token_request(parsed, self._token_ttl)

    def _before_body(self, conn: h11.Connection, sock, headers, answer: ApiAnswer) -> tuple[ApiAnswer, bool]:
        """An answer given before the body was read: drop a small body so the connection stays in step."""
        if conn.they_are_waiting_for_100_continue:
            return answer, True  # the client sends the body only if told to continue: close instead
        declared = _content_length(headers)
        if declared is not None and declared > self._max_body:
            return answer, True
        return answer, _read_body(conn, sock, self._max_body) is None

    # -- answering -------------------------------------------------------------------------

    def answer(self, request, session: ApiSession) -> ApiAnswer:
        """Tell the API actor and wait for its answer, up to the deadline."""
        if isinstance(request, ApiAnswer):
            return request
        result = gevent.event.AsyncResult()
        try:
            actor = self._actor_ref()
            actor.tell(ApiCall(request, result, session.admission))
        except pykka.ActorDeadError:
            return error_answer(InternalError("the server is stopping; retry later"), 503)
        deadline = time.monotonic() + self._deadline
        while (left := deadline - time.monotonic()) > 0:
            try:
                return result.get(timeout=min(left, ALIVE_CHECK_SECONDS))
            except gevent.Timeout:
                if not actor.is_alive() and not result.ready():
                    # It failed with this call still in its inbox: the call was dropped, nothing done.
                    return error_answer(InternalError("the request was not handled; retry it"), 503)
        return error_answer(InternalError(
            f"no answer within {self._deadline:g} s; a send may still be stored: retry it with its cid"), 503)

    def write(self, conn: h11.Connection, sock, request: h11.Request, label: str, answer: ApiAnswer,
              close: bool) -> None:
        self._telemetry.api_requests[(label, answer.status)] += 1
        headers = [*answer.headers, ("Cache-Control", "no-store")]
        if answer.body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(answer.body))),
                        ("X-Content-Type-Options", "nosniff")]
        if close:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=answer.status, headers=headers,
                                      reason=http.HTTPStatus(answer.status).phrase))
        if answer.body is not None and request.method != b"HEAD":
            data += conn.send(h11.Data(data=answer.body))
        data += conn.send(h11.EndOfMessage())
        sock.sendall(data)
        if close:
            linger(sock)

    def count(self, path: str, status: int) -> None:
        """An API request the HTTP port answered itself (a timeout, a malformed body)."""
        match = api.match_route(path)
        self._telemetry.api_requests[(match.route if match is not None else api.UNKNOWN_ROUTE, status)] += 1

    def _actor_ref(self) -> pykka.ActorRef:
        with self._starting:
            ref = self._actor
            if ref is None or not ref.is_alive():
                if ref is not None:
                    log.error("the API actor died (its error is logged above): starting a fresh one")
                ref = self._actor = self._start_actor()
            return ref


def linger(sock) -> None:
    """Half-close, then drop what the peer still sends for a while: an unread input would reset the answer."""
    half_close(sock)
    dropped = 0
    with gevent.Timeout(LINGER_SECONDS, False):
        while dropped < LINGER_BYTES:
            data = sock.recv(READ_SIZE)
            if not data:
                break
            dropped += len(data)


def _headers(request: h11.Request) -> dict[bytes, list[bytes]]:
    headers: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:  # h11 gives the names lower-cased
        headers.setdefault(bytes(name), []).append(bytes(value))
    return headers


def _content_length(headers: dict[bytes, list[bytes]]) -> int | None:
    values = headers.get(b"content-length")
    return int(values[0]) if values else None  # h11 checked it is one valid number


def _read_body(conn: h11.Connection, sock, limit: int) -> bytes | None:
    """The whole body, or None once it is over ``limit`` (the rest is left unread)."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(READ_SIZE))
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                return None
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return b"".join(parts)
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed in a request body", error_status_hint=400)

