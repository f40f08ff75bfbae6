"""JSON-RPC error codes and the one exception family that carries them.

Every failure the protocol layer reports is an ``RpcError`` subclass whose
class attribute ``code`` is the JSON-RPC error code to answer with, so callers
can turn any of them into an error response without a lookup table.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any

__all__ = [
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "NOT_AUTHENTICATED",
    "FORBIDDEN",
    "OVERLOADED",
    "TOO_LARGE",
    "UNKNOWN_RECIPIENT",
    "RpcError",
    "ParseError",
    "InvalidRequest",
    "MethodNotFound",
    "InvalidParams",
    "InternalError",
    "NotAuthenticated",
    "Forbidden",
    "Overloaded",
    "TooLarge",
    "UnknownRecipient",
    "error_class_for",
]

# Standard JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Devastator server codes (PROTOCOL.md section 3).
NOT_AUTHENTICATED = -32001
FORBIDDEN = -32002
OVERLOADED = -32003
TOO_LARGE = -32004
UNKNOWN_RECIPIENT = -32005


class RpcError(Exception):
    """An error that answers a JSON-RPC request.

    ``id`` is the id of the request being answered when the code that raised
    knew it (the decoder sets it for an invalid object that carried a valid
    id), so the reply can be correlated by the peer.
    """

    code: int = INTERNAL_ERROR
    default_message: str = "Internal error"

    def __init__(self, message: str | None = None, *, data: Any = None, id: Any = None) -> None:
        if message is None:
            message = self.default_message
        super().__init__(message)
        self.message = message
        self.data = data
        self.id = id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code}, message={self.message!r}, "
            f"data={self.data!r}, id={self.id!r})"
        )


class ParseError(RpcError):
    code = PARSE_ERROR
    default_message = "Parse error"


class InvalidRequest(RpcError):
    code = INVALID_REQUEST
    default_message = "Invalid Request"


class MethodNotFound(RpcError):
    code = METHOD_NOT_FOUND
    default_message = "Method not found"


class InvalidParams(RpcError):
    code = INVALID_PARAMS
    default_message = "Invalid params"


class InternalError(RpcError):
    code = INTERNAL_ERROR
    default_message = "Internal error"


class NotAuthenticated(RpcError):
    code = NOT_AUTHENTICATED
    default_message = "Not authenticated"


class Forbidden(RpcError):
    code = FORBIDDEN
    default_message = "Forbidden"


class Overloaded(RpcError):
    """-32003; the server's own carry ``data`` ``{"retry_after_ms": N}`` (PROTOCOL.md 7, "Overload")."""

    code = OVERLOADED
    default_message = "Overloaded, retry later"

    def __init__(self, message: str | None = None, *, retry_after_ms: int | None = None, data: Any = None,
                 id: Any = None) -> None:
        if retry_after_ms is not None:
            data = {"retry_after_ms": retry_after_ms}
        super().__init__(message, data=data, id=id)

    @property
    def retry_after_ms(self) -> int | None:
        """How long the server asked the client to wait, when it said (a peer's error may not)."""
        wait = self.data.get("retry_after_ms") if isinstance(self.data, dict) else None
        return wait if isinstance(wait, int) and not isinstance(wait, bool) else None


class TooLarge(RpcError):
    code = TOO_LARGE
    default_message = "Too large"


class UnknownRecipient(RpcError):
    code = UNKNOWN_RECIPIENT
    default_message = "Unknown recipient"


_CLASSES_BY_CODE = MappingProxyType(
    {
        cls.code: cls
        for cls in (
            ParseError,
            InvalidRequest,
            MethodNotFound,
            InvalidParams,
            InternalError,
            NotAuthenticated,
            Forbidden,
            Overloaded,
            TooLarge,
            UnknownRecipient,
        )
    }
)


def error_class_for(code: int) -> type[RpcError]:
    """Return the RpcError subclass for ``code``.

    An unknown code (a peer may use any integer) gets a generic subclass that
    carries it, so ``to_exception()`` round trips every error response.
    """
    cls = _CLASSES_BY_CODE.get(code)
    if cls is None:
        cls = _generic_class_for(code)
    return cls


# Bounded: codes come from peers, so an unbounded cache would be a memory leak
# an attacker could drive. Caching keeps ``error_class_for(c) is
# error_class_for(c)`` true for the codes actually seen.
@functools.lru_cache(maxsize=64)
def _generic_class_for(code: int) -> type[RpcError]:
    return type(
        "RpcError_" + str(code).replace("-", "m"),
        (RpcError,),
        {"code": code, "default_message": "Server error", "__module__": __name__},
    )
