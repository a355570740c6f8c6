"""The read side's queries: a job's counts, status, export rows, batches and latencies, and one
video as its task's result shows it. Plain functions over a ``Session`` (every value a bound
parameter); rendering lives beside them (status.py, progress.py, report.py, export.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from tubesum.db import session_scope
from tubesum.errors import UnknownJob
from tubesum.models import Batch, Job, Summary, Transcript, Video, VideoStatus
from tubesum.models.tables import MAP_REDUCE_NOTE


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


class NoJobs(UnknownJob):
    """The database has no job at all yet."""


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
    model: str | None  # what the submitter asked for
    models_ran: list[str]  # what the GPU workers actually ran (their batch rows), oldest first
    counts: JobCounts
    failures: list[FailedVideo]
    holders: list[LeaseHolder] = field(default_factory=list)
    expired_leases: int = 0  # times a lease ran out and its video went back to the queue
    long_videos: list[FailedVideo] = field(default_factory=list)  # in a long map-reduce (error: its note)

    @property
    def model_shown(self) -> str:
        """The model(s) that summarised the job; the requested one only while none has."""
        if self.models_ran:
            return ", ".join(self.models_ran)
        return f"{self.model or '?'} (requested; nothing summarised yet)"


def models_ran(session: Session, job_ids: Sequence[int]) -> dict[int, list[str]]:
    """For each job, the models of the batches that produced its summaries, in order of first use."""
    rows = session.execute(
        select(Video.job_id, Batch.model, func.min(Batch.started_at))
        .join(Summary, Summary.video_pk == Video.id)
        .join(Batch, Batch.id == Summary.batch_id)
        .where(Video.job_id.in_(list(job_ids)))
        .group_by(Video.job_id, Batch.model)
        .order_by(Video.job_id, func.min(Batch.started_at))
    ).all()
    out: dict[int, list[str]] = {job_id: [] for job_id in job_ids}
    for job_id, model, _first in rows:
        out[job_id].append(model)
    return out


def latest_job_id(session: Session) -> int:
    job_id = session.scalar(select(func.max(Job.id)))
    if job_id is None:
        raise NoJobs("no jobs yet: submit one with `tubesum submit` or `tubesum run`")
    return job_id


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise UnknownJob(f"there is no job {job_id}")
    return job


def job_status(session: Session, job_id: int | None = None) -> JobStatus:
    """Counts by video status and every failed video with its reason (latest job when ``job_id`` is None)."""
    job = get_job(session, latest_job_id(session) if job_id is None else job_id)
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
        models_ran=models_ran(session, [job.id])[job.id],
        counts=counts_of(session, job.id),
        failures=[FailedVideo(*row) for row in failed],
        holders=lease_holders(session, job.id),
        long_videos=in_map_reduce(session, job.id),
        expired_leases=session.scalar(
            select(func.coalesce(func.sum(Video.lease_expiries), 0)).where(Video.job_id == job.id)
        )
        or 0,
    )


def in_map_reduce(session: Session, job_id: int) -> list[FailedVideo]:
    """The job's videos a GPU worker is summarising in map-reduce steps, with where each stands."""
    rows = session.execute(
        select(Video.video_id, Video.title, Video.error)
        .where(
            Video.job_id == job_id,
            Video.status == VideoStatus.summarising.value,
            Video.error.startswith(MAP_REDUCE_NOTE, autoescape=True),
        )
        .order_by(Video.position)
    ).all()
    return [FailedVideo(vid, title, (error or "")[len(MAP_REDUCE_NOTE) :]) for vid, title, error in rows]


def lease_holders(session: Session, job_id: int) -> list[LeaseHolder]:
    """Per worker: how many of the job's videos it holds, since when, and until when."""
    rows = session.execute(
        select(Video.lease_owner, func.count(), func.min(Video.leased_at), func.max(Video.lease_expires_at))
        .where(Video.job_id == job_id, Video.lease_owner.is_not(None), Video.status.in_(("fetching", "summarising")))
        .group_by(Video.lease_owner)
        .order_by(Video.lease_owner)
    ).all()
    return [LeaseHolder(*row) for row in rows]


@dataclass(frozen=True)
class JobLine:
    """One job of ``tubesum status --all``."""

    job_id: int
    created_at: datetime
    model: str  # what ran (several joined by ", "), else the requested model with a "?"
    counts: JobCounts


def all_job_statuses(session: Session, *, limit: int = 20) -> list[JobLine]:
    """The ``limit`` most recent jobs with their counts, newest first."""
    jobs = session.execute(select(Job.id, Job.created_at, Job.model).order_by(Job.id.desc()).limit(limit)).all()
    ids = [job_id for job_id, _, _ in jobs]
    by_job: dict[int, dict[str, int]] = {job_id: {} for job_id in ids}
    rows = session.execute(
        select(Video.job_id, Video.status, func.count())
        .where(Video.job_id.in_(ids))
        .group_by(Video.job_id, Video.status)
    ).all()
    for job_id, status, n in rows:
        by_job[job_id][status] = n
    ran = models_ran(session, ids)
    return [
        JobLine(job_id, created, ", ".join(ran[job_id]) or f"{requested or ''}?", JobCounts(by_job[job_id]))
        for job_id, created, requested in jobs
    ]


