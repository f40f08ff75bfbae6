"""The per-connection JSON-RPC session, both halves, as sans-IO state machines.

``ServerSession`` is what a device actor (and, configured open, the admin
actor) keeps per connection: bodies in (``receive``), typed events out
(``next_event``: a ``Call`` to act on, the delivery ``Acks`` of a read, a
client's ``ErrorResponse``, a ``Close``), outcomes back in (``answer``,
``defer``/``resolve``, ``auth_succeeded``/``auth_failed``, ``refuse``) and the
bytes to write out (``data_to_send``). As in h11's ``Connection``, the
states are explicit and every move is looked up in one table, ``TRANSITIONS``;
what a state refuses is in ``REFUSALS`` with its error; a pair in neither is
dropped (an ACK before auth) or, for an outcome, a bug (``SessionError``).

    new --auth.*--> authenticating --auth_succeeded--> authenticated
      ^                  |  (later reads held, in order)
      +--auth_failed-----+                 any state --close--> closed

``ClientSession`` is the other half, for devastator/client.py and the
console: request ids, answers matched to their requests (in batches too),
the server's requests and notifications passed on, ACK bytes, ``conn.close``
recognised.

No sockets, greenlets or actors here: the actors own the I/O and the
collaborators; PROTOCOL.md is the contract.
"""
from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from ..records import frozen
from .errors import InvalidRequest, MethodNotFound, NotAuthenticated, Overloaded, ParseError, RpcError
from .jsonrpc import (
    Batch,
    ErrorResponse,
    Invalid,
    Notification,
    Request,
    Response,
    decode,
    encode,
    encode_batch,
    encode_batches,
)
from .close_codes import CLOSE_INVALID_DATA, CLOSE_OVERLOADED

__all__ = [
    "State",
    "Kind",
    "TRANSITIONS",
    "REFUSALS",
    "SessionConfig",
    "SessionError",
    "ServerSession",
    "Call",
    "Acks",
    "Close",
    "ClientSession",
    "Answer",
    "CloseNotice",
    "CLOSE_INVALID_DATA",
    "CLOSE_OVERLOADED",
    "DELIVERY_CHUNK",
    "RETRY_AFTER_ANSWERS_MS",
]

# Close codes the session itself decides (PROTOCOL.md 7); the actor has the others.
# The protocol sends a backlog in JSON-RPC batches of at most this many requests.
DELIVERY_CHUNK = 100
# -32003 for a bound of the connection's own: its requests are answered within a commit or two.
RETRY_AFTER_ANSWERS_MS = 100


# str mixins: the table is looked up on every frame, and str hashes in C (Enum's own __hash__ is Python).
class State(str, enum.Enum):
    NEW = "new"
    AUTHENTICATING = "authenticating"  # an auth.* is under way: later reads wait for its outcome
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"  # nothing more is read or written


class Kind(str, enum.Enum):
    """What moves the session: what the client sent, or what the actor tells it."""

    PING = "ping"
    AUTH = "auth"  # an auth.* method of the configured ones
    CALL = "call"  # any other method
    ACK = "ack"  # a response "ACK" to a server request (a delivery)
    CLIENT_ERROR = "client_error"  # an error response to a server request
    AUTH_SUCCEEDED = "auth_succeeded"
    AUTH_FAILED = "auth_failed"
    CLOSE = "close"


NEW, AUTHENTICATING, AUTHENTICATED, CLOSED = State
PING, AUTH, CALL, ACK, CLIENT_ERROR, AUTH_SUCCEEDED, AUTH_FAILED, CLOSE = Kind

