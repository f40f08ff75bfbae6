"""bin/devastator and python -m devastator as an operator uses them (real subprocesses)."""
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from devastator.auth import JwtAuthority
from devastator.secrets import JwtKeyFile

ROOT = Path(__file__).resolve().parent.parent
DEVASTATOR = [sys.executable, str(ROOT / "bin" / "devastator")]


def run(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([*DEVASTATOR, *args], capture_output=True, text=True, timeout=30, check=check, env=env)


def test_token_creates_the_user_and_prints_a_jwt_last(tmp_path):
    data = tmp_path / "data"
    out = run("token", "alice", "--device", "phone", "--data-dir", str(data), "--ttl", "120").stdout
    token = out.strip().splitlines()[-1]
    assert JwtAuthority(JwtKeyFile(data)).verify(token)[:2] == ("alice", "phone")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    listing = run("user", "list", "--data-dir", str(data)).stdout
    assert listing.splitlines() == ["alice\tphone"]


def test_user_add_and_list(tmp_path):
    data = str(tmp_path / "data")
    assert run("user", "add", "bob", "--data-dir", data).stdout.strip() == "created: bob"
    assert run("user", "add", "bob", "--data-dir", data).stdout.strip() == "exists: bob"
    run("token", "alice", "--data-dir", data)
    assert run("user", "list", "--data-dir", data).stdout.splitlines() == ["alice\tdefault", "bob\t"]


@pytest.mark.parametrize("user", ["", "no spaces", "x" * 65, "ünïcode"])
def test_invalid_user_ids_are_refused(tmp_path, user):
    result = run("token", user, "--data-dir", str(tmp_path / "data"), check=False)
    assert result.returncode == 2 and "invalid user id" in result.stderr


def test_python_dash_m_works_too(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "devastator", "token", "carol", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30, check=True, cwd=ROOT,
    ).stdout
    assert out.strip().splitlines()[-1].count(".") == 2


def test_a_bad_setting_is_named(tmp_path):
    result = run("--data-dir", str(tmp_path / "data"), "--tls-port", "99999", check=False)
    assert result.returncode == 2
    assert "tls_port" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_environment_setting_is_named(tmp_path):
    import os

    env = dict(os.environ, DEVASTATOR_ACK_TIMEOUT="soon")
    result = run("--data-dir", str(tmp_path / "data"), env=env, check=False)
    assert result.returncode == 2
    assert "ack_timeout" in result.stderr and "DEVASTATOR_ACK_TIMEOUT" in result.stderr


def test_a_config_file_with_an_unknown_key_is_named(tmp_path):
    config = tmp_path / "devastator.toml"
    config.write_text('tls_prot = 4000\n')
    result = run("--config", str(config), "--data-dir", str(tmp_path / "data"), check=False)
    assert result.returncode == 2 and "tls_prot" in result.stderr


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("serve", "token", "user"):
        assert command in out


def test_a_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--data-dir", str(tmp_path / "data"), "--tls-port", str(port), "--http-port", "0",
                     check=False)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_apikey_create_list_remove(tmp_path):
    import hashlib
    import json
    import stat

    from devastator.api_keys import ApiKeyFile

    data = tmp_path / "data"
    created = run("apikey", "create", "backend", "--data-dir", str(data))
    key = created.stdout.strip()
    assert created.stdout.count("dvk_") == 1 and key.startswith("dvk_")  # the key, once, alone on stdout
    assert "shown this once" in created.stderr and key not in created.stderr
    path = data / "api-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    secret = key.split("_", 2)[2]  # base64url: the secret may hold "_" itself
    assert len(secret) == 43
    assert key not in text and secret not in text  # neither the key nor its secret...
    (entry,) = json.loads(text)["keys"]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()  # ...only its hash
    assert entry["name"] == "backend" and key.split("_")[1] == entry["id"]
    assert ApiKeyFile(data).verify(key).name == "backend"

    taken = run("apikey", "create", "backend", "--data-dir", str(data), check=False)
    assert taken.returncode == 2 and "exists already" in taken.stderr
    run("apikey", "create", "other", "--data-dir", str(data))
    listing = run("apikey", "list", "--data-dir", str(data)).stdout.splitlines()
    assert listing[0] == "NAME\tID\tCREATED"
    assert [line.split("\t")[:2] for line in listing[1:]][0] == ["backend", entry["id"]]
    assert len(listing) == 3 and "dvk_" not in "".join(listing) and entry["sha256"] not in "".join(listing)

    assert "removed" in run("apikey", "remove", "backend", "--data-dir", str(data)).stdout
    assert ApiKeyFile(data).verify(key) is None
    missing = run("apikey", "remove", "backend", "--data-dir", str(data), check=False)
    assert missing.returncode == 1 and "no API key named" in missing.stderr
    assert [line.split("\t")[0] for line in run("apikey", "list", "--data-dir", str(data)).stdout.splitlines()] == [
        "NAME", "other"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "no spaces", "x" * 65])
def test_apikey_names_are_checked(tmp_path, name):
    result = run("apikey", "create", name, "--data-dir", str(tmp_path / "data"), check=False)
    assert result.returncode == 2 and "invalid key name" in result.stderr
