"""Tests for devastator.config: the four layers, validation and its messages."""

import dataclasses
from pathlib import Path

import pytest

from devastator.config import Settings, SettingsError, load_settings


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devastator.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_layer():
    settings = load_settings(env={})

    assert settings == Settings()
    assert settings.tls_port == 3001
    assert settings.http_port == 3000
    assert settings.data_dir == Path("./devastator-data")
    assert settings.sqlite_synchronous == "FULL"


def test_every_field_reads_its_environment_variable():
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        value = getattr(defaults, field.name)
        if value is None or value == ():
            continue  # unset: an empty variable counts as not given
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)

        settings = load_settings(env={f"DEVASTATOR_{field.name.upper()}": text})

        assert getattr(settings, field.name) == value, field.name


def test_path_helpers(tmp_path):
    settings = Settings(data_dir=tmp_path)

    assert settings.db_path == tmp_path / "devastator.db"
    assert settings.pki_dir == tmp_path


def test_each_layer_overrides_the_one_before(tmp_path):
    config_file = write_toml(
        tmp_path,
        'tls_port = 4001\nhttp_port = 4000\nmax_batch = 7\nhost = "0.0.0.0"\n',
    )
    env = {"DEVASTATOR_HTTP_PORT": "5000", "DEVASTATOR_MAX_BATCH": "8"}
    overrides = {"max_batch": 9, "host": None}

    settings = load_settings(config_file=config_file, env=env, overrides=overrides)

    assert settings.tls_port == 4001  # file over default
    assert settings.http_port == 5000  # environment over file
    assert settings.max_batch == 9  # override over environment
    assert settings.host == "0.0.0.0"  # a None override is ignored
    assert settings.max_frame_bytes == 1048576  # default


def test_config_file_named_by_environment(tmp_path):
    config_file = write_toml(tmp_path, "max_recipients = 3\n")

    settings = load_settings(env={"DEVASTATOR_CONFIG": str(config_file)})

    assert settings.max_recipients == 3


def test_config_file_argument_wins_over_environment(tmp_path):
    chosen = write_toml(tmp_path, "max_recipients = 3\n")

    settings = load_settings(
        config_file=chosen, env={"DEVASTATOR_CONFIG": str(tmp_path / "absent.toml")}
    )

    assert settings.max_recipients == 3


def test_environment_strings_are_converted():
    env = {
        "DEVASTATOR_DATA_DIR": "/var/lib/devastator",
        "DEVASTATOR_ACK_TIMEOUT": "2.5",
        "DEVASTATOR_TICK_INTERVAL": "1",
        "DEVASTATOR_SQLITE_SYNCHRONOUS": "normal",
        "DEVASTATOR_LOG_LEVEL": "debug",
        "DEVASTATOR_WS_TLS": "yes",
    }

    settings = load_settings(env=env)

    assert settings.data_dir == Path("/var/lib/devastator")
    assert settings.ack_timeout == 2.5
    assert settings.tick_interval == 1.0 and isinstance(settings.tick_interval, float)
    assert settings.sqlite_synchronous == "NORMAL"
    assert settings.log_level == "DEBUG"
    assert settings.ws_tls is True


def test_empty_environment_variable_counts_as_unset():
    assert load_settings(env={"DEVASTATOR_TLS_PORT": ""}).tls_port == 3001


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True),
        ("0", False), ("false", False), ("False", False), ("NO", False), ("off", False),
    ],
)
def test_boolean_parsing(text, expected):
    settings = load_settings(env={"DEVASTATOR_LOG_JSON": text})

    assert settings.log_json is expected


def test_bad_boolean_names_setting_and_variable():
    with pytest.raises(SettingsError) as caught:
        load_settings(env={"DEVASTATOR_LOG_JSON": "maybe"})

    assert caught.value.setting == "log_json"
    assert "'log_json'" in str(caught.value)
    assert "DEVASTATOR_LOG_JSON" in str(caught.value)


