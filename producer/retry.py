"""``tubesum retry JOB [--failed-reason TEXT]``: send a job's failed videos through again, on purpose.

A video with a stored transcript goes back to the summarise queue, one without to the transcripts
queue -- unless its transcript was to come from a CSV (an empty cell in it, or a job made only of a
CSV): a video keeps its source, and such a video is never sent to YouTube; it is named as not
retried (submit a corrected CSV). Its counters start again from zero (attempts, summarise attempts, expired leases), so a
video failed by an outage gets the whole budget again. This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import exists, func, select

from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK
from tubesum.db import session_scope
from tubesum.models import Transcript, Video, VideoStatus
from tubesum.producer.submit import CSV_SOURCE_PREFIX, EMPTY_CSV_TRANSCRIPT
from tubesum.read.queries import get_job
from tubesum.settings import Settings
from tubesum.workers.video_state import clear_lease


@dataclass
class RetryReport:
    job_id: int
    to_fetch: list[int] = field(default_factory=list)  # video pks sent to the transcripts queue
    to_summarise: list[int] = field(default_factory=list)  # video pks sent to the summarise queue
    from_csv: list[str] = field(default_factory=list)  # video ids left failed: their transcript is the CSV's
    failed: int = 0  # failed videos of the job, matching or not
    failed_reason: str | None = None

    @property
    def count(self) -> int:
        return len(self.to_fetch) + len(self.to_summarise)

    def summary(self) -> str:
        if not self.failed:
            return f"job {self.job_id}: no failed videos to retry"
        if not self.count and not self.from_csv:
            return (
                f"job {self.job_id}: none of its {self.failed} failed videos has a reason containing "
                f"{self.failed_reason!r} (`tubesum status {self.job_id}` lists the reasons)"
            )
        line = (
            f"job {self.job_id}: re-queued {self.count} failed videos ({len(self.to_fetch)} to fetch, "
            f"{len(self.to_summarise)} to summarise)"
        )
        if self.from_csv:
            shown = ", ".join(self.from_csv[:CSV_IDS_SHOWN]) + (" ..." if len(self.from_csv) > CSV_IDS_SHOWN else "")
            line += (
                f"; {len(self.from_csv)} not retried, their transcript comes from the CSV, not YouTube "
                f"({shown}): submit a CSV with their transcripts"
            )
        return line


# Video ids named in the "not retried" part of the summary, at most.
CSV_IDS_SHOWN = 5


def reset_failed(video: Video, *, has_transcript: bool) -> None:
    """failed → fetched (transcript stored) or queued, with no error, no lease and fresh counters."""
    video.status = VideoStatus.fetched.value if has_transcript else VideoStatus.queued.value
    video.error = video.failed_at = None
    video.attempts = video.summarise_attempts = video.lease_expiries = 0
    clear_lease(video)


def retry_failed(
    job_id: int, *, settings: Settings, celery_app: Celery, failed_reason: str | None = None
) -> RetryReport:
    """Re-queue the failed videos of ``job_id`` (only those whose reason contains ``failed_reason``,
    case-insensitive, when given): commit, then send their messages. Raises UnknownJob."""
    report = RetryReport(job_id, failed_reason=failed_reason)
    with session_scope(settings.database_url) as session:
        job = get_job(session, job_id)
        csv_only = bool(job.sources) and all(str(s).startswith(CSV_SOURCE_PREFIX) for s in job.sources)
        report.failed = session.scalar(
            select(func.count()).where(Video.job_id == job_id, Video.status == VideoStatus.failed.value)
        )
        has_transcript = exists().where(Transcript.video_pk == Video.id)
        query = (
            select(Video, has_transcript)
            .where(Video.job_id == job_id, Video.status == VideoStatus.failed.value)
            .order_by(Video.position, Video.id)
            .with_for_update(of=Video)
        )
        if failed_reason:
            query = query.where(Video.error.icontains(failed_reason, autoescape=True))
        for video, transcript in session.execute(query).all():
            if not transcript and (csv_only or video.error == EMPTY_CSV_TRANSCRIPT):
                report.from_csv.append(video.video_id)
                continue
            reset_failed(video, has_transcript=bool(transcript))
            (report.to_summarise if transcript else report.to_fetch).append(video.id)
    for pk in report.to_fetch:
        celery_app.send_task(FETCH_TASK, args=[pk])
    for pk in report.to_summarise:
        celery_app.send_task(SUMMARISE_TASK, args=[pk])
    return report
