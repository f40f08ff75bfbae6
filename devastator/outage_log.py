"""One log line when something the server depends on starts failing, one when it is back, with counts.

A Redis that is down for a minute fails thousands of calls; an operator needs
to know when it started and why, when it ended, and how much failed meanwhile,
not a traceback per call. ``OutageLog`` writes the first failure (as an
error), counts the rest by kind, and writes one line when a call succeeds
again, with the outage's length and those counts.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable


class OutageLog:
    def __init__(self, logger: logging.Logger, what: str, *, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._what = what  # completes "<what> is failing": "the message store", "the cluster's Redis"
        self._clock = clock
        self._since: float | None = None
        self._failed: Counter = Counter()
        self.first_error: BaseException | None = None

    @property
    def down(self) -> bool:
        return self._since is not None

    def seconds(self) -> float:
        """How long the outage has lasted (0 when there is none)."""
        return 0.0 if self._since is None else self._clock() - self._since

    def failed(self, error: BaseException, **counts: int) -> None:
        """Calls failed (``counts`` by kind, e.g. commits=1, requests=20): the first starts the outage."""
        self._failed.update(counts)
        if self._since is None:
            self._since = self._clock()
            self.first_error = error
            self._logger.error("%s is failing: %s", self._what, error)

    def answered(self) -> None:
        """A call succeeded: an outage, if there was one, is over."""
        if self._since is None:
            return
        failed = ", ".join(f"{kind} {count}" for kind, count in sorted(self._failed.items())) or "nothing"
        self._logger.warning("%s is answering again after %.1f s; failed meanwhile: %s", self._what,
                             self.seconds(), failed)
        self._since = None
        self._failed.clear()
        self.first_error = None
