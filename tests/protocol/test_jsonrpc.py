"""Tests of the JSON-RPC 2.0 codec, including every example of the specification."""

import orjson
import pytest

from devastator.protocol import (
    Batch,
    ErrorResponse,
    Invalid,
    Notification,
    Request,
    Response,
    decode,
    encode,
    encode_batch,
    errors,
    to_obj,
)
from devastator.protocol.errors import (
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
    TooLarge,
    error_class_for,
)


def j(data):
    return orjson.loads(data)


def without_data(reply):
    """Drop error "data": the decoder puts its reason there, the spec shows none."""
    if isinstance(reply, list):
        return [without_data(r) for r in reply]
    if "error" in reply:
        reply["error"].pop("data", None)
    return reply


def answer_invalid(item):
    """What a server replies to an invalid batch member."""
    return without_data(j(encode(ErrorResponse.from_error(item.error))))


# --- Examples of https://www.jsonrpc.org/specification section 7 ---------------


def test_spec_positional_params():
    msg = decode(b'{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}')
    assert msg == Request("subtract", [42, 23], 1)
    assert decode(b'{"jsonrpc": "2.0", "result": 19, "id": 1}') == Response(1, 19)
    msg = decode(b'{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}')
    assert msg == Request("subtract", [23, 42], 2)
    assert decode(b'{"jsonrpc": "2.0", "result": -19, "id": 2}') == Response(2, -19)


def test_spec_named_params():
    msg = decode(
        b'{"jsonrpc": "2.0", "method": "subtract", '
        b'"params": {"subtrahend": 23, "minuend": 42}, "id": 3}'
    )
    assert msg == Request("subtract", {"subtrahend": 23, "minuend": 42}, 3)
    assert decode(b'{"jsonrpc": "2.0", "result": 19, "id": 3}') == Response(3, 19)
    msg = decode(
        b'{"jsonrpc": "2.0", "method": "subtract", '
        b'"params": {"minuend": 42, "subtrahend": 23}, "id": 4}'
    )
    assert msg == Request("subtract", {"minuend": 42, "subtrahend": 23}, 4)


def test_spec_notifications():
    msg = decode(b'{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}')
    assert msg == Notification("update", [1, 2, 3, 4, 5])
    assert decode(b'{"jsonrpc": "2.0", "method": "foobar"}') == Notification("foobar", None)


def test_spec_non_existent_method():
    msg = decode(b'{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert msg == Request("foobar", None, "1")
    reply = ErrorResponse.from_error(MethodNotFound(), id=msg.id)
    assert j(encode(reply)) == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found"},
        "id": "1",
    }
    assert decode(encode(reply)) == reply


def test_spec_invalid_json():
    with pytest.raises(ParseError) as info:
        decode(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert j(encode(ErrorResponse.from_error(info.value, id=None)))["error"]["code"] == -32700
    assert info.value.message == "Parse error"
    assert info.value.id is None


def test_spec_invalid_request_object():
    with pytest.raises(InvalidRequest) as info:
        decode(b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    reply = j(encode(ErrorResponse.from_error(info.value)))
    assert reply["id"] is None
    assert reply["error"]["code"] == -32600


def test_spec_batch_invalid_json():
    with pytest.raises(ParseError):
        decode(
            b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
            b'{"jsonrpc": "2.0", "method"]'
        )


def test_spec_empty_array():
    with pytest.raises(InvalidRequest) as info:
        decode(b"[]")
    assert info.value.code == errors.INVALID_REQUEST
    assert info.value.id is None
    assert without_data(j(encode(ErrorResponse.from_error(info.value)))) == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "Invalid Request"},
        "id": None,
    }


def test_invalid_request_reason_is_in_data():
    with pytest.raises(InvalidRequest) as info:
        decode(b'{"jsonrpc": "2.0", "method": 1, "id": 1}')
    assert info.value.message == "Invalid Request"
    assert "method" in info.value.data


