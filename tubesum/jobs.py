"""Reading a job back: its status (counts and failures) and its export (one row per video).

Plain query functions over a ``Session``; every value reaches SQL as a bound parameter.
``tubesum status`` and ``tubesum export`` are thin wrappers around them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tubesum.models import Batch, Job, Summary, Transcript, Video
from tubesum.producer.progress import JobCounts
from tubesum.errors import BadInput, UnknownJob

# One row per video, in this column order (CSV header, JSON keys). Columns after "transcript_chars"
# come from the summaries and batches tables and are empty for a video not summarised (yet).
EXPORT_COLUMNS: tuple[str, ...] = (
    "position", "video_id", "title", "status", "error", "language", "language_code",
    "transcript_chars", "summary", "finish_reason", "model", "batch_id", "batch_size",
    "prompt_tokens", "generated_tokens", "batch_seconds", "generated_tokens_per_s",
    "queue_wait_s", "latency_s", "worker_host",
)  # fmt: skip
EXPORT_FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class FailedVideo:
    video_id: str
    title: str | None
    error: str | None


@dataclass(frozen=True)
class LeaseHolder:
    """A worker holding some of a job's videos (fetching or summarising) under its lease."""

    worker: str  # Celery node name, e.g. gpu@host-a
    videos: int
    since: datetime | None  # earliest claim of those it holds
    until: datetime | None  # latest lease expiry (renewed by its heartbeat)


@dataclass(frozen=True)
class JobStatus:
    job_id: int
    created_at: datetime
    sources: list
    model: str | None
    counts: JobCounts
    failures: list[FailedVideo]
    holders: list[LeaseHolder] = field(default_factory=list)
    expired_leases: int = 0  # times a lease ran out and its video went back to the queue


def latest_job_id(session: Session) -> int:
    job_id = session.scalar(select(func.max(Job.id)))
    if job_id is None:
        raise UnknownJob("there is no job in the database yet: submit one with `tubesum submit` or `tubesum run`")
    return job_id


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise UnknownJob(f"there is no job {job_id}")
    return job


def job_status(session: Session, job_id: int | None = None) -> JobStatus:
    """Counts by video status and every failed video with its reason (latest job when ``job_id`` is None)."""
    job = get_job(session, latest_job_id(session) if job_id is None else job_id)
    counts = session.execute(
        select(Video.status, func.count()).where(Video.job_id == job.id).group_by(Video.status)
    ).all()
    failed = session.execute(
        select(Video.video_id, Video.title, Video.error)
        .where(Video.job_id == job.id, Video.status == "failed")
        .order_by(Video.position, Video.id)
    ).all()
    return JobStatus(
        job_id=job.id,
        created_at=job.created_at,
        sources=list(job.sources or []),
        model=job.model,
        counts=JobCounts({status: n for status, n in counts}),
        failures=[FailedVideo(*row) for row in failed],
        holders=lease_holders(session, job.id),
        expired_leases=session.scalar(select(func.coalesce(func.sum(Video.lease_expiries), 0))
                                      .where(Video.job_id == job.id)) or 0,
    )


def lease_holders(session: Session, job_id: int) -> list[LeaseHolder]:
    """Per worker: how many of the job's videos it holds, since when, and until when."""
    rows = session.execute(
        select(Video.lease_owner, func.count(), func.min(Video.leased_at), func.max(Video.lease_expires_at))
        .where(Video.job_id == job_id, Video.lease_owner.is_not(None),
               Video.status.in_(("fetching", "summarising")))
        .group_by(Video.lease_owner).order_by(Video.lease_owner)
    ).all()
    return [LeaseHolder(*row) for row in rows]


def all_job_statuses(session: Session, *, limit: int = 20) -> list[tuple[int, datetime, JobCounts]]:
    """The ``limit`` most recent jobs with their counts, newest first."""
    jobs = session.execute(select(Job.id, Job.created_at).order_by(Job.id.desc()).limit(limit)).all()
    ids = [job_id for job_id, _ in jobs]
    by_job: dict[int, dict[str, int]] = {job_id: {} for job_id in ids}
    rows = session.execute(
        select(Video.job_id, Video.status, func.count())
        .where(Video.job_id.in_(ids))
        .group_by(Video.job_id, Video.status)
    ).all()
    for job_id, status, n in rows:
        by_job[job_id][status] = n
    return [(job_id, created, JobCounts(by_job[job_id])) for job_id, created in jobs]