def test_bad_integer_message_from_environment():
    with pytest.raises(SettingsError) as caught:
        load_settings(env={"DEVASTATOR_TLS_PORT": "abc"})

    assert str(caught.value) == (
        "setting 'tls_port': expected an integer from 0 to 65535, got 'abc' "
        "(from DEVASTATOR_TLS_PORT)"
    )


@pytest.mark.parametrize(
    "name, text",
    [
        ("tls_port", "65536"),
        ("http_port", "-1"),
        ("max_connections", "0"),
        ("max_frame_bytes", "-5"),
        ("max_batch", "1.5"),
        ("max_message_bytes", "0"),
        ("max_recipients", "0"),
        ("max_cid_length", "0"),
        ("default_ttl", "0"),
        ("max_ttl", "0"),
        ("read_timeout", "0"),
        ("ack_timeout", "-1"),
        ("user_idle_timeout", "nan"),
        ("tick_interval", "inf"),
        ("delivery_window", "0"),
        ("max_pending_requests", "0"),
        ("max_outbound_bytes", "0"),
        ("sqlite_synchronous", "sometimes"),
        ("token_ttl", "0"),
        ("cert_days", "0"),
        ("log_level", "VERBOSE"),
        ("ws_tls", "2"),
    ],
)
def test_invalid_environment_values_name_setting_and_source(name, text):
    variable = f"DEVASTATOR_{name.upper()}"

    with pytest.raises(SettingsError) as caught:
        load_settings(env={variable: text})

    assert caught.value.setting == name
    assert f"setting '{name}'" in str(caught.value)
    assert variable in str(caught.value)


def test_blank_host_override_is_rejected():
    with pytest.raises(SettingsError) as caught:
        load_settings(env={}, overrides={"host": "  "})

    assert caught.value.setting == "host"
    assert "command line" in str(caught.value)


def test_ports_may_be_zero():
    settings = load_settings(env={"DEVASTATOR_TLS_PORT": "0"}, overrides={"http_port": 0})

    assert (settings.tls_port, settings.http_port) == (0, 0)


def test_default_ttl_may_not_exceed_max_ttl(tmp_path):
    config_file = write_toml(tmp_path, "max_ttl = 100\n")

    with pytest.raises(SettingsError) as caught:
        load_settings(config_file=config_file, env={"DEVASTATOR_DEFAULT_TTL": "200"})

    assert caught.value.setting == "default_ttl"
    assert "max_ttl" in str(caught.value)
    assert "DEVASTATOR_DEFAULT_TTL" in str(caught.value)


def test_wrong_type_in_toml_names_file(tmp_path):
    config_file = write_toml(tmp_path, 'tls_port = "3001"\n')

    with pytest.raises(SettingsError) as caught:
        load_settings(config_file=config_file, env={})

    assert caught.value.setting == "tls_port"
    assert str(config_file) in str(caught.value)


def test_toml_boolean_is_not_an_integer(tmp_path):
    config_file = write_toml(tmp_path, "max_batch = true\n")

    with pytest.raises(SettingsError, match="max_batch"):
        load_settings(config_file=config_file, env={})


def test_toml_integer_is_accepted_for_seconds(tmp_path):
    config_file = write_toml(tmp_path, "read_timeout = 10\n")

    settings = load_settings(config_file=config_file, env={})

    assert settings.read_timeout == 10.0 and isinstance(settings.read_timeout, float)


def test_unknown_toml_key_is_named(tmp_path):
    config_file = write_toml(tmp_path, "tls_prot = 1\n")

    with pytest.raises(SettingsError) as caught:
        load_settings(config_file=config_file, env={})

    assert caught.value.setting == "tls_prot"
    assert "'tls_prot'" in str(caught.value)
    assert "tls_port" in str(caught.value)  # the suggestion
    assert str(config_file) in str(caught.value)


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.toml"

    with pytest.raises(SettingsError) as caught:
        load_settings(env={"DEVASTATOR_CONFIG": str(missing)})

    assert str(missing) in str(caught.value)
    assert "DEVASTATOR_CONFIG" in str(caught.value)


