"""The summarise step's database side: claim a video, keep its lease fresh, store a finished chunk.

Idempotent writes: a redelivered message, or a second worker that finishes the same video, finds
it done and leaves it; at most one summary per video exists (unique ``video_pk``, checked under the
row lock).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select, update

from tubesum.db import session_scope
from tubesum.text import is_blank
from tubesum.models import Batch, Summary, Transcript, Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.models.tables import TERMINAL_STATUSES
from tubesum.workers.summarise.prompt import sanitize
from tubesum.workers.video_state import SUMMARISE_CLAIMABLE, clip_reason, lock_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInput:
    """What the GPU worker needs of a claimed video."""

    video_pk: int
    transcript: str


@dataclass
class VideoOutcome:
    """The end of one video in the GPU worker: a summary to store, or a permanent failure."""

    video_pk: int
    status: str  # "done" | "failed"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    pieces: int = 1
    first_batch_started_at: datetime | None = None
    error: str | None = None


@dataclass
class BatchRecord:
    """One generate() call (or one out-of-memory attempt): a row of the ``batches`` table."""

    id: str
    worker_host: str
    devices: str
    model: str
    dtype: str
    attn_implementation: str
    engine: str
    chunk_size: int
    batch_size: int
    prompt_tokens: int
    padded_prompt_tokens: int
    generated_tokens: int
    prefill_s: float | None
    decode_s: float | None
    wall_s: float
    generated_tokens_per_s: float
    peak_memory_bytes: int | None
    oom_split: bool
    status: str  # "ok" | "oom"
    note: str | None
    started_at: datetime
    ended_at: datetime


def claim_video(video_pk: int, *, database_url: str, max_attempts: int | None = None) -> VideoInput | None:
    """fetched/summarising → summarising, counting the claim; the transcript to summarise, or None
    when there is nothing to do (already done or failed, not fetched, gone, or no transcript: then
    failed). A video already claimed ``max_attempts`` times fails: its worker keeps dying on it."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status not in SUMMARISE_CLAIMABLE:
            if video is not None and video.status not in TERMINAL_STATUSES:
                log.warning("video %s is %s, not fetched: summarise message ignored", video_pk, video.status)
            return None
        text = session.scalar(select(Transcript.text).where(Transcript.video_pk == video_pk))
        now = utcnow()
        if max_attempts is not None and video.summarise_attempts >= max_attempts:
            video.status, video.failed_at = VideoStatus.failed.value, now
            video.error = f"gave up after {video.summarise_attempts} summarise attempts that never finished (worker died?)"
            log.warning("video %s: %s", video_pk, video.error)
            return None
        video.summarise_attempts += 1
        if not text or is_blank(sanitize(text)):  # nothing readable: spaces, control or zero-width characters
            video.status, video.error, video.failed_at = VideoStatus.failed.value, "empty transcript", now
            return None
        video.status = VideoStatus.summarising.value
        video.summarising_at = video.summarising_at or now
        return VideoInput(video_pk=video_pk, transcript=text)


def touch_videos(video_pks: Sequence[int], *, database_url: str) -> None:
    """The GPU worker's heartbeat: ``updated_at`` = now for the videos it is still summarising, so
    `tubesum reconcile` leaves them alone."""
    if not video_pks:
        return
    with session_scope(database_url) as session:
        session.execute(update(Video).where(Video.id.in_(sorted(video_pks)),
                                            Video.status == VideoStatus.summarising.value)
                        .values(updated_at=utcnow()))


def store_batch(batch: BatchRecord, outcomes: Sequence[VideoOutcome], *, database_url: str) -> None:
    """In one transaction: the batch row, then each finished video's summary (done) or failure.
    Idempotent: a video already done or failed (another delivery got there first) is left as is,
    and at most one summary per video exists (unique video_pk, checked under the row lock)."""
    with session_scope(database_url) as session:
        session.add(Batch(**batch.__dict__))
        session.flush()  # the batch row exists before summaries point at it
        for outcome in sorted(outcomes, key=lambda o: o.video_pk):  # one lock order: no deadlocks
            video = lock_video(session, outcome.video_pk)
            if video is None or video.status in TERMINAL_STATUSES:
                continue
            now = utcnow()
            if outcome.status == VideoStatus.failed.value:
                video.status, video.error, video.failed_at = VideoStatus.failed.value, clip_reason(outcome.error or ""), now
                continue
            if session.scalar(select(Summary.id).where(Summary.video_pk == outcome.video_pk)) is not None:
                video.status, video.done_at = VideoStatus.done.value, video.done_at or now
                continue
            session.add(Summary(
                video_pk=outcome.video_pk, batch_id=batch.id, text=outcome.text, model=batch.model,
                prompt_tokens=outcome.prompt_tokens, generated_tokens=outcome.generated_tokens,
                finish_reason=outcome.finish_reason or "length", pieces=outcome.pieces,
                queue_wait_s=seconds_between(video.fetched_at, outcome.first_batch_started_at or batch.started_at),
                latency_s=seconds_between(video.queued_at, now), created_at=now,
            ))  # fmt: skip
            video.status, video.done_at, video.error = VideoStatus.done.value, now, None


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (_aware(end) - _aware(start)).total_seconds()


def _aware(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every timestamp tubesum writes is UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
