"""Tests of the client-to-server method params (PROTOCOL.md section 4)."""

import orjson
import pytest

from devastator.protocol import (
    HistoryParams,
    ReadParams,
    SignalParams,
    parse_history,
    parse_read,
    parse_signal,
    EchoParams,
    GoogleAuthParams,
    JwtAuthParams,
    Limits,
    PushRegisterParams,
    SendParams,
    errors,
    is_valid_device_id,
    is_valid_user_id,
    parse_auth_google,
    parse_auth_jwt,
    parse_echo,
    parse_push_register,
    parse_send,
)
from devastator.protocol.errors import InvalidParams, TooLarge
from devastator.protocol.methods import USER_ID_PATTERN

LIMITS = Limits()


def send(**params):
    return parse_send(params, LIMITS)


def invalid(func, params, field, *args):
    with pytest.raises(InvalidParams) as info:
        func(params, *args)
    assert info.value.code == errors.INVALID_PARAMS
    assert field in info.value.message
    return info.value


# --- ids --------------------------------------------------------------------------


@pytest.mark.parametrize("s", ["a", "Bob", "a.b-c_d@example.com", "0", "x" * 64, "._@-"])
def test_valid_ids(s):
    assert is_valid_user_id(s) and is_valid_device_id(s)


@pytest.mark.parametrize(
    "s", ["", "x" * 65, "a b", "a/b", "é", "a\n", "\n", "a:b", "１", None, 5, b"abc", ["a"]]
)
def test_invalid_ids(s):
    assert not is_valid_user_id(s) and not is_valid_device_id(s)


def test_user_id_pattern_is_compiled():
    assert USER_ID_PATTERN.fullmatch("abc")


def test_limits_defaults():
    assert Limits() == Limits(65536, 100, 2419200, 2419200, 128, 4096, 1000)


# --- msg.send ---------------------------------------------------------------------


def test_send_minimal():
    assert send(to="bob", message={"text": "hi"}) == SendParams(
        ("bob",), b'{"text":"hi"}', None, 2419200, False, b'"bob"'
    )


def test_send_full():
    params = parse_send(
        {"to": ["bob", "carol"], "message": [1, "x"], "cid": "c-1", "ttl": 60, "extra": 1},
        LIMITS,
    )
    assert params == SendParams(("bob", "carol"), b'[1,"x"]', "c-1", 60, False, b'["bob","carol"]')


def test_send_asks_for_receipts():
    assert send(to=["bob", "bob"], message=1, receipt=True).receipt is True
    assert send(to="bob", message=1, receipt=None).receipt is False


@pytest.mark.parametrize("receipt", [1, "yes", [], {}])
def test_send_receipt_must_be_a_boolean(receipt):
    invalid(parse_send, {"to": "bob", "message": 1, "receipt": receipt}, "receipt", LIMITS)


def test_send_to_as_sent_is_deduped_but_keeps_its_shape():
    assert send(to=["c", "a", "c"], message=1).to_json == b'["c","a"]'
    assert send(to="c", message=1).to_json == b'"c"'


# --- msg.read, msg.signal, msg.history ------------------------------------------------


def test_read_takes_unique_ids_in_order():
    assert parse_read({"ids": ["b", "a", "b"]}, LIMITS) == ReadParams(("b", "a"))
    assert parse_read({"ids": []}, LIMITS) == ReadParams(())


@pytest.mark.parametrize("params", [{}, {"ids": "a"}, {"ids": [1]}, {"ids": [""]}, {"ids": ["x" * 257]}, []])
def test_read_refuses_what_is_not_a_list_of_ids(params):
    with pytest.raises(InvalidParams):
        parse_read(params, LIMITS)


def test_read_refuses_too_many_ids():
    with pytest.raises(TooLarge):
        parse_read({"ids": [str(i) for i in range(1001)]}, LIMITS)


def test_signal_keeps_its_json_and_recipients():
    assert parse_signal({"to": ["bob", "bob"], "signal": {"typing": True}}, LIMITS) == SignalParams(
        ("bob",), b'{"typing":true}'
    )
    assert parse_signal({"to": "bob", "signal": None}, LIMITS).signal_json == b"null"


def test_signal_is_bounded_at_4_kib():
    parse_signal({"to": "bob", "signal": "x" * 4094}, LIMITS)  # 4096 bytes with its quotes
    with pytest.raises(TooLarge):
        parse_signal({"to": "bob", "signal": "x" * 4095}, LIMITS)


@pytest.mark.parametrize("params", [{"to": "bob"}, {"signal": 1}, {"to": "b b", "signal": 1}, {"to": [], "signal": 1}])
def test_signal_refuses_bad_params(params):
    with pytest.raises(InvalidParams):
        parse_signal(params, LIMITS)


