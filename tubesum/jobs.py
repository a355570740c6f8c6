"""Reading a job back: its status (counts and failures) and its export (one row per video).

Plain query functions over a ``Session``; every value reaches SQL as a bound parameter.
``tubesum status`` and ``tubesum export`` are thin wrappers around them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from defusedcsv import csv as defused_csv
from rich import box
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tubesum.display import plain
from tubesum.errors import BadInput, UnknownJob
from tubesum.models import Batch, Job, Summary, Transcript, Video
from tubesum.producer.progress import JobCounts

# One row per video, in this column order (CSV header, JSON keys). Columns after "transcript_chars"
# come from the summaries and batches tables and are empty for a video not summarised (yet).
EXPORT_COLUMNS: tuple[str, ...] = (
    "position",
    "video_id",
    "title",
    "status",
    "error",
    "language",
    "language_code",
    "transcript_chars",
    "summary",
    "finish_reason",
    "truncated",
    "model",
    "batch_id",
    "batch_size",
    "prompt_tokens",
    "generated_tokens",
    "batch_seconds",
    "generated_tokens_per_s",
    "queue_wait_s",
    "latency_s",
    "worker_host",
)
EXPORT_FORMATS = (".csv", ".jsonl")
# Leading characters spreadsheets may read as the start of a formula besides those defusedcsv
# handles (= + - @ | %): OWASP's CSV-injection list adds tab and carriage return.
FORMULA_WHITESPACE = ("\t", "\r")


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
    truncated: int = 0  # summaries stopped by the token limit and cut back to a complete sentence

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
        models_ran=models_ran(session, [job.id])[job.id],
        counts=JobCounts({status: n for status, n in counts}),
        failures=[FailedVideo(*row) for row in failed],
        holders=lease_holders(session, job.id),
        expired_leases=session.scalar(
            select(func.coalesce(func.sum(Video.lease_expiries), 0)).where(Video.job_id == job.id)
        )
        or 0,
        truncated=session.scalar(
            select(func.count())
            .select_from(Summary)
            .join(Video, Video.id == Summary.video_pk)
            .where(Video.job_id == job.id, Summary.truncated.is_(True))
        )
        or 0,
    )


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


def export_rows(session: Session, job_id: int) -> list[dict[str, object]]:
    """One dict per video of the job, keys ``EXPORT_COLUMNS``, in submission order."""
    get_job(session, job_id)
    query = (
        select(
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
            Summary.truncated,
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
        .outerjoin(Transcript, Transcript.video_pk == Video.id)
        .outerjoin(Summary, Summary.video_pk == Video.id)
        .outerjoin(Batch, Batch.id == Summary.batch_id)
        .where(Video.job_id == job_id)
        .order_by(Video.position, Video.id)
    )
    return [dict(zip(EXPORT_COLUMNS, row, strict=True)) for row in session.execute(query).all()]


def transcript_texts(session: Session, job_id: int) -> dict[str, str]:
    """Each video's stored transcript, by video id (`tubesum eval`'s copy rate reads them)."""
    get_job(session, job_id)
    rows = session.execute(
        select(Video.video_id, Transcript.text)
        .join(Transcript, Transcript.video_pk == Video.id)
        .where(Video.job_id == job_id)
    ).all()
    return {video_id: text for video_id, text in rows}


def export_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise BadInput(
            f"cannot export to {str(path)!r}: the file name must end in .csv or .jsonl (or give a directory)"
        )
    return suffix


def csv_cell(value: object) -> object:
    """A value as a CSV cell: empty for None; a text starting with tab or CR gets the quote prefix
    defusedcsv gives to ``=``/``+``/``-``/``@``/``|``/``%`` (so a spreadsheet shows it as text)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_WHITESPACE):
        return "'" + value
    return value


def default_export_name(job_id: int) -> str:
    return f"tubesum-job-{job_id}.csv"


def export_path(output: str | Path, job_id: int) -> Path:
    """The file ``-o output`` means: a directory (existing, or written with a trailing slash)
    gets the default name ``tubesum-job-<id>.csv`` inside it."""
    path = Path(output)
    if path.is_dir() or str(output).endswith(("/", os.sep)):
        return path / default_export_name(job_id)
    return path


def check_writable(path: Path, *, what: str = "file") -> None:
    """Raise BadInput unless ``path`` (a file, or with ``what="directory"`` a directory) can be
    written, creating nothing: checked before any work, so a job never runs for nothing."""
    if what == "file" and path.is_dir():
        raise BadInput(f"cannot write {str(path)!r}: it is a directory")
    if what == "directory" and path.exists() and not path.is_dir():
        raise BadInput(f"cannot write into {str(path)!r}: it is a file, not a directory")
    if path.exists() and what == "file" and not os.access(path, os.W_OK):
        raise BadInput(f"cannot write {str(path)!r}: permission denied")
    # The nearest existing folder must let us create the rest (the file, missing parents). Probed
    # with a nameless temporary file: permission bits say nothing for root or a read-only mount.
    folder = path if what == "directory" and path.exists() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"cannot write {str(path)!r}: {str(folder)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BadInput(f"cannot write {str(path)!r}: {exc.strerror or exc} in {str(folder)!r}") from None


