"""Waiting out a database outage: work is delayed, not failed.

A claim or a chunk's commit that meets a dropped connection or a stopped server retries with a
capped, jittered backoff for as long as the message may stay unacknowledged (``wait_out``); past
that its message is handed back to the queue unacknowledged (the caller's choice), never failed.
The log says once that the database is unreachable and once that it is back, however many task
threads wait (a 60 s outage used to log 3,589 retry lines and fail 604 of 604 queued videos).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tubesum.db import is_transient_db_error
from tubesum.defaults import backoff_delay

log = logging.getLogger(__name__)

T = TypeVar("T")

# First pause and longest pause between tries while the database is unreachable, seconds
# (doubling, equal jitter: a worker's task threads do not retry in lock-step).
OUTAGE_RETRY_BASE_S = 0.5
OUTAGE_RETRY_MAX_S = 10.0
# Longest a task thread holds its message while waiting (RabbitMQ's default consumer timeout is
# 30 min; Redis' visibility timeout bounds it too: see max_wait_s), seconds.
OUTAGE_MAX_WAIT_S = 600.0


class DatabaseUnavailable(Exception):
    """The database stayed unreachable longer than this message may wait: hand it back."""


class OutageLog:
    """One line when the database becomes unreachable and one when it is back, per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0

    def down(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning("database unreachable (%s): work waits for it, retrying", first_line(exc))

    def up(self) -> None:
        if self._since is None:  # the usual case: no lock taken
            return
        with self._lock:
            if self._since is None:
                return
            lasted, failures, self._since, self._failures = time.monotonic() - self._since, self._failures, None, 0
        log.warning("database reachable again after %.1fs (%d tries waited)", lasted, failures)


OUTAGE = OutageLog()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def max_wait_s(visibility_timeout_s: float) -> float:
    """How long a task may hold its message waiting: under half of Redis' visibility timeout (past
    it the message would go to a second worker), at most OUTAGE_MAX_WAIT_S."""
    return min(OUTAGE_MAX_WAIT_S, visibility_timeout_s / 2)


def wait_out(
    call: Callable[[], T],
    *,
    limit_s: float,
    outage: OutageLog = OUTAGE,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, retried while it fails with a transient database error, for up to ``limit_s``
    seconds; then DatabaseUnavailable. Any other error propagates at once."""
    deadline = time.monotonic() + limit_s
    tries = 0
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            outage.down(exc)
            pause = backoff_delay(tries, base_s=OUTAGE_RETRY_BASE_S, max_s=OUTAGE_RETRY_MAX_S)
            if time.monotonic() + pause > deadline:
                raise DatabaseUnavailable(f"database unreachable for over {limit_s:.0f}s: {first_line(exc)}") from exc
            sleep(pause)
            tries += 1
            continue
        outage.up()
        return result