def test_spec_invalid_batch_not_empty():
    batch = decode(b"[1]")
    assert isinstance(batch, Batch) and len(batch.items) == 1
    (item,) = batch.items
    assert isinstance(item, Invalid) and item.id is None
    assert answer_invalid(item) == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "Invalid Request"},
        "id": None,
    }


def test_spec_invalid_batch():
    batch = decode(b"[1,2,3]")
    assert len(batch.items) == 3
    for item in batch.items:
        assert isinstance(item, Invalid)
        assert item.id is None and isinstance(item.error, InvalidRequest)


def test_spec_batch():
    batch = decode(
        b"""[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]"""
    )
    items = batch.items
    assert items[0] == Request("sum", [1, 2, 4], "1")
    assert items[1] == Notification("notify_hello", [7])
    assert items[2] == Request("subtract", [42, 23], "2")
    assert isinstance(items[3], Invalid) and items[3].id is None
    assert items[4] == Request("foo.get", {"name": "myself"}, "5")
    assert items[5] == Request("get_data", None, "9")

    replies = [
        Response("1", 7),
        Response("2", 19),
        ErrorResponse.from_error(items[3].error),
        ErrorResponse.from_error(MethodNotFound(), id="5"),
        Response("9", ["hello", 5]),
    ]
    assert without_data(j(encode_batch(replies))) == [
        {"jsonrpc": "2.0", "result": 7, "id": "1"},
        {"jsonrpc": "2.0", "result": 19, "id": "2"},
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
    ]
    assert decode(encode_batch(replies)) == Batch(tuple(replies))


def test_spec_batch_all_notifications():
    batch = decode(
        b'[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
        b'{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]'
    )
    assert batch == Batch(
        (Notification("notify_sum", [1, 2, 4]), Notification("notify_hello", [7]))
    )


# --- Decoding ---------------------------------------------------------------------


def test_decode_accepts_str():
    assert decode('{"jsonrpc":"2.0","method":"ping","id":"é"}') == Request("ping", None, "é")


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"nope", b'{"a":1}x', b"NaN", b'"\xff"', b"\xff\xfe", b'{"id":1e999}'],
)
def test_parse_errors(data):
    with pytest.raises(ParseError) as info:
        decode(data)
    assert info.value.code == errors.PARSE_ERROR == -32700


def test_parse_error_on_lone_surrogate_str():
    with pytest.raises(ParseError):
        decode('"\ud800"')


def test_null_id_is_still_a_request():
    assert decode(b'{"jsonrpc":"2.0","method":"m","id":null}') == Request("m", None, None)


@pytest.mark.parametrize("id_", ["abc", "", 0, -5, 12345678901, 1.5])
def test_valid_ids(id_):
    data = orjson.dumps({"jsonrpc": "2.0", "method": "m", "id": id_})
    assert decode(data) == Request("m", None, id_)
    data = orjson.dumps({"jsonrpc": "2.0", "result": 1, "id": id_})
    assert decode(data) == Response(id_, 1)


@pytest.mark.parametrize("id_", [True, False, [1], {"a": 1}])
def test_invalid_ids(id_):
    for obj in (
        {"jsonrpc": "2.0", "method": "m", "id": id_},
        {"jsonrpc": "2.0", "result": 1, "id": id_},
    ):
        with pytest.raises(InvalidRequest) as info:
            decode(orjson.dumps(obj))
        # An invalid id is never echoed back.
        assert info.value.id is None


