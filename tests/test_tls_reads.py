"""The TLS endpoint reads what each wake-up finds, however the client's writes cut it into TLS records.

OpenSSL hands over one TLS record per read, and a client that writes each
frame on its own sends one record per frame: the reader reads on while
input is there (up to a bound) and decodes the records together.
"""
import ssl

from devastator.client import frame
from devastator.protocol import encode_frame
from devastator.transports.tls import FrameReader
from wire import RawTls, assert_error, request

NOT_AUTHENTICATED = -32001


def test_frames_written_one_record_each_are_all_answered_in_order(running):
    raw = RawTls(running)
    frames = [frame(request("ping", None, f"p{n}")) for n in range(300)]
    split = frame(request("ping", None, "split"))
    for data in frames:
        raw.send(data)  # one write, so one TLS record, per frame
    raw.send(split[:2])  # a frame cut across three records: within its length header, then its body
    raw.send(split[2:7])
    raw.send(split[7:])
    answers = raw.read(301)
    assert [answer["id"] for answer in answers] == [f"p{n}" for n in range(300)] + ["split"]
    assert all(answer["result"] == "pong" for answer in answers)
    raw.assert_open()


def test_more_than_one_wake_up_reads_is_read_on_and_answered_in_order(running):
    # 100 records of 3 KiB: more than the 64 KiB one wake-up decodes at once.
    raw = RawTls(running)
    padding = "x" * 3000
    for n in range(100):
        raw.send(frame(request("msg.send", {"to": "bob", "message": padding}, n)))
    answers = raw.read(100)
    for n, answer in enumerate(answers):
        assert_error(answer, NOT_AUTHENTICATED, n)
    raw.assert_open()


# -- FrameReader.read_available on a scripted socket: the order of what one wake-up finds --


class ScriptedConn:
    """What each recv returns (bytes, or an exception to raise); "want read" once the script ends."""

    def __init__(self, *reads):
        self.reads = list(reads)
        self.timeout = 30.0
        self.timeouts_set = []

    def gettimeout(self):
        return self.timeout

    def settimeout(self, timeout):
        self.timeout = timeout
        self.timeouts_set.append(timeout)

    def recv(self, size):
        assert self.timeout == 0.0, "read_available must not wait"
        if not self.reads:
            raise ssl.SSLWantReadError("no input")
        item = self.reads.pop(0)
        if isinstance(item, Exception):
            raise item
        if len(item) > size:
            self.reads.insert(0, item[size:])
            item = item[:size]
        return item


class OpenOutbound:
    closing = False


def scripted_reader(*reads):
    conn = ScriptedConn(*reads)
    forwarded = []
    reader = FrameReader(conn, lambda bodies, violation=None: forwarded.append((bodies, violation)),
                         OpenOutbound(), 1 << 20)
    return reader, conn, forwarded


def body(n: int, size: int = 10) -> bytes:
    return str(n).encode().ljust(size, b" ")


def test_the_records_one_wake_up_finds_are_decoded_together_with_one_timeout_change():
    reader, conn, forwarded = scripted_reader(frame_bytes(1), frame_bytes(2), frame_bytes(3)[:3],
                                              frame_bytes(3)[3:])
    assert reader.read_available() is None
    assert forwarded == [((body(1), body(2), body(3)), None)]
    assert conn.timeouts_set == [0.0, 30.0]  # restored before the frames were handed on
    assert reader.read_available() is False  # nothing left: no wait, nothing handed on
    assert len(forwarded) == 1


def test_the_peers_end_comes_after_the_frames_read_before_it():
    reader, _, forwarded = scripted_reader(frame_bytes(1), frame_bytes(2), b"")
    assert reader.read_available() == "closed by peer"
    assert forwarded == [((body(1), body(2)), None)]


def test_a_failed_read_comes_after_the_frames_read_before_it():
    reader, _, forwarded = scripted_reader(frame_bytes(1), ConnectionResetError("reset by peer"))
    assert reader.read_available() == "read failed: reset by peer"
    assert forwarded == [((body(1),), None)]


def test_a_wake_up_decodes_at_most_read_size_bytes_and_the_next_read_goes_on():
    big = 40_000
    frames = [frame_bytes(n, big) for n in range(3)]  # 120 kB, in three records
    reader, conn, forwarded = scripted_reader(*frames)
    assert reader.read_available() is None
    assert forwarded == [((body(0, big),), None)]  # 64 KiB read: the second frame only began
    while reader.read_available() is not False:
        pass
    assert [one for bodies, _ in forwarded for one in bodies] == [body(n, big) for n in range(3)]
    assert conn.reads == []


def frame_bytes(n: int, size: int = 10) -> bytes:
    return encode_frame(body(n, size))
