"""Log lines that an attacker or a broken client cannot turn into a flood.

A failed authentication is worth one line for an operator (the cause and the
remote address), but not ten thousand a second. ``ThrottledLog`` writes the
first line of each cause, then at most one per interval, saying how many
were left out in between.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

OTHER_CAUSES = "(other causes)"


class ThrottledLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        max_causes: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._logger = logger
        self._interval = interval
        self._max_causes = max_causes
        self._clock = clock
        # cause -> [time the next line may be written, lines left out since the last]
        self._causes: dict[str, list] = {}

    def warning(self, cause: str, message: str, *args, exc_info: BaseException | None = None) -> bool:
        """Log ``message % args`` unless ``cause`` was logged within the interval; True if logged.

        ``exc_info``: an exception whose traceback goes with the line (a bug worth reading).
        """
        now = self._clock()
        entry = self._causes.get(cause)
        if entry is None:
            if len(self._causes) >= self._max_causes:
                self._forget_quiet_causes(now)
            if len(self._causes) >= self._max_causes:
                # Causes are fixed texts, but a bound keeps a bug from growing this without end.
                cause = OTHER_CAUSES
            entry = self._causes.setdefault(cause, [now, 0])
        if now < entry[0]:
            entry[1] += 1
            return False
        left_out = entry[1]
        entry[0], entry[1] = now + self._interval, 0
        if left_out:
            message += " (and %d more like it in the last %d s)"
            args = (*args, left_out, round(self._interval))
        self._logger.warning(message, *args, exc_info=exc_info)
        return True

    def _forget_quiet_causes(self, now: float) -> None:
        for cause in [cause for cause, (next_line, left_out) in self._causes.items()
                      if next_line <= now and not left_out]:
            del self._causes[cause]
