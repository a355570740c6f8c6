"""What Flower shows of a task: its arguments as a user knows them, and a result that says what
happened. Plain functions over the database; no Celery and no torch.

Messages carry a video's database key only (``[17]``), which means nothing to a user. Every message
is therefore sent with ``argsrepr="job=3 video=dQw4w9WgXcQ"``: Flower shows that as the task's
arguments, and its search box (``args:"job=3 "``) filters one job. A task's return value becomes
the result Flower shows: a line such as ``summary 412 chars, batch 3f2a9c01, generate 3.21 s``.
A video that failed is not a SUCCESS with the word "failed": its task raises ``VideoFailed`` with
the reason, after recording it, and Flower shows a FAILURE.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tubesum.db import session_scope
from tubesum.models import Video
from tubesum.models.base import utcnow
from tubesum.read.queries import video_rows

# Characters of a batch id shown in a result (a uuid4 hex; 8 are unique within any real job).
BATCH_ID_SHOWN = 8


def video_label(job_id: int, video_id: str) -> str:
    """A task's shown arguments; ``job=N`` then a space, so that searching ``"job=3 "`` finds job 3 and not 31."""
    return f"job={job_id} video={video_id}"


@dataclass(frozen=True)
class VideoReport:
    """One video as its task's result needs it."""

    job_id: int
    video_id: str
    status: str
    error: str | None
    failed_at: datetime | None
    transcript_chars: int | None
    language_code: str | None
    summary_chars: int | None
    batch_id: str | None
    batch_size: int | None
    generate_s: float | None  # the wall time of the batched generation that made the summary

    @property
    def label(self) -> str:
        return video_label(self.job_id, self.video_id)

    def failed_since(self, moment: datetime) -> bool:
        """Failed by this delivery (or a concurrent one), as opposed to a redelivered message for a
        video that had failed before."""
        return self.status == "failed" and self.failed_at is not None and _naive(self.failed_at) >= _naive(moment)


def video_report(video_pk: int, *, database_url: str) -> VideoReport | None:
    """The video's export row (the same query as ``tubesum export``) and what a task's result needs besides."""
    with session_scope(database_url) as session:
        row = (
            session.execute(video_rows(Video.job_id, Video.failed_at).where(Video.id == video_pk))
            .mappings()
            .one_or_none()
        )
    if row is None:
        return None
    return VideoReport(
        job_id=row["job_id"],
        video_id=row["video_id"],
        status=row["status"],
        error=row["error"],
        failed_at=row["failed_at"],
        transcript_chars=row["transcript_chars"],
        language_code=row["language_code"],
        summary_chars=None if row["summary"] is None else len(row["summary"]),
        batch_id=row["batch_id"],
        batch_size=row["batch_size"],
        generate_s=row["batch_seconds"],
    )


def label_of(video_pk: int, *, database_url: str) -> str:
    report = video_report(video_pk, database_url=database_url)
    return video_label(report.job_id, report.video_id) if report else f"video pk={video_pk} (gone)"


def fetch_result(report: VideoReport | None, *, fetched: bool) -> str:
    """The fetch task's shown result."""
    if report is None:
        return "skipped: the video is no longer in the database"
    if not fetched:
        return f"skipped: already {report.status} (a redelivered message)"
    language = f" ({report.language_code})" if report.language_code else ""
    return f"fetched {report.transcript_chars or 0:,} chars{language}; sent to summarise"


def summarise_result(report: VideoReport | None, *, summarised: bool) -> str:
    """The summarise task's shown result."""
    if report is None:
        return "skipped: the video is no longer in the database"
    if not summarised or report.summary_chars is None:
        return f"skipped: already {report.status} (a redelivered message)"
    return summary_line(report.summary_chars, report.batch_id, report.batch_size, report.generate_s)


def summary_line(chars: int, batch_id: str | None, batch_size: int | None, generate_s: float | None) -> str:
    """The shown result of a summarised video: ``summary 412 chars, batch 3f2a9c01 of 32, generate 3.21 s``."""
    batch = (batch_id or "?")[:BATCH_ID_SHOWN]
    generate = f"{generate_s:.2f} s" if generate_s is not None else "?"
    return f"summary {chars:,} chars, batch {batch} of {batch_size}, generate {generate}"


def now() -> datetime:
    """The moment a task starts, on the clock the workers stamp ``failed_at`` with."""
    return utcnow()


def _naive(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every timestamp tubesum writes is UTC.
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