TRANSITIONS: dict[tuple[State, Kind], State] = {
    (NEW, PING): NEW,
    (NEW, AUTH): AUTHENTICATING,
    (NEW, CLOSE): CLOSED,
    # Only inside the batch that carried the auth.*: later reads are held.
    (AUTHENTICATING, PING): AUTHENTICATING,
    (AUTHENTICATING, AUTH_SUCCEEDED): AUTHENTICATED,
    (AUTHENTICATING, AUTH_FAILED): NEW,
    (AUTHENTICATING, CLOSE): CLOSED,
    (AUTHENTICATED, PING): AUTHENTICATED,
    (AUTHENTICATED, CALL): AUTHENTICATED,
    (AUTHENTICATED, ACK): AUTHENTICATED,
    (AUTHENTICATED, CLIENT_ERROR): AUTHENTICATED,
    (AUTHENTICATED, CLOSE): CLOSED,
    (CLOSED, CLOSE): CLOSED,
}

# What a state answers with an error instead of passing on (PROTOCOL.md 3, 4).
REFUSALS: dict[tuple[State, Kind], Callable[[str], RpcError]] = {
    (NEW, CALL): lambda method: NotAuthenticated(
        f"{method} needs an authenticated connection (auth.jwt or auth.cert)"),
    (AUTHENTICATING, CALL): lambda method: NotAuthenticated(
        f"{method} needs an authenticated connection (auth.jwt or auth.cert)"),
    (AUTHENTICATING, AUTH): lambda method: InvalidRequest("an auth.* is already under way on this connection"),
    (AUTHENTICATED, AUTH): lambda method: InvalidRequest("this connection is already authenticated"),
}

# The table by state, for the lookup made on every frame.
_NEXT: dict[State, dict[Kind, State]] = {state: {} for state in State}
for (_state, _kind), _next in TRANSITIONS.items():
    _NEXT[_state][_kind] = _next


class SessionError(RuntimeError):
    """The actor told the session something its state does not allow: a bug, not the client's doing."""


@frozen
class SessionConfig:
    max_batch: int = 100  # calls in one incoming batch; -32004 above
    max_frame_bytes: int = 1 << 20  # a delivery batch is cut to stay under the peer's frame limit
    max_pending_requests: int = 1000  # bounded calls awaiting their answer; reads held behind an auth.*
    # The auth.* methods served; None: an open session (the admin socket), authenticated from the start.
    auth_methods: frozenset[str] | None = frozenset({"auth.jwt", "auth.cert", "auth.google"})
    batches: bool = True  # False: a batch is answered -32600 with this message
    no_batches_message: str = "batches are not taken here"
    close_on_parse_error: int | None = CLOSE_INVALID_DATA  # the close code after a body that is not JSON


class Call:
    """A request or notification the actor is to act on (``kind`` PING, AUTH or CALL).

    It is also the handle the answer goes back with: ``answer(call, ...)``,
    ``defer(call)``, ``refuse(call, error)``.
    """

    __slots__ = ("kind", "method", "params", "id", "notification", "batch", "bounded")

    def __init__(self, kind: Kind, method: str, params, id, notification: bool, batch: _BatchReply | None):
        self.kind = kind
        self.method = method
        self.params = params
        self.id = id
        self.notification = notification
        self.batch = batch
        self.bounded = False

    def __repr__(self) -> str:
        return f"Call({self.kind.value}, {self.method!r}, id={self.id!r})"


class Acks(tuple):
    """The message ids a read ACKed (a tuple of them), told at the end of that read."""

    __slots__ = ()

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        return f"Acks({tuple(self)!r})"


@frozen
class Close:
    """The session ended the connection; its last answers are in ``data_to_send``."""

    code: int | None
    reason: str
    notify: bool  # whether the transport writes conn.close


class _BatchReply:
    """Collects the answers of one incoming batch until the last one is known."""

    __slots__ = ("responses", "missing", "sealed", "followups")

    def __init__(self) -> None:
        self.responses: list = []
        self.missing = 0  # calls handed out and not answered yet
        self.sealed = False  # every item was looked at
        self.followups: list[bytes] = []  # server requests to write after the batch's answer


