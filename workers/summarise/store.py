"""The summarise step's database side: claim a video, keep its lease fresh, store a finished chunk.

Idempotent writes: a redelivered message, or a second worker that finishes the same video, finds
it done and leaves it; at most one summary per video exists (unique ``video_pk``, checked under the
row lock).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update

from tubesum.db import session_scope
from tubesum.models import Batch, Summary, Transcript, Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.models.tables import TERMINAL_STATUSES
from tubesum.text import is_blank
from tubesum.workers.summarise.prompt import sanitize
from tubesum.workers.video_state import (
    SUMMARISE_CLAIMABLE,
    aware,
    clear_lease,
    clip_reason,
    held_elsewhere,
    lock_video,
    take_lease,
)

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
    truncated: bool = False  # cut back to its last complete sentence (workers/summarise/finish.py)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    pieces: int = 1
    first_batch_started_at: datetime | None = None
    error: str | None = None
    # The batch that finished the video (its task's shown result, with no database read).
    batch_id: str | None = None
    batch_size: int | None = None
    generate_s: float | None = None


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


def claim_video(
    video_pk: int,
    *,
    database_url: str,
    max_attempts: int | None = None,
    owner: str | None = None,
    lease_s: float | None = None,
    takeover: bool = False,
) -> VideoInput | None:
    """fetched/summarising → summarising, counting the claim, held under ``owner``'s lease for
    ``lease_s``; the transcript to summarise, or None when there is nothing to do (already done or
    failed, not fetched, gone, held by another live worker, or no transcript: then failed). A video
    already claimed ``max_attempts`` times fails: its worker keeps dying on it."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status not in SUMMARISE_CLAIMABLE:
            if video is not None and video.status not in TERMINAL_STATUSES:
                log.warning("video %s is %s, not fetched: summarise message ignored", video_pk, video.status)
            return None
        now = utcnow()
        if not takeover and held_elsewhere(video, owner=owner, now=now):
            # Redis gave a long chunk's message to a second worker: the first still runs it.
            log.info(
                "video %s is held by %s until %s: message dropped", video_pk, video.lease_owner, video.lease_expires_at
            )
            return None
        text = session.scalar(select(Transcript.text).where(Transcript.video_pk == video_pk))
        if max_attempts is not None and video.summarise_attempts >= max_attempts:
            video.status, video.failed_at = VideoStatus.failed.value, now
            video.error = (
                f"gave up after {video.summarise_attempts} summarise attempts that never finished (worker died?)"
            )
            clear_lease(video)
            log.warning("video %s: %s", video_pk, video.error)
            return None
        # Another delivery to the worker that holds it (it joins the video in flight) is no new attempt.
        if not (
            video.status == VideoStatus.summarising.value
            and video.lease_owner is not None
            and video.lease_owner == owner
        ):
            video.summarise_attempts += 1
        if not text or is_blank(sanitize(text)):  # nothing readable: spaces, control or zero-width characters
            video.status, video.error, video.failed_at = VideoStatus.failed.value, "empty transcript", now
            clear_lease(video)
            return None
        video.status = VideoStatus.summarising.value
        video.summarising_at = video.summarising_at or now
        if lease_s is not None:
            take_lease(video, owner=owner, lease_s=lease_s, now=now)
        return VideoInput(video_pk=video_pk, transcript=text)


def touch_videos(
    video_pks: Sequence[int], *, database_url: str, owner: str | None = None, lease_s: float | None = None
) -> None:
    """The GPU worker's heartbeat: renew ``owner``'s lease (and ``updated_at``) on the videos it is
    still summarising. A lease that ran out and went to another worker is not taken back."""
    if not video_pks:
        return
    now = utcnow()
    values: dict[str, object] = {"updated_at": now}
    if lease_s is not None:
        values["lease_expires_at"] = now + timedelta(seconds=lease_s)
    with session_scope(database_url) as session:
        session.execute(
            update(Video)
            .where(
                Video.id.in_(sorted(video_pks)),
                Video.lease_owner == owner,
                Video.status == VideoStatus.summarising.value,
            )
            .values(**values)
        )


def release_video(video_pk: int, *, database_url: str, owner: str | None) -> bool:
    """Hand a claimed video back (the worker stops before summarising it): fetched again, no lease,
    and the claim not counted (no worker died on it). False if ``owner`` no longer holds it."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status != VideoStatus.summarising.value or video.lease_owner != owner:
            return False
        video.status = VideoStatus.fetched.value
        video.summarise_attempts = max(0, video.summarise_attempts - 1)
        clear_lease(video)
        return True


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
            clear_lease(video)
            if outcome.status == VideoStatus.failed.value:
                video.status, video.error, video.failed_at = (
                    VideoStatus.failed.value,
                    clip_reason(outcome.error or ""),
                    now,
                )
                continue
            if session.scalar(select(Summary.id).where(Summary.video_pk == outcome.video_pk)) is not None:
                video.status, video.done_at = VideoStatus.done.value, video.done_at or now
                continue
            session.add(
                Summary(
                    video_pk=outcome.video_pk,
                    batch_id=batch.id,
                    text=outcome.text,
                    model=batch.model,
                    prompt_tokens=outcome.prompt_tokens,
                    generated_tokens=outcome.generated_tokens,
                    finish_reason=outcome.finish_reason or "length",
                    truncated=outcome.truncated,
                    pieces=outcome.pieces,
                    queue_wait_s=seconds_between(video.fetched_at, outcome.first_batch_started_at or batch.started_at),
                    latency_s=seconds_between(video.queued_at, now),
                    created_at=now,
                )
            )
            video.status, video.done_at, video.error = VideoStatus.done.value, now, None


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (aware(end) - aware(start)).total_seconds()
