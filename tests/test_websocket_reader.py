"""WebSocketReader on a scripted socket: what one wake-up finds, pings and the idle close, without a network.

The endpoint's own behaviour over real sockets is in test_websocket.py and
test_websocket_rfc6455.py; here each step of the reader is seen alone.
"""
from __future__ import annotations

from wsproto.frame_protocol import Opcode

from devastator.protocol.close_codes import CLOSE_IDLE, CLOSE_TOO_LARGE, CLOSE_UNSUPPORTED_DATA
from devastator.transports.websocket import ControlFrame, WebSocketReader, WebSocketSession
from test_tls_reads import ScriptedConn
from test_websocket_rfc6455 import close_payload, frame


class RecordingOutbound:
    """What the reader asks of its OutboundQueue."""

    def __init__(self):
        self.closing = False
        self.sent = []
        self.closed_with = None
        self.dropped = 0

    def send(self, bodies):
        self.sent.extend(bodies)

    def close(self, code=None, reason="", *, notify=True):
        self.closing = True
        self.closed_with = (code, reason)

    def drop_input(self, size):
        self.dropped += size
        return True


def scripted_reader(*reads, trailing=b"", ping_interval=25.0, idle_timeout=60.0, max_message_bytes=1 << 20):
    conn = ScriptedConn(*reads)
    forwarded = []
    outbound = RecordingOutbound()
    reader = WebSocketReader(
        WebSocketSession(conn), lambda bodies, violation=None: forwarded.append((bodies, violation)), outbound,
        trailing_data=trailing, max_message_bytes=max_message_bytes, ping_interval=ping_interval,
        idle_timeout=idle_timeout,
    )
    return reader, conn, outbound, forwarded


def text(payload: str, *, fin=True, opcode=Opcode.TEXT) -> bytes:
    return frame(opcode, payload.encode(), fin=fin)


def test_what_came_with_the_upgrade_and_what_a_wake_up_finds_go_on_together_at_the_flush():
    reader, conn, _, forwarded = scripted_reader(text('{"b":2}'), text('{"c"', fin=False),
                                                 text(":3}", opcode=Opcode.CONTINUATION), trailing=text('{"a":1}'))
    assert reader.read_available() is None
    assert forwarded == []  # gathered until the wake-up's end
    assert conn.timeouts_set == [0.0, 30.0]  # one timeout change for every read, restored
    assert reader.read_available() is False
    reader.flush()
    assert forwarded == [(('{"a":1}', '{"b":2}', '{"c":3}'), None)]


def test_a_violation_hands_on_the_messages_before_it_then_drops_what_follows():
    reader, _, _, forwarded = scripted_reader(text('{"a":1}') + frame(Opcode.BINARY, b"\x00") + text('{"b":2}'))
    assert reader.read_available() is None
    reader.flush()
    (bodies, violation), = forwarded
    assert bodies == ('{"a":1}',) and violation.code == CLOSE_UNSUPPORTED_DATA


def test_a_message_over_the_limit_is_a_violation_even_in_pieces():
    reader, _, _, forwarded = scripted_reader(text("x" * 60, fin=False), text("y" * 60, opcode=Opcode.CONTINUATION),
                                              max_message_bytes=100)
    assert reader.read_available() is None
    (bodies, violation), = forwarded
    assert bodies == () and violation.code == CLOSE_TOO_LARGE


def test_the_peers_close_is_echoed_with_its_code_and_its_end_told():
    reader, _, outbound, _ = scripted_reader(frame(Opcode.CLOSE, close_payload(4500, "bye")), b"")
    assert reader.read_available() == "closed by peer"
    assert outbound.closed_with == (4500, "")


def test_an_end_without_a_close_frame_is_told_as_such():
    reader, _, _, _ = scripted_reader(b"")
    assert reader.read_available() == "closed by peer without a close frame"


def test_a_quiet_connection_is_pinged_once_then_closed_idle_and_never_spins():
    reader, _, outbound, _ = scripted_reader(ping_interval=0.0, idle_timeout=60.0)
    assert reader.next_timeout() == 0.0  # the ping is due
    assert reader.timed_out() is None
    assert [type(body) for body in outbound.sent] == [ControlFrame]
    assert outbound.sent[0][0] == 0x89  # FIN + ping
    assert 59.0 < reader.next_timeout() <= 60.0  # now the idle close, not another ping

    reader, _, outbound, _ = scripted_reader(ping_interval=0.0, idle_timeout=0.0)
    assert reader.timed_out() is None
    assert outbound.closed_with == (CLOSE_IDLE, "idle timeout")
    assert reader.timed_out() == "idle timeout"  # closing: the next timeout ends the input


def test_input_puts_the_ping_off():
    reader, _, outbound, _ = scripted_reader(text('{"a":1}'), ping_interval=30.0, idle_timeout=60.0)
    assert reader.read_available() is None
    assert 29.0 < reader.next_timeout() <= 30.0
    assert reader.timed_out() is None  # a timer that fired early: nothing is due yet
    assert outbound.sent == [] and outbound.closed_with is None
