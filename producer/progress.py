"""Watch a job's videos in the database until each one is done or failed (``submit --wait``, ``run``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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
