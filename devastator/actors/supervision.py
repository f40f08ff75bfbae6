"""Noticing that an actor stopped: pykka has no links or monitors, so a greenlet waits for it.

pykka stops an actor whose ``on_start`` or ``on_receive`` raised, logs the
traceback, and tells nobody. A parent that must act on a child's death (the
push dispatcher for its providers, the launcher for the core actors) watches
the child: ``on_stopped`` runs once the child has stopped, however it stopped.
Whether that was a failure is the parent's call: a stop it did not ask for is.
"""
from __future__ import annotations

import logging
from typing import Callable

import gevent
import pykka
from gevent.pool import Group

log = logging.getLogger(__name__)


def watch(group: Group, ref: pykka.ActorRef, on_stopped: Callable[[], None]) -> gevent.Greenlet:
    """Call ``on_stopped()`` from a greenlet of ``group`` once ``ref`` has stopped.

    ``on_stopped`` runs outside any actor: it should only tell an actor, or
    spawn. Killing ``group`` ends the watch.
    """

    def wait() -> None:
        ref.actor_stopped.wait()
        on_stopped()

    greenlet = group.spawn(wait)
    greenlet.link_exception(lambda crashed: log.error("watching %s crashed: %r", ref, crashed.exception))
    return greenlet
