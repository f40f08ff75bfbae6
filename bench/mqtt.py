"""The few MQTT 3.1.1 packets the benchmark's Mosquitto clients use, sans-IO.

CONNECT/CONNACK, SUBSCRIBE/SUBACK (QoS 1), PUBLISH QoS 1 and its PUBACK,
PINGREQ/PINGRESP and DISCONNECT (OASIS MQTT 3.1.1, section 3): bytes out,
and a decoder you ``feed(data)`` that returns whole packets. No socket here;
bench/mosquitto.py drives it over TLS.
"""
from __future__ import annotations

import struct

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
QOS1_FLAGS = 0b0010  # PUBLISH flags: QoS 1, not a duplicate, not retained
DUP_FLAG = 0b1000
SUBACK_FAILURE = 0x80
MAX_REMAINING_LENGTH = 268_435_455  # four length bytes

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
_u16 = struct.Struct(">H")


class MqttError(Exception):
    """The peer broke the MQTT framing."""


def remaining_length(length: int) -> bytes:
    """The variable-length integer of a fixed header (7 bits a byte, low first)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _u16.pack(len(data)) + data


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + remaining_length(len(body)) + body


def connect_packet(client_id: str, *, clean_session: bool, keepalive: int = 0) -> bytes:
    """CONNECT, protocol level 4; keepalive 0: the broker never times the client out."""
    flags = 0x02 if clean_session else 0x00
    return _packet(CONNECT, 0, _string("MQTT") + bytes([4, flags]) + _u16.pack(keepalive) + _string(client_id))


def subscribe_packet(packet_id: int, topic: str, qos: int = 1) -> bytes:
    return _packet(SUBSCRIBE, 0b0010, _u16.pack(packet_id) + _string(topic) + bytes([qos]))


def puback_packet(packet_id: bytes) -> bytes:
    """PUBACK for the two packet-id bytes as they came in the PUBLISH."""
    return b"\x40\x02" + packet_id


def publish_head(topic: str, payload_bytes: int) -> bytes:
    """A QoS 1 PUBLISH up to its packet id: fixed header and topic, the same for every send to ``topic``."""
    body_length = 2 + len(topic.encode()) + 2 + payload_bytes
    return bytes([PUBLISH << 4 | QOS1_FLAGS]) + remaining_length(body_length) + _string(topic)


def publish_packet(head: bytes, packet_id: int, payload: bytes) -> bytes:
    return head + _u16.pack(packet_id) + payload


def parse_publish(flags: int, body: bytes) -> tuple[bytes, bytes, bytes]:
    """(topic, packet-id bytes, payload) of a QoS 1 PUBLISH's body."""
    if (flags >> 1) & 3 != 1:
        raise MqttError(f"PUBLISH with QoS {(flags >> 1) & 3}, not 1")
    end = 2 + (body[0] << 8 | body[1])
    return body[2:end], body[end:end + 2], body[end + 2:]


def packet_id_of(body: bytes) -> int:
    """The packet id a PUBACK or SUBACK answers."""
    return body[0] << 8 | body[1]


class PacketDecoder:
    """Bytes in, whole packets out: ``feed(data)`` returns a list of (type, flags, body)."""

    def __init__(self, max_packet_bytes: int = 1 << 20):
        self._buffer = bytearray()
        self._max = max_packet_bytes

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        packets = []
        start, size = 0, len(buffer)
        while size - start >= 2:
            index, length, shift, whole = start + 1, 0, 0, False
            while index < size:  # the remaining length: at most four bytes
                digit = buffer[index]
                index += 1
                length |= (digit & 0x7F) << shift
                if not digit & 0x80:
                    whole = True
                    break
                shift += 7
                if shift > 21:
                    raise MqttError("remaining length longer than four bytes")
            if not whole:
                break  # the length itself is not all here yet
            if length > self._max:
                raise MqttError(f"packet of {length} bytes, over {self._max}")
            end = index + length
            if end > size:
                break
            first = buffer[start]
            packets.append((first >> 4, first & 0x0F, bytes(buffer[index:end])))
            start = end
        if start:
            del buffer[:start]
        return packets