class ServerSession:
    """The server half of one connection. See the module's docstring for the states.

    ``on_request(method)`` is called for every request and notification read,
    ``on_error(code)`` for every error answer made (the server's counters).
    """

    # One per connection: slots, and the held-reads queue made only when needed.
    __slots__ = ("config", "state", "_next", "_auth_methods", "_gated", "_on_request", "_on_error",
                 "_bodies", "_index", "_violation", "_acks", "_held", "_items", "_item_index", "_batch",
                 "_closing", "outgoing", "_waiting", "_keys", "_echo_ids", "_auth", "pending_bounded")

    def __init__(self, config: SessionConfig = SessionConfig(), *,
                 on_request: Callable[[str], Any] | None = None,
                 on_error: Callable[[int], Any] | None = None):
        self.config = config
        self.state = NEW if config.auth_methods is not None else AUTHENTICATED
        self._next = _NEXT[self.state]
        self._auth_methods = config.auth_methods or frozenset()
        self._gated = config.auth_methods is not None
        self._on_request = on_request
        self._on_error = on_error
        # The read being taken: its bodies, how far, how it ends, what it ACKed so far.
        self._bodies: Sequence | None = None
        self._index = 0
        self._violation = None
        self._acks: list[str] | None = None
        self._held: deque[tuple] | None = None  # later reads (bodies, violation), behind an auth.*
        self._items: tuple | None = None  # the batch being taken
        self._item_index = 0
        self._batch: _BatchReply | None = None
        self._closing: Close | None = None  # decided outside next_event, which hands it out next
        # The JSON values due, in order: look (it is on every frame), take them with data_to_send.
        self.outgoing: list[bytes] = []
        self._waiting: dict[int, Call] = {}  # request key -> the call a later answer is for
        self._keys = itertools.count(1)
        self._echo_ids = itertools.count(1)
        self._auth: Call | None = None  # the auth.* under way
        self.pending_bounded = 0  # deferred calls with bounded=True not answered yet

    # -- state ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    def _move(self, kind: Kind) -> None:
        """Take the table's transition for an outcome the actor reports."""
        next_state = self._next.get(kind)
        if next_state is None:
            if self.state is CLOSED:
                return  # the connection is gone: outcomes still due are dropped
            raise SessionError(f"{kind.value} in state {self.state.value}")
        self.state = next_state
        self._next = _NEXT[next_state]

    # -- bytes in ---------------------------------------------------------------------

    def receive(self, bodies: Sequence[bytes | str], violation=None) -> None:
        """Queue the JSON values of one read; ``violation`` (``.error``, ``.code``, ``.reason``) ends it.

        Take the events with ``next_event`` until it returns None.
        """
        if self.state is CLOSED:
            return
        if self._bodies is None:
            self._bodies, self._index, self._violation = bodies, 0, violation
            held = 1
        else:
            if self._held is None:
                self._held = deque()
            self._held.append((bodies, violation))
            held = len(self._held) + 1
        if self.state is AUTHENTICATING and held > self.config.max_pending_requests:
            self._closing = self._fail(
                Overloaded("too many requests while authenticating", retry_after_ms=RETRY_AFTER_ANSWERS_MS),
                CLOSE_OVERLOADED, notify=True)

    def next_event(self):
        """The next event: a ``Call``, ``Acks``, ``ErrorResponse`` or ``Close``; None when none is due now.

        None while authenticating means the rest waits for the auth's outcome.
        """
        if self._closing is not None:
            close, self._closing = self._closing, None
            return close
        while self.state is not CLOSED:
            items = self._items
            if items is not None:
                index = self._item_index
                if index < len(items):
                    self._item_index = index + 1
                    event = self._on_item(items[index], self._batch)
                    if event is not None:
                        return event
                    continue
                batch = self._batch
                self._items = self._batch = None
                batch.sealed = True
                self._write_batch_if_complete(batch)
                continue
            bodies = self._bodies
            if bodies is None:
                return None
            index = self._index
            # The read's end (the next one, if held, is taken next); a read held whole waits whole.
            if index == len(bodies) and (index or self.state is not AUTHENTICATING):
                violation, acks = self._violation, self._acks
                if self._held:
                    self._bodies, self._violation = self._held.popleft()
                else:
                    self._bodies = self._violation = None
                self._index, self._acks = 0, None
                if violation is None and acks is None:
                    continue
                return self._end_read(violation, acks)
            if self.state is AUTHENTICATING:
                return None  # held: a client may pipeline requests behind its auth.*
            body = bodies[index]
            self._index = index + 1
            try:
                incoming = decode(body, max_batch=self.config.max_batch)
            except ParseError as error:
                return self._fail(error, self.config.close_on_parse_error, notify=False)
            except RpcError as error:
                self.outgoing.append(encode(self._error_response(error)))
                continue
            if type(incoming) is Batch:
                if not self.config.batches:
                    self.outgoing.append(encode(self._error_response(InvalidRequest(self.config.no_batches_message))))
                    continue
                self._items, self._item_index, self._batch = incoming.items, 0, _BatchReply()
                continue
            event = self._on_item(incoming, None)
            if event is not None:
                return event
        return None

    def _on_item(self, item, batch: _BatchReply | None):
        kind_of = type(item)
        if kind_of is Request or kind_of is Notification:
            method = item.method
            if self._on_request is not None:
                self._on_request(method)
            notification = kind_of is Notification
            request_id = None if notification else item.id
            if method == "ping":
                kind = PING
            elif not self._gated:
                kind = CALL
            elif method in self._auth_methods:
                kind = AUTH
            elif method.startswith("auth."):
                # Unknown in any state: it is not a method this server has.
                if not notification:
                    self._reply(batch, self._error_response(MethodNotFound(f"no method {method!r}"), id=request_id))
                return None
            else:
                kind = CALL
            next_state = self._next.get(kind)
            if next_state is None:
                if not notification:
                    error = REFUSALS[(self.state, kind)](method)
                    self._reply(batch, self._error_response(error, id=request_id))
                return None
            call = Call(kind, method, item.params, request_id, notification, batch)
            if batch is not None and not notification:
                batch.missing += 1  # until it is answered, refused or its deferred answer resolved
            if next_state is not self.state:
                self.state = next_state
                self._next = _NEXT[next_state]
            if kind is AUTH:
                self._auth = call
            return call
        if kind_of is Response:
            # The client's answer to a server request: an ACK of a msg.recv or msg.receipt.
            if ACK in self._next and item.result == "ACK" and type(item.id) is str:
                if self._acks is None:
                    self._acks = [item.id]
                else:
                    self._acks.append(item.id)
            return None
        if kind_of is Invalid:
            self._reply(batch, self._error_response(item.error, id=item.id))
            return None
        # An ErrorResponse: the client could not take a server request.
        return item if CLIENT_ERROR in self._next else None

    def _end_read(self, violation, acks: list[str] | None):
        """The ACKs a read carried are told at its end, then a violation that ended it."""
        if violation is not None:
            if violation.error is not None:
                self.outgoing.append(encode(self._error_response(violation.error)))
            close = Close(violation.code, violation.reason, False)
            self.close()
            if acks:
                self._closing = close
                return Acks(acks)
            return close
        return Acks(acks)

    def _fail(self, error: RpcError, code: int | None, *, notify: bool) -> Close:
        """One error answer, then the connection closes with ``code``."""
        self.outgoing.append(encode(self._error_response(error)))
        self.close()
        return Close(code, error.message, notify)

    # -- outcomes in -------------------------------------------------------------------

    def answer(self, call: Call, result) -> None:
        """The result of ``call``, known now."""
        if call.notification:
            return
        if call.batch is None:
            self._write(_response_bytes(call.id, result))
        else:
            self._settle(call.batch, Response(call.id, result))

    def refuse(self, call: Call, error: RpcError) -> None:
        """``call`` failed with ``error`` before it was deferred; an auth.* that fails so ends here."""
        if call is self._auth:
            self._auth = None
            self._move(AUTH_FAILED)
        if not call.notification:
            self._settle(call.batch, self._error_response(error, id=call.id))

    def defer(self, call: Call, *, bounded: bool = False) -> int:
        """The key to ``resolve`` ``call`` with later; ``bounded`` calls are at most ``max_pending_requests``.

        Raises Overloaded (-32003) when that many bounded calls wait already.
        """
        if bounded:
            if self.pending_bounded >= self.config.max_pending_requests:
                raise Overloaded(f"more than {self.config.max_pending_requests} sends awaiting their answer",
                                 retry_after_ms=RETRY_AFTER_ANSWERS_MS)
            self.pending_bounded += 1
            call.bounded = True
        key = next(self._keys)
        self._waiting[key] = call
        return key

    def resolve(self, key: int, *, result=None, error: RpcError | None = None) -> None:
        """The answer to the call deferred as ``key``: its ``result``, or ``error``."""
        call = self._waiting.pop(key, None)
        if call is None:
            return
        if call.bounded:
            self.pending_bounded -= 1
        if call.notification:
            return
        if error is None and call.batch is None:  # the usual case: one frame, one answer
            self._write(_response_bytes(call.id, result))
            return
        response = Response(call.id, result) if error is None else self._error_response(error, id=call.id)
        self._settle(call.batch, response)

    def auth_succeeded(self, key: int, result) -> None:
        """The auth.* deferred as ``key`` authenticated the connection; held reads go on at ``next_event``."""
        self._auth = None
        self._move(AUTH_SUCCEEDED)
        self.resolve(key, result=result)

    def auth_failed(self, key: int, error: RpcError) -> None:
        """The auth.* deferred as ``key`` was refused; the connection is back to new."""
        self._auth = None
        self._move(AUTH_FAILED)
        self.resolve(key, error=error)

    def close(self) -> None:
        """Nothing more is read or written (what ``data_to_send`` holds already still goes)."""
        self._move(CLOSE)
        self._held = None
        self._bodies = self._violation = self._acks = self._items = self._batch = None

    # -- the server's own requests ------------------------------------------------------

    def echo(self, call: Call, message_json: bytes) -> None:
        """``msg.echo`` back to the client, after ``call``'s answer (after its batch's, in a batch)."""
        body = encode(Request("msg.echo", {"message": orjson.Fragment(message_json)}, f"echo-{next(self._echo_ids)}"))
        if call.batch is not None:
            call.batch.followups.append(body)
        else:
            self._write(body)

    def send_request(self, method: str, params, id) -> None:
        """One server request (a live delivery)."""
        self._write(orjson.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))

    def send_requests(self, requests: Sequence[Request], *, as_batch: bool) -> None:
        """Server requests (deliveries): one by one, or as batches within the frame limit."""
        if self.state is CLOSED:
            return
        if as_batch:
            self.outgoing.extend(encode_batches(requests, max_items=DELIVERY_CHUNK,
                                            max_bytes=self.config.max_frame_bytes))
        else:
            self.outgoing.extend(encode(request) for request in requests)

    def notify(self, method: str, params) -> None:
        self._write(encode(Notification(method, params)))

    # -- bytes out -------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """The JSON values to write, in order; empty when none are due."""
        out = self.outgoing
        if out:
            self.outgoing = []
        return out

    def _write(self, body: bytes) -> None:
        if self.state is not CLOSED:
            self.outgoing.append(body)

    def _reply(self, batch: _BatchReply | None, response) -> None:
        if batch is None:
            self._write(encode(response))
        else:
            batch.responses.append(response)

    def _settle(self, batch: _BatchReply | None, response) -> None:
        """The answer to a call handed out as an event."""
        if batch is None:
            self._write(encode(response))
            return
        batch.responses.append(response)
        batch.missing -= 1
        self._write_batch_if_complete(batch)

    def _write_batch_if_complete(self, batch: _BatchReply) -> None:
        if not batch.sealed or batch.missing:
            return
        if batch.responses:  # a batch of notifications only gets no answer at all
            self._write(encode_batch(batch.responses))
        for followup in batch.followups:
            self._write(followup)

    def _error_response(self, error: RpcError, **request_id) -> ErrorResponse:
        """The error answer (``id=`` the request's, else the error's own), counted."""
        if self._on_error is not None:
            self._on_error(error.code)
        return ErrorResponse.from_error(error, **request_id)


