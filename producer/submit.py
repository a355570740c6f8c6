"""Record a job and its videos, commit, then enqueue one message per video (ids only).

Order matters: rows are committed before any message is sent, so a worker never receives an id
it cannot find. If sending fails half-way, the unsent videos stay ``queued`` in the database and
``tubesum reconcile`` re-enqueues them. This module never imports torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from tubesum.models import Job, Transcript, Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.producer.sources import (
    CsvTranscript,
    VideoRef,
    YdlFactory,
    default_ydl,
    expand_sources,
    load_transcripts_csv,
    read_sources_file,
)
from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK
from tubesum.celery_app import app as default_celery_app
from tubesum.db import session_scope
from tubesum.errors import BadInput
from tubesum.settings import Settings, get_settings

log = logging.getLogger(__name__)

EMPTY_CSV_TRANSCRIPT = "empty transcript in CSV"
# Duplicate ids named in the warning, at most.
DUPLICATES_SHOWN = 5


@dataclass(frozen=True)
class Planned:
    """One video of the job, in submission order."""

    video_id: str
    title: str | None
    csv: CsvTranscript | None = None


def plan_videos(videos: Sequence[VideoRef], csv_rows: Sequence[CsvTranscript]) -> list[Planned]:
    """Drop duplicates keeping first position; a CSV row supplies the transcript wherever the id is."""
    by_csv: dict[str, CsvTranscript] = {}
    for row in csv_rows:
        by_csv.setdefault(row.video_id, row)
    planned: dict[str, Planned] = {}
    for v in videos:
        if v.video_id not in planned:
            row = by_csv.get(v.video_id)
            planned[v.video_id] = Planned(v.video_id, v.title or (row.title if row else None), row)
    for row in by_csv.values():
        if row.video_id not in planned:
            planned[row.video_id] = Planned(row.video_id, row.title, row)
    return list(planned.values())


def submit(
    sources: Sequence[str],
    *,
    from_file: str | Path | None = None,
    transcripts_csv: str | Path | None = None,
    settings: Settings | None = None,
    celery_app: Celery | None = None,
    make_ydl: YdlFactory = default_ydl,
) -> int:
    """Create a job for the given sources and enqueue its videos. Returns the job id."""
    settings = settings or get_settings()
    all_sources = list(sources) + (read_sources_file(from_file) if from_file else [])
    csv_rows = load_transcripts_csv(transcripts_csv) if transcripts_csv else []
    if not all_sources and not csv_rows:
        raise BadInput("nothing to submit: give a video or playlist, --from-file or --transcripts")
    videos = expand_sources(all_sources, make_ydl=make_ydl)
    planned = plan_videos(videos, csv_rows)
    warn_duplicates([v.video_id for v in videos], what="sources")
    warn_duplicates([r.video_id for r in csv_rows], what=f"transcripts CSV {str(transcripts_csv)!r}")

    job_id, to_fetch, to_summarise = record_job(planned, sources=all_sources, settings=settings,
                                                transcripts_csv=transcripts_csv)
    app = celery_app or default_celery_app
    for pk in to_fetch:
        app.send_task(FETCH_TASK, args=[pk])
    for pk in to_summarise:
        app.send_task(SUMMARISE_TASK, args=[pk])
    log.info("job %s: %d to fetch, %d with CSV transcripts", job_id, len(to_fetch), len(to_summarise))
    return job_id


def warn_duplicates(video_ids: Sequence[str], *, what: str) -> None:
    """Say which video ids appeared more than once (each is summarised once, at its first place)."""
    repeated = sorted(v for v, n in Counter(video_ids).items() if n > 1)
    if repeated:
        shown = ", ".join(repeated[:DUPLICATES_SHOWN]) + (" ..." if len(repeated) > DUPLICATES_SHOWN else "")
        log.warning("%s: %d video id(s) given more than once, kept once at the first place: %s",
                    what, len(repeated), shown)


def record_job(
    planned: Sequence[Planned],
    *,
    sources: Sequence[str],
    settings: Settings,
    transcripts_csv: str | Path | None = None,
) -> tuple[int, list[int], list[int]]:
    """Insert the job, its videos (and CSV transcripts) in one transaction.
    Returns (job id, video pks to fetch, video pks ready to summarise)."""
    now = utcnow()
    with session_scope(settings.database_url) as session:
        job = Job(
            sources=list(sources) + ([f"csv:{transcripts_csv}"] if transcripts_csv else []),
            model=settings.model,
            options={"transcript_languages": settings.transcript_languages},
        )
        session.add(job)
        rows: list[tuple[Video, Planned]] = []
        for position, p in enumerate(planned):
            video = Video(job=job, video_id=p.video_id, title=p.title, position=position, queued_at=now)
            if p.csv is not None and not p.csv.transcript:
                video.status, video.error, video.failed_at = VideoStatus.failed.value, EMPTY_CSV_TRANSCRIPT, now
            elif p.csv is not None:
                video.status, video.fetched_at = VideoStatus.fetched.value, now
                session.add(Transcript(video=video, text=p.csv.transcript, source="csv"))
            session.add(video)
            rows.append((video, p))
        session.flush()
        to_fetch = [v.id for v, p in rows if p.csv is None]
        to_summarise = [v.id for v, p in rows if v.status == VideoStatus.fetched.value]
        return job.id, to_fetch, to_summarise

