"""The SQLite store on its own: checkpoints off the event loop."""
import threading
import time

import gevent

from devastator.actors import StoreActor
from devastator.actors.messages import Inspect, PurgeExpired
from devastator.store import SqliteStore


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
        assert ref.ask(Inspect())["commits"] >= 1
    ref.stop()
    assert CountingStore.checkpoints >= 1
