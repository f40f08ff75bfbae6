"""JSON-RPC 2.0 codec: bytes to typed messages and back.

Implements https://www.jsonrpc.org/specification for both directions (both
sides of a Devastator connection send requests and answer them). Decoding
validates the envelope only; params are checked by ``methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import orjson

from ..records import frozen
from .errors import InvalidRequest, ParseError, RpcError, TooLarge, error_class_for

__all__ = [
    "Request",
    "Notification",
    "Response",
    "ErrorResponse",
    "Invalid",
    "Batch",
    "Message",
    "decode",
    "encode",
    "encode_batch",
    "to_obj",
]

JsonId = Union[str, int, float, None]
Params = Union[dict, list, None]

_VERSION = "2.0"
_MISSING: Any = object()
# Exact types: bool is a subclass of int, and a bool id is not valid.
_ID_TYPES = frozenset((str, int, float, type(None)))


@frozen
class Request:
    """A call that expects an answer; ``id`` may be null and is echoed back."""

    method: str
    params: Params
    id: JsonId


@frozen
class Notification:
    """A call without an "id" member: it is never answered."""

    method: str
    params: Params


@frozen
class Response:
    id: JsonId
    result: Any


@frozen
class ErrorResponse:
    """An error answer. ``data`` None means the member is absent."""

    id: JsonId
    code: int
    message: str
    data: Any = None

    @classmethod
    def from_error(cls, exc: RpcError, id: JsonId = _MISSING) -> ErrorResponse:
        """Build the answer to ``exc``; ``id`` defaults to ``exc.id``."""
        return cls(exc.id if id is _MISSING else id, exc.code, exc.message, exc.data)

    def to_exception(self) -> RpcError:
        return error_class_for(self.code)(self.message, data=self.data, id=self.id)


@frozen
class Invalid:
    """A batch member that is not a valid JSON-RPC object.

    The server answers it with ``ErrorResponse.from_error(error)``; ``id`` is
    the member's id when it had a valid one, else None.
    """

    id: JsonId
    error: RpcError


@frozen
class Batch:
    items: tuple


Message = Union[Request, Notification, Response, ErrorResponse]
Decoded = Union[Request, Notification, Response, ErrorResponse, Batch]


def decode(data: bytes | str, max_batch: int = 100) -> Decoded:
    """Decode one JSON value into a message or a batch.

    Raises ParseError for invalid JSON, InvalidRequest for a top-level value
    that is not a JSON-RPC object (or an empty array), TooLarge for a batch
    of more than ``max_batch`` calls. Answers (responses) in a batch do not
    count: a client may ACK several delivery batches at once, and the frame
    size already bounds them. Invalid members of a batch become ``Invalid``.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ParseError(data=str(exc)) from None
    t = type(obj)
    if t is dict:
        message = _from_obj(obj)
        if type(message) is _InvalidMarker:
            raise message.error
        return message
    if t is list:
        if not obj:
            raise InvalidRequest(data="empty batch")
        items = []
        append = items.append
        calls = 0
        for member in obj:
            message = _from_obj(member)
            kind = type(message)
            if kind is _InvalidMarker:
                message = Invalid(message.error.id, message.error)
            if kind is not Response and kind is not ErrorResponse:
                calls += 1
                if calls > max_batch:
                    raise TooLarge(f"batch of more than {max_batch} calls")
            append(message)
        return Batch(tuple(items))
    raise InvalidRequest(data="expected an object or an array")


class _InvalidMarker:
    # Returned rather than raised by _from_obj: a batch full of invalid
    # members should not pay for an exception per member.
    __slots__ = ("error",)

    def __init__(self, error: RpcError) -> None:
        self.error = error


def _invalid(reason: str, id: JsonId = None) -> _InvalidMarker:
    # The message stays the standard "Invalid Request" (as in the spec's
    # examples); the reason goes in "data" for whoever debugs the client.
    return _InvalidMarker(InvalidRequest(data=reason, id=id))


