"""Tests for devastator.secrets: the JWT signing keys file."""

import base64
import json
import re
import stat

import jwt
import pytest

from devastator.secrets import JwtKeys, ensure_jwt_keys, rotate_jwt_keys


def test_creates_keys_file(tmp_path):
    data_dir = tmp_path / "data"

    keys = ensure_jwt_keys(data_dir)

    path = data_dir / "jwt-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    document = json.loads(path.read_text())
    assert document["current"] == keys.current_kid
    assert re.fullmatch(r"[0-9a-f]{8}", keys.current_kid)
    encoded = document["keys"][keys.current_kid]
    assert base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)) == keys.current_secret
    assert len(keys.current_secret) == 32


def test_reload_gives_same_keys(tmp_path):
    created = ensure_jwt_keys(tmp_path)
    file_bytes = (tmp_path / "jwt-keys.json").read_bytes()

    reloaded = ensure_jwt_keys(tmp_path)

    assert reloaded == created
    assert (tmp_path / "jwt-keys.json").read_bytes() == file_bytes


def test_rotate_adds_current_key_and_keeps_old(tmp_path):
    first = ensure_jwt_keys(tmp_path)

    rotated = rotate_jwt_keys(tmp_path)

    assert rotated.current_kid != first.current_kid
    assert rotated.keys[first.current_kid] == first.current_secret
    assert len(rotated.keys) == 2
    assert ensure_jwt_keys(tmp_path) == rotated
    assert stat.S_IMODE((tmp_path / "jwt-keys.json").stat().st_mode) == 0o600


def test_token_signed_before_rotation_still_verifies(tmp_path):
    before = ensure_jwt_keys(tmp_path)
    token = jwt.encode({"sub": "alice"}, before.current_secret, algorithm="HS256", headers={"kid": before.current_kid})

    after = rotate_jwt_keys(tmp_path)

    kid = jwt.get_unverified_header(token)["kid"]
    assert jwt.decode(token, after.keys[kid], algorithms=["HS256"]) == {"sub": "alice"}


def test_secrets_stay_out_of_repr(tmp_path):
    keys = ensure_jwt_keys(tmp_path)

    assert keys.current_secret.hex() not in repr(keys)
    assert repr(keys.current_secret) not in repr(keys)


def test_keys_are_read_only():
    secrets = {"k1": b"x" * 32}
    keys = JwtKeys(current_kid="k1", keys=secrets)
    secrets["k2"] = b"y" * 32

    assert list(keys.keys) == ["k1"]
    with pytest.raises(TypeError):
        keys.keys["k3"] = b"z" * 32  # type: ignore[index]


def test_current_kid_must_be_a_key():
    with pytest.raises(ValueError):
        JwtKeys(current_kid="missing", keys={"k1": b"x" * 32})


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"current": "a", "keys": {}}',
        '{"current": "a", "keys": {"a": "short"}}',
        '{"current": "a", "keys": {"a": "!!!!"}}',
    ],
)
def test_corrupt_file_is_an_error_naming_it(tmp_path, content):
    (tmp_path / "jwt-keys.json").write_text(content)

    with pytest.raises(ValueError, match="jwt-keys.json"):
        ensure_jwt_keys(tmp_path)
