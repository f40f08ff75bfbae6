"""Length-prefixed framing of the TLS endpoint (PROTOCOL.md section 2).

A frame is a uint32 little-endian length N followed by N bytes of UTF-8 JSON.
``FrameDecoder`` turns an arbitrary chunking of the byte stream into complete
frame bodies; ``encode_frame`` and ``encode_frames`` do the reverse.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .errors import InvalidRequest, RpcError, TooLarge

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "FrameDecoder", "encode_frame", "encode_frames"]

DEFAULT_MAX_FRAME_BYTES = 1 << 20

_HEADER = struct.Struct("<I")
_HEADER_SIZE = _HEADER.size
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes, get back the complete bodies.

    After a framing violation the stream position is lost, so the decoder is
    poisoned: the error is raised again on every later ``feed``. Complete
    frames that preceded the bad header in the same ``feed`` are dropped with
    it, because the connection is closed after the error reply anyway.
    """

    __slots__ = ("_max_frame_bytes", "_buffer", "_error")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._error: RpcError | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        # Fast path: with nothing pending, parse straight out of ``data`` and
        # buffer only the incomplete tail, so the usual one-read-one-frame case
        # copies each body exactly once.
        if buffer:
            buffer += data
            source = buffer
        else:
            source = data
        frames: list[bytes] = []
        end = len(source)
        pos = 0
        limit = self._max_frame_bytes
        # A memoryview makes each body a single copy (slicing a bytearray
        # and then converting it to bytes would copy twice) and lets us walk
        # by offset instead of trimming the buffer once per frame, which would
        # be quadratic in the number of frames per feed.
        with memoryview(source) as view:
            while end - pos >= _HEADER_SIZE:
                (length,) = _unpack_header(view, pos)
                if length == 0 or length > limit:
                    # Checked before waiting for (or allocating) the body.
                    self._poison(length)
                    raise self._error  # type: ignore[misc]
                start = pos + _HEADER_SIZE
                stop = start + length
                if stop > end:
                    break
                frames.append(bytes(view[start:stop]))
                pos = stop
            if source is not buffer and pos < end:
                buffer += view[pos:]
        # Compact once per feed, after the view is released: a bytearray with
        # an exported view cannot be resized.
        if source is buffer and pos:
            del buffer[:pos]
        return frames

    def _poison(self, length: int) -> None:
        if length == 0:
            self._error = InvalidRequest("empty frame")
        else:
            self._error = TooLarge(
                f"frame of {length} bytes exceeds the limit of {self._max_frame_bytes} bytes"
            )
        # Nothing more will be decoded; release the memory now.
        self._buffer = bytearray()


def encode_frame(body: bytes) -> bytes:
    """Return ``body`` with its length header prepended."""
    return _pack_header(len(body)) + body


def encode_frames(bodies: Iterable[bytes]) -> bytes:
    """Return all ``bodies`` framed and concatenated, ready for one sendall."""
    parts: list[bytes] = []
    append = parts.append
    for body in bodies:
        append(_pack_header(len(body)))
        append(body)
    return b"".join(parts)
