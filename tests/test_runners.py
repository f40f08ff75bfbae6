"""Runners: greenlets kept between tasks (devastator/runners.py)."""
import logging

import gevent
import gevent.event

from devastator.runners import Runners


def test_a_task_runs_in_a_greenlet_kept_for_the_next_one():
    runners = Runners("test")
    ran_in = []
    done = gevent.event.Event()

    def task(n):
        ran_in.append((n, gevent.getcurrent()))
        done.set()

    for n in range(3):
        done.clear()
        runners.spawn(task, n)
        assert done.wait(5)
        assert runners.join(5)
    assert [n for n, _ in ran_in] == [0, 1, 2]
    assert len({id(greenlet) for _, greenlet in ran_in}) == 1  # one greenlet, reused
    runners.kill()


def test_len_counts_running_tasks_and_join_waits_for_them():
    runners = Runners("test")
    release = gevent.event.Event()
    for _ in range(3):
        runners.spawn(release.wait)
    gevent.sleep(0)
    assert len(runners) == 3
    assert not runners.join(0.05)
    release.set()
    assert runners.join(5)
    assert len(runners) == 0
    runners.kill()


def test_tasks_at_once_get_greenlets_of_their_own_and_at_most_max_parked_stay():
    runners = Runners("test", max_parked=2)
    release = gevent.event.Event()
    seen = []

    def task():
        seen.append(gevent.getcurrent())
        release.wait()

    for _ in range(4):
        runners.spawn(task)
    gevent.sleep(0)
    assert len(set(map(id, seen))) == 4
    release.set()
    assert runners.join(5)
    ending = [greenlet for greenlet in seen if greenlet not in runners._parked]
    assert len(ending) == 2
    gevent.joinall(ending, timeout=5)
    assert all(greenlet.dead for greenlet in ending)
    assert len(runners._parked) == 2
    runners.kill()


def test_a_failing_task_is_logged_and_its_greenlet_goes_on(caplog):
    runners = Runners("test")
    results = []

    def fail():
        results.append(gevent.getcurrent())
        raise ValueError("boom")

    def succeed():
        results.append(gevent.getcurrent())

    with caplog.at_level(logging.ERROR, logger="devastator.runners"):
        runners.spawn(fail)
        assert runners.join(5)
        runners.spawn(succeed)
        assert runners.join(5)
    assert len(results) == 2 and results[0] is results[1]
    assert "test task crashed: ValueError('boom')" in caplog.text
    runners.kill()


def test_kill_ends_running_and_parked_greenlets_and_later_tasks_still_run():
    runners = Runners("test")
    started = gevent.event.Event()
    runners.spawn(lambda: None)
    assert runners.join(5)

    def forever():
        started.set()
        gevent.sleep(60)

    runners.spawn(forever)
    runners.spawn(forever)
    assert started.wait(5)
    runners.kill(timeout=5)
    assert len(runners._group) == 0
    done = gevent.event.Event()
    runners.spawn(done.set)
    assert done.wait(5)
    assert runners.join(5)
    assert not runners._parked  # not kept after a kill
