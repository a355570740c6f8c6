"""Waiting out a database outage: work is delayed, not failed.

A claim or a chunk's commit that meets a dropped connection or a stopped server retries with a
capped, jittered backoff for as long as the message may stay unacknowledged (``wait_out``); past
that its message is handed back to the queue unacknowledged (the caller's choice), never failed.
The log says once that the database is unreachable and once that it is back, however many task
threads (or prefork children: a fetch worker's) wait (a 60 s outage used to log 3,589 retry lines
and fail 604 of 604 queued videos).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
# Longest wait for the outage state's lock, seconds: a prefork child killed while holding it must
# not stop the others (past it they go on without the lock; at worst a second line).
SHARED_LOCK_TIMEOUT_S = 1.0


class DatabaseUnavailable(Exception):
    """The database stayed unreachable longer than this message may wait: hand it back."""


class OutageLog:
    """One line when the database becomes unreachable and one when it is back, per worker: the
    state is in shared memory made at import, before a prefork worker forks its children, so they
    and the main process (its reconcile pass) log one outage once."""

    def __init__(self) -> None:
        self._lock = multiprocessing.Lock()
        self._since = multiprocessing.RawValue("d", 0.0)  # time.monotonic() it went down; 0.0: up
        self._failures = multiprocessing.RawValue("q", 0)

    @contextmanager
    def _held(self) -> Iterator[None]:
        got = self._lock.acquire(timeout=SHARED_LOCK_TIMEOUT_S)
        try:
            yield
        finally:
            if got:
                self._lock.release()

    def down(self, exc: BaseException) -> None:
        with self._held():
            self._failures.value += 1
            if self._since.value:
                return
            self._since.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        log.warning("database unreachable (%s): work waits for it, retrying", first_line(exc))

    def up(self) -> None:
        if not self._since.value:  # the usual case: no lock taken
            return
        with self._held():
            if not self._since.value:
                return
            lasted, failures = time.monotonic() - self._since.value, self._failures.value
            self._since.value, self._failures.value = 0.0, 0
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