def test_history_defaults_and_bounds():
    assert parse_history({"with": "bob"}) == HistoryParams("bob", None, 50)
    assert parse_history({"with": "bob", "before": "0a", "limit": 100.0}) == HistoryParams("bob", "0a", 100)
    assert parse_history({"with": "bob", "limit": 1, "before": None}).limit == 1


@pytest.mark.parametrize("params", [
    {}, {"with": ""}, {"with": "b b"}, {"with": "bob", "limit": 0}, {"with": "bob", "limit": 101},
    {"with": "bob", "limit": 1.5}, {"with": "bob", "limit": "5"}, {"with": "bob", "limit": True},
    {"with": "bob", "before": 5}, {"with": "bob", "before": ""},
])
def test_history_refuses_bad_params(params):
    with pytest.raises(InvalidParams):
        parse_history(params)


def test_send_dedupes_recipients_in_order():
    assert send(to=["c", "a", "c", "b", "a"], message=1).to == ("c", "a", "b")


def test_send_message_null_is_a_message():
    assert send(to="bob", message=None).message_json == b"null"


def test_send_message_missing():
    invalid(parse_send, {"to": "bob"}, "message", LIMITS)


@pytest.mark.parametrize("message", [0, "", False, [], {}, "ünïcode", 1.5])
def test_send_message_any_json(message):
    assert orjson.loads(send(to="bob", message=message).message_json) == message


@pytest.mark.parametrize("params", [None, [], ["bob", "hi"], "x", 1])
def test_send_params_must_be_object(params):
    invalid(parse_send, params, "params", LIMITS)


@pytest.mark.parametrize("to", [None, "", "a b", "x" * 65, [], ["ok", ""], ["ok", 1], 5, {"a": 1}])
def test_send_bad_to(to):
    invalid(parse_send, {"to": to, "message": 1}, '"to"', LIMITS)


def test_send_missing_to():
    invalid(parse_send, {"message": 1}, '"to"', LIMITS)


def test_send_recipient_limit():
    limits = Limits(max_recipients=3)
    assert len(parse_send({"to": ["a", "b", "c"], "message": 1}, limits).to) == 3
    # Duplicates do not count against the limit.
    assert len(parse_send({"to": ["a", "b", "c", "a", "b"], "message": 1}, limits).to) == 3
    with pytest.raises(TooLarge) as info:
        parse_send({"to": ["a", "b", "c", "d"], "message": 1}, limits)
    assert info.value.code == errors.TOO_LARGE and "3" in info.value.message


def test_send_default_recipient_limit():
    users = [f"u{i}" for i in range(101)]
    assert len(send(to=users[:100], message=1).to) == 100
    with pytest.raises(TooLarge):
        send(to=users, message=1)


def test_send_message_size_limit():
    limits = Limits(max_message_bytes=10)
    # '"12345678"' is exactly 10 bytes once serialized.
    assert parse_send({"to": "a", "message": "12345678"}, limits).message_json == b'"12345678"'
    with pytest.raises(TooLarge) as info:
        parse_send({"to": "a", "message": "123456789"}, limits)
    assert info.value.code == errors.TOO_LARGE and "10" in info.value.message


def test_send_message_size_is_counted_compact():
    limits = Limits(max_message_bytes=7)
    params = orjson.loads(b'{"to": "a", "message": {   "a" :   1 }}')
    assert parse_send(params, limits).message_json == b'{"a":1}'


def test_send_message_size_counts_utf8_bytes():
    limits = Limits(max_message_bytes=4)
    assert parse_send({"to": "a", "message": "é"}, limits).message_json == '"é"'.encode()
    with pytest.raises(TooLarge):
        parse_send({"to": "a", "message": "éé"}, limits)


def test_send_message_not_serializable():
    invalid(parse_send, {"to": "a", "message": object()}, "message", LIMITS)


def test_send_cid():
    assert send(to="a", message=1, cid="x").cid == "x"
    assert send(to="a", message=1, cid=None).cid is None
    assert send(to="a", message=1, cid="c" * 128).cid == "c" * 128
    limits = Limits(max_cid_length=4)
    assert parse_send({"to": "a", "message": 1, "cid": "abcd"}, limits).cid == "abcd"
    invalid(parse_send, {"to": "a", "message": 1, "cid": "abcde"}, '"cid"', limits)


@pytest.mark.parametrize("cid", ["", 5, True, ["x"], {"a": "b"}, "c" * 129])
def test_send_bad_cid(cid):
    invalid(parse_send, {"to": "a", "message": 1, "cid": cid}, '"cid"', LIMITS)


@pytest.mark.parametrize("ttl, expected", [(1, 1), (60, 60), (60.0, 60), (2419200, 2419200)])
def test_send_ttl(ttl, expected):
    got = send(to="a", message=1, ttl=ttl).ttl
    assert got == expected and type(got) is int


def test_send_ttl_default_and_null():
    assert send(to="a", message=1).ttl == 2419200
    assert send(to="a", message=1, ttl=None).ttl == 2419200
    assert parse_send({"to": "a", "message": 1}, Limits(default_ttl=30)).ttl == 30