INVALID_WITH_ID = [
    {"method": "m", "id": 7},
    {"jsonrpc": "1.0", "method": "m", "id": 7},
    {"jsonrpc": 2.0, "method": "m", "id": 7},
    {"jsonrpc": "2.0", "method": 5, "id": 7},
    {"jsonrpc": "2.0", "method": None, "id": 7},
    {"jsonrpc": "2.0", "method": "m", "params": "bar", "id": 7},
    {"jsonrpc": "2.0", "method": "m", "params": 3, "id": 7},
    {"jsonrpc": "2.0", "method": "m", "params": None, "id": 7},
    {"jsonrpc": "2.0", "method": "m", "result": 1, "id": 7},
    {"jsonrpc": "2.0", "method": "m", "error": {"code": 1, "message": "x"}, "id": 7},
    {"jsonrpc": "2.0", "id": 7},
    {"jsonrpc": "2.0", "result": 1, "error": {"code": 1, "message": "x"}, "id": 7},
    {"jsonrpc": "2.0", "error": "bad", "id": 7},
    {"jsonrpc": "2.0", "error": None, "id": 7},
    {"jsonrpc": "2.0", "error": {"message": "x"}, "id": 7},
    {"jsonrpc": "2.0", "error": {"code": "1", "message": "x"}, "id": 7},
    {"jsonrpc": "2.0", "error": {"code": 1.0, "message": "x"}, "id": 7},
    {"jsonrpc": "2.0", "error": {"code": True, "message": "x"}, "id": 7},
    {"jsonrpc": "2.0", "error": {"code": 1}, "id": 7},
    {"jsonrpc": "2.0", "error": {"code": 1, "message": None}, "id": 7},
]


@pytest.mark.parametrize("obj", INVALID_WITH_ID)
def test_invalid_objects_keep_their_id(obj):
    with pytest.raises(InvalidRequest) as info:
        decode(orjson.dumps(obj))
    assert info.value.id == 7
    assert ErrorResponse.from_error(info.value).id == 7


@pytest.mark.parametrize("obj", INVALID_WITH_ID)
def test_invalid_batch_members_keep_their_id(obj):
    batch = decode(orjson.dumps([obj, {"jsonrpc": "2.0", "method": "ok"}]))
    invalid, ok = batch.items
    assert isinstance(invalid, Invalid) and invalid.id == 7
    assert invalid.error.code == errors.INVALID_REQUEST
    assert ok == Notification("ok", None)


@pytest.mark.parametrize(
    "data",
    [
        b"1",
        b'"str"',
        b"null",
        b"true",
        b"{}",
        b'{"jsonrpc":"2.0"}',
        b'{"jsonrpc":"2.0","result":1}',
        b'{"jsonrpc":"2.0","method":1}',
    ],
)
def test_invalid_top_level_values(data):
    with pytest.raises(InvalidRequest) as info:
        decode(data)
    assert info.value.id is None


def test_batch_members_that_are_not_objects():
    batch = decode(b'[[], [{"jsonrpc":"2.0","method":"m"}], null, "x", true]')
    assert all(isinstance(item, Invalid) and item.id is None for item in batch.items)


def test_extra_members_are_tolerated():
    assert decode(b'{"jsonrpc":"2.0","method":"m","id":1,"x":2}') == Request("m", None, 1)
    assert decode(b'{"jsonrpc":"2.0","result":null,"id":1,"x":2}') == Response(1, None)


def test_response_with_null_result_and_null_id():
    assert decode(b'{"jsonrpc":"2.0","result":null,"id":null}') == Response(None, None)


def test_error_response_decoding():
    msg = decode(b'{"jsonrpc":"2.0","error":{"code":-32004,"message":"big","data":[1]},"id":3}')
    assert msg == ErrorResponse(3, -32004, "big", [1])
    msg = decode(b'{"jsonrpc":"2.0","error":{"code":1,"message":""},"id":null}')
    assert msg == ErrorResponse(None, 1, "", None)


def test_max_batch():
    item = {"jsonrpc": "2.0", "method": "m"}
    assert len(decode(orjson.dumps([item] * 100)).items) == 100
    with pytest.raises(TooLarge) as info:
        decode(orjson.dumps([item] * 101))
    assert info.value.code == errors.TOO_LARGE
    assert "100" in info.value.message
    assert len(decode(orjson.dumps([item] * 3), max_batch=3).items) == 3
    with pytest.raises(TooLarge, match="3"):
        decode(orjson.dumps([item] * 4), max_batch=3)