def export_rows(session: Session, job_id: int) -> list[dict[str, object]]:
    """One dict per video of the job, keys ``EXPORT_COLUMNS``, in submission order."""
    get_job(session, job_id)
    query = (
        select(
            Video.position, Video.video_id, Video.title, Video.status, Video.error,
            Transcript.language, Transcript.language_code,
            func.length(Transcript.text).label("transcript_chars"),
            Summary.text.label("summary"), Summary.finish_reason, Summary.model, Summary.batch_id,
            Batch.batch_size, Summary.prompt_tokens, Summary.generated_tokens,
            Batch.wall_s.label("batch_seconds"), Batch.generated_tokens_per_s,
            Summary.queue_wait_s, Summary.latency_s, Batch.worker_host,
        )  # fmt: skip
        .outerjoin(Transcript, Transcript.video_pk == Video.id)
        .outerjoin(Summary, Summary.video_pk == Video.id)
        .outerjoin(Batch, Batch.id == Summary.batch_id)
        .where(Video.job_id == job_id)
        .order_by(Video.position, Video.id)
    )
    return [dict(zip(EXPORT_COLUMNS, row, strict=True)) for row in session.execute(query).all()]


def export_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise BadInput(f"cannot export to {path.name!r}: the file name must end in .csv or .jsonl")
    return suffix


def write_export(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Write rows as CSV (empty cell for a missing value) or JSON Lines (null), chosen by suffix."""
    fmt = export_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as out:
        if fmt == ".csv":
            writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        else:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def export_job(session: Session, job_id: int, path: Path) -> int:
    """Export the job to ``path`` (.csv or .jsonl); returns the number of rows written."""
    export_format(path)  # fail before querying
    rows = export_rows(session, job_id)
    write_export(rows, path)
    return len(rows)


# --- rendering (rich tables for `tubesum status`) ---------------------------------------------
STATUS_ORDER = ("queued", "fetching", "fetched", "summarising", "done", "failed")


def status_tables(status: JobStatus) -> list[Table]:
    """The counts table, then (if any) the failed videos with their reasons."""
    counts = Table(title=f"job {status.job_id}",
                   caption=f"created {status.created_at:%Y-%m-%d %H:%M} · model {status.model or '?'}")
    counts.add_column("status")
    counts.add_column("videos", justify="right")
    by_status = status.counts.by_status
    for name in (*STATUS_ORDER, *sorted(set(by_status) - set(STATUS_ORDER))):
        counts.add_row(name, str(by_status.get(name, 0)))
    counts.add_row("total", str(status.counts.total), style="bold")
    tables = [counts]
    if status.holders or status.expired_leases:
        tables.append(leases_table(status))
    if status.failures:
        failed = Table(title=f"{len(status.failures)} failed")
        failed.add_column("video_id")
        failed.add_column("title")
        failed.add_column("reason", overflow="fold")
        for f in status.failures:
            failed.add_row(f.video_id, f.title or "", f.error or "")
        tables.append(failed)
    return tables


def leases_table(status: JobStatus) -> Table:
    """Who holds the job's videos now, and how often a lease ran out (its worker died)."""
    table = Table(title="held by workers",
                  caption=f"{status.expired_leases} returned to the queue after a lease ran out")
    for column in ("worker", "videos", "since (UTC)", "lease until (UTC)"):
        table.add_column(column, justify="right" if column == "videos" else "left")
    for h in status.holders:
        table.add_row(h.worker, str(h.videos), _clock(h.since), _clock(h.until))
    return table


def _clock(value: datetime | None) -> str:
    return f"{value.astimezone(timezone.utc):%H:%M:%S}" if value else ""


def all_jobs_table(jobs: Sequence[tuple[int, datetime, JobCounts]]) -> Table:
    table = Table(title="recent jobs")
    for column in ("job", "created", *STATUS_ORDER, "total"):
        table.add_column(column, justify="left" if column == "created" else "right", no_wrap=True)
    for job_id, created, counts in jobs:
        table.add_row(str(job_id), f"{created:%Y-%m-%d %H:%M}",
                      *(str(counts[name]) for name in STATUS_ORDER), str(counts.total))
    return table