def check_export_path(output: str | Path, job_id: int = 0) -> Path:
    """``export_path`` checked for format and writability before any work."""
    path = export_path(output, job_id)
    export_format(path)
    check_writable(path)
    return path


def write_export(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Write rows as CSV (empty cell for a missing value) or JSON Lines (null), chosen by suffix.

    Titles and summaries are untrusted (YouTube, the model): in CSV a cell that a spreadsheet would
    run as a formula (``=HYPERLINK(...)``, ``+cmd|...``, ``@SUM(...)``) is prefixed with ``'``
    (defusedcsv); numbers such as ``-1.5`` stay numbers. JSON Lines keeps every value exact."""
    fmt = export_format(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot write {str(path)!r}: {exc.strerror}") from None
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as out:
            if fmt == ".csv":
                writer = defused_csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
                writer.writeheader()
                writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
            else:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)  # a reader never sees half a file
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # no partial file left behind
        raise BadInput(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_job(session: Session, job_id: int, path: Path) -> int:
    """Export the job to ``path`` (.csv or .jsonl); returns the number of rows written."""
    export_format(path)  # fail before querying
    rows = export_rows(session, job_id)
    write_export(rows, path)
    return len(rows)


# --- rendering (rich tables for `tubesum status`) ---------------------------------------------
STATUS_ORDER = ("queued", "fetching", "fetched", "summarising", "done", "failed")


def status_tables(status: JobStatus) -> list[Table | Text]:
    """The counts table, a line with its date and model, then (if any) the failed videos."""
    counts = Table(title=plain(f"job {status.job_id}"))
    counts.add_column("status")
    counts.add_column("videos", justify="right")
    by_status = status.counts.by_status
    for name in (*STATUS_ORDER, *sorted(set(by_status) - set(STATUS_ORDER))):
        counts.add_row(name, str(by_status.get(name, 0)))
    counts.add_row("total", str(status.counts.total), style="bold")
    if status.truncated:  # of the done ones: the token limit stopped them (last full sentence kept)
        counts.add_row("truncated", str(status.truncated), style="dim")
    facts = plain(f"created {status.created_at:%Y-%m-%d %H:%M} · model {status.model_shown}")
    tables: list[Table | Text] = [counts, facts]
    if status.holders or status.expired_leases:
        tables.append(leases_table(status))
    if status.failures:
        failed = Table(title=f"{len(status.failures)} failed")
        failed.add_column("video_id", overflow="fold")
        failed.add_column("title", overflow="fold")
        failed.add_column("reason", overflow="fold")
        for f in status.failures:  # ids, titles and reasons come from outside: plain text only
            failed.add_row(plain(f.video_id), plain(f.title), plain(f.error))
        tables.append(failed)
    return tables


def leases_table(status: JobStatus) -> Table:
    """Who holds the job's videos now, and how often a lease ran out (its worker died)."""
    table = Table(
        title="held by workers", caption=f"{status.expired_leases} returned to the queue after a lease ran out"
    )
    for column in ("worker", "videos", "since (UTC)", "lease until (UTC)"):
        table.add_column(column, justify="right" if column == "videos" else "left")
    for h in status.holders:
        table.add_row(h.worker, str(h.videos), _clock(h.since), _clock(h.until))
    return table


def _clock(value: datetime | None) -> str:
    return f"{value.astimezone(UTC):%H:%M:%S}" if value else ""


# `status --all` columns: the progress bar's four groups (queued = queued + fetching, fetched =
# fetched + summarising) so a line fits 80 columns beside the model.
ALL_JOBS_COUNTS = ("queued", "fetched", "done", "failed", "total")


# The narrowest model column before the table gives up fitting the terminal, characters.
MIN_MODEL_WIDTH = 12


def all_jobs_table(jobs: Sequence[JobLine], *, width: int = 80) -> Table:
    """One line per job in ``width`` columns: the counts keep their width, the model is cut."""
    table = Table(
        title="recent jobs",
        caption="queued includes fetching; fetched includes summarising",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("job", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for column in ALL_JOBS_COUNTS:
        table.add_column(column, justify="right", no_wrap=True)
    cells = [
        [str(line.job_id), f"{line.created_at:%m-%d %H:%M}", *map(str, _count_cells(line.counts))] for line in jobs
    ]
    headers = ["job", "created", *ALL_JOBS_COUNTS]
    fixed = sum(max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers))
    separators = 3 * len(headers)  # " │ " between columns (padding 1 + rule + padding 1)
    table.add_column(
        "model", overflow="ellipsis", no_wrap=True, max_width=max(MIN_MODEL_WIDTH, width - fixed - separators)
    )
    for row, line in zip(cells, jobs, strict=True):
        table.add_row(*row, plain(line.model))
    return table


def _count_cells(c: JobCounts) -> tuple[int, ...]:
    return (c.queued, c.fetched, c.summarised, c.failed, c.total)
