"""The codes a connection is closed with (PROTOCOL.md 7), in one place.

WebSocket sends them in its close frame; both endpoints send them in
``conn.close`` first (on TLS that notification is the only place they appear).
"""

CLOSE_NORMAL = 1000  # an operator's kick, or the server closing a connection that asked nothing more
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_PROTOCOL_ERROR = 1002  # a framing violation (masking, reserved bits, a bad length header...)
CLOSE_UNSUPPORTED_DATA = 1003  # a binary WebSocket message
CLOSE_INVALID_DATA = 1007  # a body that is not UTF-8 JSON
CLOSE_TOO_LARGE = 1008  # policy violation: a message over the limit, after -32004
CLOSE_INTERNAL_ERROR = 1011  # the connection's actor failed: reconnect
CLOSE_OVERLOADED = 1013  # try again later
CLOSE_REPLACED = 4001  # the device authenticated on another connection
CLOSE_REVOKED = 4002  # the device's credentials were revoked
CLOSE_IDLE = 4003  # nothing came within the idle timeout
CLOSE_SLOW_CONSUMER = 4004  # the client read too slowly: its output passed the bound