def test_batch_of_responses_and_requests_mixed():
    batch = decode(
        b'[{"jsonrpc":"2.0","result":"ACK","id":"m1"},'
        b'{"jsonrpc":"2.0","error":{"code":-32603,"message":"x"},"id":"m2"},'
        b'{"jsonrpc":"2.0","method":"ping","id":1}]'
    )
    assert batch.items == (
        Response("m1", "ACK"),
        ErrorResponse("m2", -32603, "x"),
        Request("ping", None, 1),
    )


# --- Encoding ---------------------------------------------------------------------


ROUND_TRIPS = [
    Request("msg.send", {"to": "bob", "message": {"a": [1, None]}}, 1),
    Request("ping", None, None),
    Request("ping", [], "id"),
    Request("x", {}, 2.5),
    Notification("msg.echo", {"message": "hi"}),
    Notification("n", None),
    Response("m1", "ACK"),
    Response(None, None),
    Response(4, {"id": "abc", "ts": 1700000000000}),
    ErrorResponse(1, -32001, "Not authenticated"),
    ErrorResponse("x", -32099, "custom", {"why": ["because"]}),
    ErrorResponse(None, -32700, "Parse error"),
]


@pytest.mark.parametrize("message", ROUND_TRIPS)
def test_round_trip(message):
    assert decode(encode(message)) == message
    assert decode(encode_batch([message])) == Batch((message,))


def test_encode_shapes():
    assert j(encode(Request("ping", None, 1))) == {"jsonrpc": "2.0", "method": "ping", "id": 1}
    assert j(encode(Request("m", [1], None))) == {
        "jsonrpc": "2.0",
        "method": "m",
        "params": [1],
        "id": None,
    }
    assert j(encode(Notification("n", None))) == {"jsonrpc": "2.0", "method": "n"}
    assert j(encode(Notification("n", {"a": 1}))) == {
        "jsonrpc": "2.0",
        "method": "n",
        "params": {"a": 1},
    }
    assert j(encode(Response(1, None))) == {"jsonrpc": "2.0", "id": 1, "result": None}
    assert j(encode(ErrorResponse(1, -1, "m"))) == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -1, "message": "m"},
    }
    assert j(encode(ErrorResponse(1, -1, "m", 0))) == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -1, "message": "m", "data": 0},
    }


def test_to_obj_matches_encode():
    for message in ROUND_TRIPS:
        assert orjson.dumps(to_obj(message)) == encode(message)


def test_encode_rejects_other_types():
    with pytest.raises(TypeError):
        encode({"jsonrpc": "2.0"})
    with pytest.raises(TypeError):
        encode(Batch(()))


def test_encode_batch_rejects_empty():
    with pytest.raises(ValueError):
        encode_batch([])


def test_encode_batch_is_one_array():
    data = encode_batch([Response(1, "ACK"), Response(2, "ACK")])
    assert data == b'[{"jsonrpc":"2.0","id":1,"result":"ACK"},{"jsonrpc":"2.0","id":2,"result":"ACK"}]'


def test_fragments_pass_through():
    stored = b'{"text":"hi","n":[1,2]}'
    params = {"id": "m1", "from": "alice", "message": orjson.Fragment(stored), "ts": 5}
    data = encode(Request("msg.recv", params, "m1"))
    assert stored in data
    assert decode(data) == Request(
        "msg.recv", {"id": "m1", "from": "alice", "message": j(stored), "ts": 5}, "m1"
    )
    data = encode_batch([Request("msg.recv", params, "m1"), Response(1, orjson.Fragment(b"[]"))])
    assert stored in data and data.endswith(b'"result":[]}]')


# --- Errors -----------------------------------------------------------------------


def test_from_error_uses_exc_id_by_default():
    exc = InvalidRequest(id="r1", data={"k": 1})
    assert ErrorResponse.from_error(exc) == ErrorResponse("r1", -32600, "Invalid Request", {"k": 1})
    assert ErrorResponse.from_error(exc, id=None).id is None
    assert ErrorResponse.from_error(exc, id=9).id == 9


