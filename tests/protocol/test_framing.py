"""Tests of the TLS endpoint's length-prefixed framing (PROTOCOL.md section 2)."""

import struct

import pytest

from devastator.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    encode_frame,
    encode_frames,
    errors,
)
from devastator.protocol.errors import InvalidRequest, TooLarge

BODIES = [b'{"a":1}', b"x", b'{"jsonrpc":"2.0","method":"ping","id":7}', b"yz" * 40]


def stream(bodies=BODIES):
    return encode_frames(bodies)


def test_header_is_little_endian():
    assert encode_frame(b"x") == b"\x01\x00\x00\x00x"
    assert encode_frame(b"a" * 258)[:4] == b"\x02\x01\x00\x00"
    assert FrameDecoder().feed(b"\x01\x00\x00\x00x") == [b"x"]


def test_default_limit_is_one_mebibyte():
    assert DEFAULT_MAX_FRAME_BYTES == 1024 * 1024


def test_encode_frames_concatenates():
    assert encode_frames([b"ab", b"c"]) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert encode_frames(iter([b"ab"])) == encode_frame(b"ab")
    assert encode_frames([]) == b""


def test_round_trip_one_feed():
    decoder = FrameDecoder()
    assert decoder.feed(stream()) == BODIES
    assert decoder.buffered_bytes == 0


def test_frames_are_bytes():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x02\x00") == []
    frames = decoder.feed(b"\x00\x00ab")
    assert frames == [b"ab"] and type(frames[0]) is bytes


@pytest.mark.parametrize("split", range(len(stream()) + 1))
def test_split_at_every_offset(split):
    data = stream()
    decoder = FrameDecoder()
    frames = decoder.feed(data[:split])
    frames += decoder.feed(data[split:])
    assert frames == BODIES
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("split", range(1, len(stream())))
def test_split_at_every_pair_of_offsets(split):
    data = stream()
    for second in range(split, len(data) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(data[:split])
        frames += decoder.feed(data[split:second])
        frames += decoder.feed(data[second:])
        assert frames == BODIES


def test_one_byte_at_a_time():
    decoder = FrameDecoder()
    data = stream()
    frames = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])
        consumed = sum(len(f) + 4 for f in frames)
        assert decoder.buffered_bytes == i + 1 - consumed
    assert frames == BODIES


def test_empty_feed_returns_nothing():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    decoder.feed(b"\x03\x00")
    assert decoder.feed(b"") == []
    assert decoder.buffered_bytes == 2


def test_partial_frame_is_buffered():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x05\x00\x00\x00abc") == []
    assert decoder.buffered_bytes == 7
    assert decoder.feed(b"de\x01\x00") == [b"abcde"]
    assert decoder.buffered_bytes == 2


def test_many_small_frames_in_one_feed():
    bodies = [str(i).encode() for i in range(20000)]
    decoder = FrameDecoder()
    # A trailing partial header must survive alongside the complete frames.
    assert decoder.feed(encode_frames(bodies) + b"\x01\x00") == bodies
    assert decoder.buffered_bytes == 2
    assert decoder.feed(b"\x00\x00z") == [b"z"]


def test_many_frames_after_a_buffered_tail():
    bodies = [b"%d" % i for i in range(1000)]
    data = encode_frames(bodies)
    decoder = FrameDecoder()
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(data[3:]) == bodies


def test_accepts_bytearray_and_memoryview():
    decoder = FrameDecoder()
    assert decoder.feed(bytearray(encode_frame(b"ab"))) == [b"ab"]
    assert decoder.feed(memoryview(encode_frame(b"cd"))) == [b"cd"]


def test_exactly_max_is_accepted():
    decoder = FrameDecoder(max_frame_bytes=10)
    assert decoder.feed(encode_frame(b"0123456789")) == [b"0123456789"]


def test_default_max_is_accepted():
    body = b"a" * DEFAULT_MAX_FRAME_BYTES
    assert FrameDecoder().feed(encode_frame(body)) == [body]


def test_max_plus_one_is_refused_from_the_header_alone():
    decoder = FrameDecoder(max_frame_bytes=10)
    with pytest.raises(TooLarge) as info:
        decoder.feed(struct.pack("<I", 11))
    assert info.value.code == errors.TOO_LARGE == -32004
    assert "10" in info.value.message


def test_default_max_plus_one_is_refused():
    with pytest.raises(TooLarge) as info:
        FrameDecoder().feed(struct.pack("<I", DEFAULT_MAX_FRAME_BYTES + 1))
    assert str(DEFAULT_MAX_FRAME_BYTES) in info.value.message


def test_zero_length_is_refused():
    with pytest.raises(InvalidRequest) as info:
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    assert info.value.code == errors.INVALID_REQUEST == -32600
    assert info.value.message == "empty frame"


def test_zero_length_after_good_frames_is_refused():
    with pytest.raises(InvalidRequest):
        FrameDecoder().feed(encode_frame(b"ok") + b"\x00\x00\x00\x00")


def test_huge_header_refused_without_buffering_the_body():
    decoder = FrameDecoder()
    with pytest.raises(TooLarge):
        decoder.feed(b"\xff\xff\xff\xff" + b"a" * 100)
    assert decoder.buffered_bytes < 200


def test_huge_header_split_across_feeds():
    decoder = FrameDecoder()
    assert decoder.feed(b"\xff\xff") == []
    with pytest.raises(TooLarge):
        decoder.feed(b"\xff\xff")
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize(
    "bad, exc", [(b"\x00\x00\x00\x00", InvalidRequest), (b"\xff\xff\xff\xff", TooLarge)]
)
def test_poisoned_after_error(bad, exc):
    decoder = FrameDecoder()
    with pytest.raises(exc) as first:
        decoder.feed(bad)
    for data in (encode_frame(b"fine"), b"", b"\x01"):
        with pytest.raises(exc) as again:
            decoder.feed(data)
        assert again.value is first.value


def test_invalid_limit_rejected():
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0)
