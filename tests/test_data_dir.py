"""The data directory and every file in it are private to the server's user, whoever made it.

A real server on a real SQLite file: after a first start, after a start on a
directory made 0755 by hand with files left 0644 (as an older version or a
usual umask makes them), and a clear error where the modes cannot be changed.
"""
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import start_server
from devastator import pki

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def usual_umask():
    """The umask most systems give a login (022): files would be 0644 unless the server says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    """The mode of the directory ("."), and of each entry in it."""
    entries = {".": directory, **{entry.name: entry for entry in directory.iterdir()}}
    return {name: stat.S_IMODE(path.lstat().st_mode) for name, path in entries.items()}


def use_the_store(running) -> None:
    """A message stored and delivered: the database and its -wal and -shm files exist."""
    running.connect("bob")
    sent = running.connect("alice").send("bob", "hello")
    assert sent["id"]


def assert_private(directory: Path) -> None:
    found = modes(directory)
    expected = {"ca.pem", "ca.key", "server.pem", "server.key", "jwt-keys.json", "devastator.db",
                "devastator.db-wal", "devastator.db-shm", "admin.sock"}
    assert expected <= set(found), sorted(found)
    loose = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert not loose, f"readable by others: {loose}"
    assert found["."] == 0o700


def test_a_first_start_makes_everything_private(settings):
    running = start_server(settings)
    try:
        use_the_store(running)
        assert_private(settings.data_dir)
    finally:
        running.close_clients()
        running.server.stop()


def test_a_data_dir_made_by_hand_with_loose_modes_is_tightened(settings, caplog):
    first = start_server(settings)
    use_the_store(first)
    first.close_clients()
    first.server.stop()
    data_dir = settings.data_dir
    for entry in data_dir.iterdir():
        entry.chmod(0o644)  # as an older version, or a copy with a usual umask, left them
    data_dir.chmod(0o755)  # as `mkdir` makes it

    with caplog.at_level(logging.WARNING, logger="devastator.pki"):
        again = start_server(settings)
    try:
        use_the_store(again)
        assert_private(data_dir)
        (warning,) = [record for record in caplog.records if record.name == "devastator.pki"]
        assert str(data_dir) in warning.getMessage() and "ca.key 644" in warning.getMessage()
    finally:
        again.close_clients()
        again.server.stop()


def test_modes_that_cannot_be_changed_stop_the_start_with_one_clear_line(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    if os.geteuid() == 0:
        # Root may change any file's mode, but not an immutable one's.
        subprocess.run(["chattr", "+i", str(data_dir)], check=True)
        undo = ["chattr", "-i", str(data_dir)]
    else:
        data_dir = Path("/tmp")  # another user's directory (root's), that this one may not change
        undo = None
    try:
        with pytest.raises(PermissionError) as refused:
            pki.ensure_private_dir(data_dir)
        assert f"cannot make {data_dir} private to the server's user (mode 700, not 755)" in str(refused.value)
        result = subprocess.run(
            [sys.executable, str(ROOT / "bin" / "devastator"), "--data-dir", str(data_dir),
             "--tls-port", "0", "--http-port", "0"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        if undo is not None:
            subprocess.run(undo, check=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert f"cannot start: [Errno 1] cannot make {data_dir} private" in error, result.stderr