@pytest.mark.parametrize(
    "cls_name, code, message",
    [
        ("ParseError", -32700, "Parse error"),
        ("InvalidRequest", -32600, "Invalid Request"),
        ("MethodNotFound", -32601, "Method not found"),
        ("InvalidParams", -32602, "Invalid params"),
        ("InternalError", -32603, "Internal error"),
        ("NotAuthenticated", -32001, "Not authenticated"),
        ("Forbidden", -32002, "Forbidden"),
        ("Overloaded", -32003, "Overloaded, retry later"),
        ("TooLarge", -32004, "Too large"),
        ("UnknownRecipient", -32005, "Unknown recipient"),
    ],
)
def test_every_error_code_round_trips(cls_name, code, message):
    cls = getattr(errors, cls_name)
    assert cls.code == code and cls.default_message == message
    assert error_class_for(code) is cls
    exc = cls(id=1)
    assert isinstance(exc, RpcError) and exc.message == message and str(exc) == message
    reply = decode(encode(ErrorResponse.from_error(exc)))
    assert reply == ErrorResponse(1, code, message)
    back = reply.to_exception()
    assert type(back) is cls
    assert (back.code, back.message, back.data, back.id) == (code, message, None, 1)
    custom = cls("details", data=[1], id="x")
    back = decode(encode(ErrorResponse.from_error(custom))).to_exception()
    assert (type(back), back.message, back.data, back.id) == (cls, "details", [1], "x")


def test_error_constants():
    assert (
        errors.PARSE_ERROR,
        errors.INVALID_REQUEST,
        errors.METHOD_NOT_FOUND,
        errors.INVALID_PARAMS,
        errors.INTERNAL_ERROR,
        errors.NOT_AUTHENTICATED,
        errors.FORBIDDEN,
        errors.OVERLOADED,
        errors.TOO_LARGE,
        errors.UNKNOWN_RECIPIENT,
    ) == (-32700, -32600, -32601, -32602, -32603, -32001, -32002, -32003, -32004, -32005)


def test_unknown_error_code_gets_a_generic_class():
    cls = error_class_for(-32099)
    assert issubclass(cls, RpcError) and cls.code == -32099
    assert error_class_for(-32099) is cls
    exc = ErrorResponse(5, -32099, "odd", "d").to_exception()
    assert type(exc) is cls and (exc.code, exc.message, exc.data, exc.id) == (-32099, "odd", "d", 5)
    assert ErrorResponse.from_error(exc) == ErrorResponse(5, -32099, "odd", "d")


def test_messages_are_frozen():
    msg = Request("m", None, 1)
    with pytest.raises(AttributeError):
        msg.method = "other"
    assert not hasattr(msg, "__dict__")


def test_answers_in_a_batch_do_not_count_against_max_batch():
    acks = [{"jsonrpc": "2.0", "id": f"m{n}", "result": "ACK"} for n in range(250)]
    batch = decode(orjson.dumps(acks + [{"jsonrpc": "2.0", "method": "ping", "id": 1}]), max_batch=100)
    assert len(batch.items) == 251
    calls = [{"jsonrpc": "2.0", "method": "ping", "id": n} for n in range(101)]
    with pytest.raises(TooLarge):
        decode(orjson.dumps(acks[:5] + calls), max_batch=100)


def test_encode_batches_cuts_by_count_and_by_bytes():
    from devastator.protocol import encode_batches

    requests = [Request("msg.recv", {"pad": "x" * 100}, n) for n in range(10)]
    one = len(encode(requests[0]))
    by_count = encode_batches(requests, max_items=4, max_bytes=1 << 20)
    assert [len(orjson.loads(b)) for b in by_count] == [4, 4, 2]
    by_bytes = encode_batches(requests, max_items=100, max_bytes=3 * one + 4)
    assert [len(orjson.loads(b)) for b in by_bytes] == [3, 3, 3, 1]
    assert all(len(b) <= 3 * one + 4 for b in by_bytes)
    assert [item["id"] for b in by_bytes for item in orjson.loads(b)] == list(range(10))
    # One message bigger than the limit still goes, alone.
    assert [len(orjson.loads(b)) for b in encode_batches(requests[:2], max_items=100, max_bytes=10)] == [1, 1]
