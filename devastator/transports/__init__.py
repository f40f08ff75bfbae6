"""Thin adapters between sockets and device actors: bytes in, bytes out."""
from .http import HttpTransport
from .outbound import OutboundQueue
from .tls import TlsTransport

__all__ = ["HttpTransport", "OutboundQueue", "TlsTransport"]
