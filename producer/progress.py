"""Watch a job's videos in the database until each one is done or failed (``submit --wait``, ``run``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import func, select

from tubesum.models import Video, VideoStatus
from tubesum.db import session_scope

# How often the database is polled for the job's counts, seconds.
DEFAULT_POLL_S = 1.0


@dataclass(frozen=True)
class JobCounts:
    by_status: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, status: str) -> int:
        return self.by_status.get(status, 0)

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def queued(self) -> int:  # waiting for, or being given, a transcript
        return self[VideoStatus.queued.value] + self[VideoStatus.fetching.value]

    @property
    def fetched(self) -> int:  # transcript stored, summary not yet
        return self[VideoStatus.fetched.value] + self[VideoStatus.summarising.value]

    @property
    def summarised(self) -> int:
        return self[VideoStatus.done.value]

    @property
    def failed(self) -> int:
        return self[VideoStatus.failed.value]

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.summarised + self.failed == self.total


# Units of a submit's phases: (divisor, unit) for the amount and rate shown.
PHASE_UNITS = {"reading": (1e6, "MB"), "sending": (1.0, "messages")}


@contextmanager
def submit_progress(console: Console | None = None) -> Iterator[Callable[[str, int, int | None], None]]:
    """Bars for a submit's two phases on stderr: reading the CSV (MB, MB/s, time left) and sending
    the messages (count, messages/s, time left). Drawn only on a terminal."""
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.fields[amount]}"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks: dict[str, tuple[TaskID, float]] = {}

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = (bar.add_task(phase, total=total, amount="", rate=""), time.monotonic())
            task, started = tasks[phase]
            scale, unit = PHASE_UNITS.get(phase, (1.0, ""))
            elapsed = max(time.monotonic() - started, 1e-6)
            amount = f"{done / scale:,.0f}/{(total or 0) / scale:,.0f} {unit}"
            bar.update(task, completed=done, total=total, amount=amount, rate=f"{done / scale / elapsed:,.0f} {unit}/s")

        yield report


def job_counts(job_id: int, *, database_url: str | None = None) -> JobCounts:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Video.status, func.count()).where(Video.job_id == job_id).group_by(Video.status)
        ).all()
    return JobCounts({status: n for status, n in rows})


def wait_for_job(
    job_id: int,
    *,
    database_url: str | None = None,
    poll_s: float = DEFAULT_POLL_S,
    timeout_s: float | None = None,
    show: bool = True,
    console: Console | None = None,
) -> JobCounts:
    """Poll until every video of the job is done or failed (or ``timeout_s`` passes); returns the counts.
    With ``show``, draws a live bar: queued / fetched / summarised / failed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (TextColumn("job {task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("job", total=None, job=job_id, detail="")
        while True:
            counts = job_counts(job_id, database_url=database_url)
            detail = (f"queued {counts.queued} · fetched {counts.fetched} · "
                      f"summarised {counts.summarised} · failed {counts.failed}")
            bar.update(task, total=counts.total or None, completed=counts.summarised + counts.failed,
                       detail=detail)
            if counts.finished or (deadline is not None and time.monotonic() >= deadline):
                return counts
            time.sleep(poll_s)