def _from_obj(obj: Any) -> Any:
    if type(obj) is not dict:
        return _invalid("expected an object")
    id_ = obj.get("id", _MISSING)
    has_id = id_ is not _MISSING
    if has_id and type(id_) not in _ID_TYPES:
        # Not reported back: an invalid id cannot be echoed.
        return _invalid("id must be a string, a number or null")
    reply_id = id_ if has_id else None
    if obj.get("jsonrpc") != _VERSION:
        return _invalid('"jsonrpc" must be "2.0"', reply_id)

    method = obj.get("method", _MISSING)
    if method is not _MISSING:
        if "result" in obj or "error" in obj:
            return _invalid("a request cannot carry result or error", reply_id)
        if type(method) is not str:
            return _invalid("method must be a string", reply_id)
        params = obj.get("params")
        if params is not None:
            if type(params) is not dict and type(params) is not list:
                return _invalid("params must be an object or an array", reply_id)
        elif "params" in obj:
            return _invalid("params must be an object or an array", reply_id)
        if has_id:
            return Request(method, params, id_)
        return Notification(method, params)

    if not has_id:
        return _invalid("missing method or id")
    result = obj.get("result", _MISSING)
    error = obj.get("error", _MISSING)
    if error is _MISSING:
        if result is _MISSING:
            return _invalid("a response needs result or error", reply_id)
        return Response(id_, result)
    if result is not _MISSING:
        return _invalid("a response cannot carry both result and error", reply_id)
    if type(error) is not dict:
        return _invalid("error must be an object", reply_id)
    code = error.get("code")
    if type(code) is not int:
        return _invalid("error code must be an integer", reply_id)
    message = error.get("message")
    if type(message) is not str:
        return _invalid("error message must be a string", reply_id)
    return ErrorResponse(id_, code, message, error.get("data"))


def _request_obj(m: Request) -> dict:
    if m.params is None:
        return {"jsonrpc": _VERSION, "id": m.id, "method": m.method}
    return {"jsonrpc": _VERSION, "id": m.id, "method": m.method, "params": m.params}


def _notification_obj(m: Notification) -> dict:
    if m.params is None:
        return {"jsonrpc": _VERSION, "method": m.method}
    return {"jsonrpc": _VERSION, "method": m.method, "params": m.params}


def _response_obj(m: Response) -> dict:
    return {"jsonrpc": _VERSION, "id": m.id, "result": m.result}


def _error_obj(m: ErrorResponse) -> dict:
    if m.data is None:
        error = {"code": m.code, "message": m.message}
    else:
        error = {"code": m.code, "message": m.message, "data": m.data}
    return {"jsonrpc": _VERSION, "id": m.id, "error": error}


_TO_OBJ: dict[type, Callable[[Any], dict]] = {
    Request: _request_obj,
    Notification: _notification_obj,
    Response: _response_obj,
    ErrorResponse: _error_obj,
}


def to_obj(message: Message) -> dict:
    """Return the JSON-RPC object for ``message`` as a dict (values as-is)."""
    try:
        convert = _TO_OBJ[type(message)]
    except KeyError:
        raise TypeError(f"cannot encode {type(message).__name__} as JSON-RPC") from None
    return convert(message)


def encode(message: Message) -> bytes:
    """Serialize one message. ``orjson.Fragment`` values pass through as-is."""
    return orjson.dumps(to_obj(message))


def encode_batch(messages: Sequence[Message]) -> bytes:
    """Serialize messages as one JSON array (a JSON-RPC batch)."""
    if not messages:
        # The spec makes an empty array an invalid request, so never send one.
        raise ValueError("a batch needs at least one message")
    return orjson.dumps([to_obj(m) for m in messages])


def encode_batches(messages: Sequence[Message], *, max_items: int, max_bytes: int) -> list[bytes]:
    """Serialize messages as JSON arrays of at most ``max_items`` and ``max_bytes`` each.

    The peer refuses a frame over its size limit, so a batch is cut by bytes as
    well as by count; a single message over ``max_bytes`` still goes, alone.
    """
    batches: list[bytes] = []
    chunk: list[bytes] = []
    size = 2  # the brackets
    for message in messages:
        body = encode(message)
        if chunk and (len(chunk) == max_items or size + 1 + len(body) > max_bytes):
            batches.append(b"[" + b",".join(chunk) + b"]")
            chunk, size = [], 2
        size += len(body) + (1 if chunk else 0)  # and a comma before all but the first
        chunk.append(body)
    if chunk:
        batches.append(b"[" + b",".join(chunk) + b"]")
    return batches
