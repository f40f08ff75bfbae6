"""Arbitrary input never escapes the protocol layer as anything but an RpcError."""
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from devastator.protocol import FrameDecoder, Limits, decode, parse_echo, parse_send
from devastator.protocol.errors import RpcError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
rpc_keys = st.sampled_from(["jsonrpc", "method", "params", "id", "result", "error", "code", "message"])
rpc_like = st.dictionaries(rpc_keys, json_values | st.just("2.0") | st.just("msg.send"), max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 64))
def test_frame_decoder_returns_frames_or_raises_a_protocol_error(chunks, max_frame):
    decoder = FrameDecoder(max_frame)
    try:
        for chunk in chunks:
            for body in decoder.feed(chunk):
                assert 0 < len(body) <= max_frame
            assert decoder.buffered_bytes <= max_frame + 4
    except RpcError as error:
        assert error.code in (-32600, -32004)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_any_bytes_gives_a_message_or_a_protocol_error(data):
    try:
        decode(data)
    except RpcError as error:
        assert error.code in (-32700, -32600, -32004)


@settings(max_examples=500, deadline=None)
@given(json_values | rpc_like | st.lists(rpc_like | json_values, max_size=5))
def test_decoding_any_json_gives_a_message_or_a_protocol_error(value):
    try:
        decode(orjson.dumps(value))
    except RpcError as error:
        assert error.code in (-32600, -32004)


@settings(max_examples=500, deadline=None)
@given(json_values | st.dictionaries(st.sampled_from(["to", "message", "cid", "ttl"]), json_values))
def test_any_params_are_valid_or_refused_with_a_protocol_error(params):
    for parse in (parse_send, parse_echo):
        try:
            parse(params, Limits())
        except RpcError as error:
            assert error.code in (-32602, -32004)
