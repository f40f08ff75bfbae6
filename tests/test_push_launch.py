"""Which push providers the settings turn on, and clear errors for those set up wrong."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devastator.config import Settings, SettingsError
from devastator.push import PushCounters
from devastator.push.launch import provider_starters

ROOT = Path(__file__).resolve().parent.parent
COUNTERS = {platform: PushCounters() for platform in ("apns", "gcm", "fcm")}


def test_no_credentials_no_providers():
    assert provider_starters(Settings(), COUNTERS, env={}) == {}


def test_an_apns_key_file_that_is_missing_names_the_setting(tmp_path):
    settings = Settings(apns_topic="com.example.app", apns_key_file=tmp_path / "AuthKey.p8",
                        apns_key_id="ABCDE12345", apns_team_id="TEAM123456")
    with pytest.raises(SettingsError, match="apns_key_file"):
        provider_starters(settings, COUNTERS, env={})


def test_apns_without_credentials_is_refused():
    with pytest.raises(SettingsError, match="APNs is set up wrong"):
        provider_starters(Settings(apns_topic="com.example.app"), COUNTERS, env={})


def test_gcm_takes_its_key_from_the_setting_or_the_google_variables():
    settings = Settings(gcm_sender_id="123456789012")
    with pytest.raises(SettingsError, match="GOOGLE_API_KEY"):
        provider_starters(settings, COUNTERS, env={})
    assert set(provider_starters(settings, COUNTERS, env={"GOOGLE_API_KEY": "k"})) == {"gcm"}
    preprod = settings.replace(gcm_preprod=True)
    with pytest.raises(SettingsError, match="GOOGLE_PREPROD_API_KEY"):
        provider_starters(preprod, COUNTERS, env={"GOOGLE_API_KEY": "k"})
    assert set(provider_starters(preprod, COUNTERS, env={"GOOGLE_PREPROD_API_KEY": "k"})) == {"gcm"}
    assert set(provider_starters(settings.replace(gcm_api_key="k"), COUNTERS, env={})) == {"gcm"}


def test_a_broken_service_account_file_names_the_setting(tmp_path):
    account = tmp_path / "service-account.json"
    account.write_text(json.dumps({"type": "service_account", "project_id": "p"}))
    with pytest.raises(SettingsError, match="fcm_service_account_file"):
        provider_starters(Settings(fcm_service_account_file=account), COUNTERS, env={})


def test_the_server_refuses_to_start_with_a_provider_set_up_wrong(tmp_path):
    env = {"DEVASTATOR_APNS_TOPIC": "com.example.app", "DEVASTATOR_APNS_KEY_FILE": str(tmp_path / "none.p8"),
           "PATH": "/usr/bin:/bin"}
    started = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "devastator"), "--data-dir", str(tmp_path / "data"),
         "--tls-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert started.returncode == 1
    assert "apns_key_file" in started.stderr and "Traceback" not in started.stderr