def _response_bytes(id, result) -> bytes:
    # What encode(Response(id, result)) writes, without the objects: this is on every answer.
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "result": result})


# -- the client half ------------------------------------------------------------------------


class Answer:
    """A response to one of this side's requests; ``token`` is what ``request`` was given."""

    __slots__ = ("id", "token", "result", "error")

    def __init__(self, id, token, result, error: RpcError | None):
        self.id = id
        self.token = token
        self.result = result
        self.error = error

    def __repr__(self) -> str:
        return f"Answer(id={self.id!r}, result={self.result!r}, error={self.error!r})"


@frozen
class CloseNotice:
    """The server's ``conn.close``: why it is closing (PROTOCOL.md 7)."""

    code: Any
    reason: str


DELIVERY_METHODS = frozenset({"msg.recv", "msg.receipt"})


class ClientSession:
    """The client half: ids for requests, their answers matched, the server's messages passed on.

    Not thread-safe: a client with a reader thread holds its lock around it.
    """

    def __init__(self, *, max_batch: int = 1 << 20):
        self._max_batch = max_batch  # the server is trusted: its delivery batches are not bounded here
        self._ids = itertools.count(1)
        self._pending: dict[int, Any] = {}  # request id -> token

    def request(self, method: str, params=None, token=None) -> tuple[int, bytes]:
        """A new request's id and bytes; its ``Answer`` will carry ``token``."""
        request_id = next(self._ids)
        self._pending[request_id] = token
        return request_id, encode(Request(method, params, request_id))

    def notification(self, method: str, params=None) -> bytes:
        return encode(Notification(method, params))

    def forget(self, request_id) -> None:
        """Give up on an answer: when it comes it is dropped."""
        self._pending.pop(request_id, None)

    def abandon(self) -> list:
        """The tokens of every request still unanswered (the connection is gone), forgotten."""
        tokens = list(self._pending.values())
        self._pending.clear()
        return tokens

    def receive(self, body: bytes | str) -> tuple[list, bool]:
        """The events of one body, and whether it was a batch (its answers then go as one).

        Events: ``Answer``, ``CloseNotice``, and the server's ``Request`` and
        ``Notification`` as decoded. Answers to ids not asked (or given up) are
        dropped, as are invalid members. Raises RpcError for a body that is not JSON-RPC.
        """
        incoming = decode(body, max_batch=self._max_batch)
        if type(incoming) is Batch:
            events = []
            for item in incoming.items:
                event = self._on_item(item)
                if event is not None:
                    events.append(event)
            return events, True
        event = self._on_item(incoming)
        return ([event] if event is not None else []), False

    def _on_item(self, item):
        kind = type(item)
        if kind is Response or kind is ErrorResponse:
            pending = self._pending
            if item.id not in pending:
                return None
            token = pending.pop(item.id)
            if kind is Response:
                return Answer(item.id, token, item.result, None)
            return Answer(item.id, token, None, item.to_exception())
        if kind is Notification:
            if item.method == "conn.close" and isinstance(item.params, dict):
                return CloseNotice(item.params.get("code"), item.params.get("reason", ""))
            return item
        if kind is Request:
            return item
        return None  # Invalid: nothing to answer it with

    @staticmethod
    def ack(request: Request) -> Response:
        """The answer to a delivery or an echo."""
        return Response(request.id, "ACK")

    @staticmethod
    def unknown(request: Request) -> ErrorResponse:
        """The answer to a server request this client has no method for."""
        return ErrorResponse(request.id, MethodNotFound.code, MethodNotFound.default_message)

    @staticmethod
    def replies(answers: Sequence, *, as_batch: bool) -> bytes | None:
        """The bytes answering one body's server requests: a batch answered as one, else the one answer."""
        if not answers:
            return None
        if as_batch:
            return encode_batch(answers)
        return encode(answers[0])

    @staticmethod
    def acks(ids: Iterable) -> bytes:
        """ACKs of deliveries by their ids, as one batch."""
        return encode_batch([Response(message_id, "ACK") for message_id in ids])