# One row per video, in this order (CSV header, JSON keys): each entry's name is its column's
# name. Columns after "transcript_chars" come from the summaries and batches tables and are empty
# for a video not summarised (yet).
EXPORT_SELECT = (
    Video.position,
    Video.video_id,
    Video.title,
    Video.status,
    Video.error,
    Transcript.language,
    Transcript.language_code,
    func.length(Transcript.text).label("transcript_chars"),
    Summary.text.label("summary"),
    Summary.finish_reason,
    Summary.model,
    Summary.batch_id,
    Batch.batch_size,
    Summary.prompt_tokens,
    Summary.generated_tokens,
    Batch.wall_s.label("batch_seconds"),
    Batch.generated_tokens_per_s,
    Summary.queue_wait_s,
    Summary.latency_s,
    Batch.worker_host,
)
EXPORT_COLUMNS: tuple[str, ...] = tuple(column.key for column in EXPORT_SELECT)


def video_rows(*extra: object) -> Select:
    """Each video with its transcript, summary and batch (columns EXPORT_SELECT, then ``extra``);
    the caller adds the WHERE. The export and a task's shown result both read through it."""
    return (
        select(*EXPORT_SELECT, *extra)  # type: ignore[call-overload]
        .outerjoin(Transcript, Transcript.video_pk == Video.id)
        .outerjoin(Summary, Summary.video_pk == Video.id)
        .outerjoin(Batch, Batch.id == Summary.batch_id)
    )


def export_rows(session: Session, job_id: int) -> list[dict[str, object]]:
    """One dict per video of the job, keys ``EXPORT_COLUMNS``, in submission order."""
    get_job(session, job_id)
    query = video_rows().where(Video.job_id == job_id).order_by(Video.position, Video.id)
    return [dict(row) for row in session.execute(query).mappings()]


def counts_of(session: Session, job_id: int) -> JobCounts:
    rows = session.execute(
        select(Video.status, func.count()).where(Video.job_id == job_id).group_by(Video.status)
    ).all()
    return JobCounts({status: n for status, n in rows})


def job_counts(job_id: int, *, database_url: str | None = None) -> JobCounts:
    """``counts_of`` in a session of its own (the progress bar polls it)."""
    with session_scope(database_url) as session:
        return counts_of(session, job_id)


def latest_problem(job_id: int, *, database_url: str | None = None) -> str | None:
    """The newest reason recorded on a video of the job that is still being worked on (a fetch
    being retried), so the progress line names the cause at the first failure."""
    with session_scope(database_url) as session:
        return session.scalar(
            select(Video.error)
            .where(
                Video.job_id == job_id,
                Video.error.is_not(None),
                Video.status.in_((VideoStatus.queued.value, VideoStatus.fetching.value)),
            )
            .order_by(Video.updated_at.desc())
            .limit(1)
        )


# --- the GPU worker's batches (``tubesum report``) -------------------------------------------------
# batches.csv's columns: every column of the batches table, in its order, and how many of the
# job's videos each batch finished.
BATCH_COLUMNS: tuple[str, ...] = (*(c.key for c in Batch.__table__.columns), "videos_finished")


def job_batches(session: Session, job_id: int) -> list[dict[str, object]]:
    """The job's batch rows, oldest first, keys BATCH_COLUMNS.

    Which batches belong to a job: those its summaries point at, plus every other batch the same
    workers ran inside that window (out-of-memory attempts and the map steps of long transcripts,
    which no summary points at). With several jobs summarised at the same time on the same workers
    the window also holds the other jobs' batches."""
    job = get_job(session, job_id)
    finished = dict(
        session.execute(
            select(Summary.batch_id, func.count())
            .join(Video, Video.id == Summary.video_pk)
            .where(Video.job_id == job_id, Summary.batch_id.is_not(None))
            .group_by(Summary.batch_id)
        ).all()
    )
    if not finished:
        return []
    linked = session.scalars(select(Batch).where(Batch.id.in_(finished))).all()
    hosts = {b.worker_host for b in linked}
    last_end = max(b.ended_at for b in linked)
    batches = session.scalars(
        select(Batch)
        .where(Batch.worker_host.in_(hosts), Batch.started_at >= job.created_at, Batch.ended_at <= last_end)
        .order_by(Batch.started_at, Batch.id)
    ).all()
    rows = []
    for b in {b.id: b for b in [*batches, *linked]}.values():
        row = {column: getattr(b, column, None) for column in BATCH_COLUMNS}
        row["videos_finished"] = finished.get(b.id, 0)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["started_at"], r["id"]))


def job_latencies(session: Session, job_id: int) -> list[float]:
    return [
        s
        for (s,) in session.execute(
            select(Summary.latency_s)
            .join(Video, Video.id == Summary.video_pk)
            .where(Video.job_id == job_id, Summary.latency_s.is_not(None))
            .order_by(Summary.latency_s)
        )
    ]