def test_send_ttl_is_capped():
    assert send(to="a", message=1, ttl=2419201).ttl == 2419200
    assert send(to="a", message=1, ttl=10**30).ttl == 2419200
    assert send(to="a", message=1, ttl=1e300).ttl == 2419200
    limits = Limits(default_ttl=100, max_ttl=50)
    assert parse_send({"to": "a", "message": 1, "ttl": 60}, limits).ttl == 50
    assert parse_send({"to": "a", "message": 1}, limits).ttl == 50


@pytest.mark.parametrize("ttl", [0, -1, 0.0, -5.0, 1.5, True, False, "60", [60], {"s": 1}])
def test_send_bad_ttl(ttl):
    invalid(parse_send, {"to": "a", "message": 1, "ttl": ttl}, '"ttl"', LIMITS)


# --- msg.echo ---------------------------------------------------------------------


def test_echo():
    assert parse_echo({"message": {"a": 1}}, LIMITS) == EchoParams(b'{"a":1}')
    assert parse_echo({"message": None, "x": 1}, LIMITS) == EchoParams(b"null")


def test_echo_invalid():
    invalid(parse_echo, {}, "message", LIMITS)
    invalid(parse_echo, None, "params", LIMITS)
    invalid(parse_echo, [1], "params", LIMITS)


def test_echo_too_large():
    limits = Limits(max_message_bytes=3)
    assert parse_echo({"message": 123}, limits).message_json == b"123"
    with pytest.raises(TooLarge):
        parse_echo({"message": 1234}, limits)


# --- auth.jwt ---------------------------------------------------------------------


def test_auth_jwt():
    assert parse_auth_jwt({"token": "a.b.c"}) == JwtAuthParams("a.b.c")
    assert parse_auth_jwt({"token": "t" * 8192}).token == "t" * 8192


@pytest.mark.parametrize(
    "params", [{}, {"token": None}, {"token": ""}, {"token": 5}, {"token": "t" * 8193}]
)
def test_auth_jwt_invalid(params):
    invalid(parse_auth_jwt, params, '"token"')


@pytest.mark.parametrize("params", [None, ["a.b.c"], "a.b.c"])
def test_auth_jwt_params_must_be_object(params):
    invalid(parse_auth_jwt, params, "params")


# --- push.register ----------------------------------------------------------------


@pytest.mark.parametrize("platform", ["apns", "gcm", "fcm"])
def test_push_register(platform):
    got = parse_push_register({"platform": platform, "token": "tok"})
    assert got == PushRegisterParams(platform, "tok")


def test_push_register_token_limit():
    assert parse_push_register({"platform": "fcm", "token": "t" * 4096}).token == "t" * 4096
    invalid(parse_push_register, {"platform": "fcm", "token": "t" * 4097}, '"token"')


@pytest.mark.parametrize("platform", [None, "", "APNS", "sms", 1, ["fcm"]])
def test_push_register_bad_platform(platform):
    invalid(parse_push_register, {"platform": platform, "token": "t"}, '"platform"')


@pytest.mark.parametrize("token", [None, "", 7, ["t"]])
def test_push_register_bad_token(token):
    invalid(parse_push_register, {"platform": "apns", "token": token}, '"token"')


def test_push_register_params_must_be_object():
    invalid(parse_push_register, ["apns", "t"], "params")


# --- auth.google ------------------------------------------------------------------


def test_auth_google():
    assert parse_auth_google({"token": "id-token"}) == GoogleAuthParams("id-token", None, None)
    pem = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
    got = parse_auth_google({"token": "t", "device": "phone-1", "csr": pem, "x": 0})
    assert got == GoogleAuthParams("t", "phone-1", pem)
    assert parse_auth_google({"token": "t", "device": None, "csr": None}).device is None


@pytest.mark.parametrize(
    "params, field",
    [
        ({}, '"token"'),
        ({"token": ""}, '"token"'),
        ({"token": 1}, '"token"'),
        ({"token": "t" * 8193}, '"token"'),
        ({"token": "t", "device": ""}, '"device"'),
        ({"token": "t", "device": "a b"}, '"device"'),
        ({"token": "t", "device": "d" * 65}, '"device"'),
        ({"token": "t", "device": 3}, '"device"'),
        ({"token": "t", "csr": ""}, '"csr"'),
        ({"token": "t", "csr": 3}, '"csr"'),
        ({"token": "t", "csr": "c" * 16385}, '"csr"'),
        (None, "params"),
        (["t"], "params"),
    ],
)
def test_auth_google_invalid(params, field):
    invalid(parse_auth_google, params, field)


def test_params_are_frozen():
    params = send(to="a", message=1)
    with pytest.raises(AttributeError):
        params.ttl = 5
    assert not hasattr(params, "__dict__")