def test_invalid_toml_names_file(tmp_path):
    config_file = write_toml(tmp_path, "tls_port = = 3\n")

    with pytest.raises(SettingsError) as caught:
        load_settings(config_file=config_file, env={})

    assert str(config_file) in str(caught.value)
    assert "TOML" in str(caught.value)


def test_unknown_override_is_named():
    with pytest.raises(SettingsError) as caught:
        load_settings(env={}, overrides={"port": 1})

    assert caught.value.setting == "port"


def test_string_overrides_are_parsed_like_environment():
    settings = load_settings(env={}, overrides={"tls_port": "4443", "log_json": "on"})

    assert settings.tls_port == 4443
    assert settings.log_json is True


def test_environment_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("DEVASTATOR_MAX_BATCH", "12")
    monkeypatch.delenv("DEVASTATOR_CONFIG", raising=False)

    assert load_settings().max_batch == 12


def test_replace_returns_validated_copy(tmp_path):
    original = Settings()

    changed = original.replace(data_dir=tmp_path, tls_port=0, ack_timeout=1)

    assert changed.data_dir == tmp_path
    assert changed.tls_port == 0
    assert changed.ack_timeout == 1.0
    assert original.tls_port == 3001  # frozen: the original is untouched


def test_replace_rejects_invalid_values():
    with pytest.raises(SettingsError) as caught:
        Settings().replace(max_batch=0)

    assert caught.value.setting == "max_batch"
    assert "replace" in str(caught.value)


def test_replace_rejects_unknown_settings():
    with pytest.raises(SettingsError) as caught:
        Settings().replace(max_bach=3)

    assert caught.value.setting == "max_bach"


def test_replace_checks_ttl_pair():
    with pytest.raises(SettingsError, match="default_ttl"):
        Settings().replace(default_ttl=10, max_ttl=5)


def test_direct_construction_validates():
    with pytest.raises(SettingsError, match="tls_port"):
        Settings(tls_port=70000)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().tls_port = 1  # type: ignore[misc]


def test_a_message_must_fit_in_a_frame_with_its_envelope():
    with pytest.raises(SettingsError, match="max_message_bytes"):
        Settings(max_frame_bytes=65536, max_message_bytes=65536)
    Settings(max_frame_bytes=65536 + 1024, max_message_bytes=65536)


def test_oidc_settings_read_lists_and_optional_files(tmp_path):
    settings = load_settings(
        env={
            "DEVASTATOR_OIDC_AUDIENCES": "web.apps.googleusercontent.com, ios.apps.googleusercontent.com",
            "DEVASTATOR_OIDC_CA_FILE": str(tmp_path / "ca.pem"),
        }
    )
    assert settings.oidc_audiences == ("web.apps.googleusercontent.com", "ios.apps.googleusercontent.com")
    assert settings.oidc_ca_file == tmp_path / "ca.pem"
    assert Settings().oidc_audiences == ()  # sign-in is off until an operator names a client id
    assert Settings(oidc_issuers=["https://issuer.example"]).oidc_issuers == ("https://issuer.example",)


@pytest.mark.parametrize(
    "name, value",
    [
        ("oidc_jwks_url", "http://insecure.example/jwks"),
        ("oidc_audiences", ["ok", ""]),
        ("oidc_audiences", "not-a-list"),
        ("oidc_user_prefix", "has-dash"),
        ("oidc_clock_skew", -1),
    ],
)
def test_bad_oidc_settings_name_the_setting(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings().replace(**{name: value})


def test_several_workers_need_the_redis_store_and_fixed_ports():
    with pytest.raises(SettingsError, match="workers"):
        Settings(workers=2)
    with pytest.raises(SettingsError, match="fixed ports"):
        Settings(workers=2, store="redis", tls_port=0)
    assert Settings(workers=2, store="redis").workers == 2
