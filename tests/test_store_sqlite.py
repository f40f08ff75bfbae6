"""The SQLite store on its own: checkpoints off the event loop, counts kept by every transaction,
SQLite's own failures as StoreError with the transaction rolled back."""
import sqlite3
import threading
import time

import gevent
import pytest

from devastator.actors import StoreActor
from devastator.actors.messages import CommitCountsQuery, PurgeExpired
from devastator.store import SqliteStore, StoreError


def test_a_checkpoint_in_another_thread_runs_beside_commits(tmp_path):
    store = SqliteStore(tmp_path / "db.sqlite")
    store.open()
    now = int(time.time() * 1000)
    store.add_user("bob", now)
    store.add_device("bob", "phone", now)
    stop = threading.Event()
    checkpoints = 0

    def checkpoint_often():
        nonlocal checkpoints
        while not stop.is_set():
            store.checkpoint()
            checkpoints += 1

    # A real OS thread from gevent's pool, as the store actor uses.
    worker = gevent.get_hub().threadpool.spawn(checkpoint_often)
    for n in range(300):
        with store.batch():
            store.append("alice", ["bob"], b'{"n":%d}' % n, None, 60, now)
        gevent.sleep(0)
    stop.set()
    worker.get(timeout=10)
    assert checkpoints > 0
    pending = store.load_pending("bob", "phone", 0, 1000, now)
    assert [m.message_json for m in pending] == [b'{"n":%d}' % n for n in range(300)]
    store.close()


class CountingStore(SqliteStore):
    checkpoints = 0

    def checkpoint(self) -> None:
        CountingStore.checkpoints += 1
        super().checkpoint()


def test_the_store_actor_checkpoints_after_commits(tmp_path):
    ref = StoreActor.start(store=CountingStore(tmp_path / "db.sqlite"), checkpoint_interval=0.0)
    for _ in range(3):
        ref.tell(PurgeExpired())
        assert ref.ask(CommitCountsQuery())["commits"] >= 1
    ref.stop()
    assert CountingStore.checkpoints >= 1


# -- counts kept, not counted ---------------------------------------------------------------

NOW = 1_800_000_000_000


def filled(path, messages: int = 50) -> SqliteStore:
    store = SqliteStore(path, synchronous="NORMAL")
    store.open()
    store.add_user("bob", NOW)
    store.add_device("bob", "phone", NOW)
    with store.batch():
        for n in range(messages):
            store.append("alice", ["bob"], b"%d" % n, None, 60, NOW)
    return store


def test_stats_read_the_kept_counts_and_never_count_a_table(tmp_path):
    store = filled(tmp_path / "db.sqlite")
    statements = []
    store._conn.set_trace_callback(statements.append)
    assert store.stats() == {"users": 1, "devices": 1, "messages": 50, "pending": 50}
    assert statements and not [sql for sql in statements if "count(" in sql.lower()]
    store.close()


def test_a_database_made_before_the_counts_is_counted_once_at_open(tmp_path):
    path = tmp_path / "db.sqlite"
    filled(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE counts")  # as a database from before this version has it
    db.commit()
    db.close()
    store = SqliteStore(path)
    store.open()
    assert store.stats() == {"users": 1, "devices": 1, "messages": 50, "pending": 50}
    store.close()


def test_a_failed_transaction_rolls_back_its_rows_and_its_counts(tmp_path):
    store = filled(tmp_path / "db.sqlite", messages=1)
    # SQLite itself refusing a statement in the middle of a batch, as a full disk would.
    store._conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN CAST(NEW.body AS TEXT) = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(StoreError, match="disk full"):
        with store.batch():
            store.add_user("carol", NOW)
            store.add_device("carol", "phone", NOW)
            store.append("alice", ["bob", "carol"], b"fine", None, 60, NOW)
            store.append("alice", ["bob"], b"boom", None, 60, NOW)
    assert store.stats() == {"users": 1, "devices": 1, "messages": 1, "pending": 1}
    assert not store.has_user("carol")  # not even remembered from inside the rolled-back batch
    assert [m.message_json for m in store.load_pending("bob", "phone", 0, 10, NOW)] == [b"0"]
    store.close()


def test_a_database_locked_too_long_by_another_process_is_a_store_error(tmp_path):
    path = tmp_path / "db.sqlite"
    filled(path, messages=0).close()
    store = SqliteStore(path, busy_timeout_ms=50)
    store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the CLI holding the write lock
    try:
        with pytest.raises(StoreError, match="could not begin"):
            store.add_user("carol", NOW)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.add_user("carol", NOW) is True
    assert store.stats()["users"] == 2
    store.close()
