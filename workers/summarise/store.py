"""The summarise step's database side: keep its videos' leases fresh, store a finished chunk
(claiming and handing back: workers/video_state.py).

Idempotent writes: a redelivered message, or a second worker that finishes the same video, finds
it done and leaves it; at most one summary per video exists (unique ``video_pk``, checked under the
row lock).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update

from tubesum.db import session_scope
from tubesum.models import Batch, Summary, Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.models.tables import TERMINAL_STATUSES
from tubesum.workers.video_state import (
    aware,
    clear_lease,
    clip_reason,
    lock_video,
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
    prompt_tokens: int = 0
    generated_tokens: int = 0
    pieces: int = 1
    first_batch_started_at: datetime | None = None
    error: str | None = None
    # The batch that finished the video (its task's shown result, with no database read).
    batch_id: str | None = None
    batch_size: int | None = None
    generate_s: float | None = None


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


def store_batch(batch: Batch, outcomes: Sequence[VideoOutcome], *, database_url: str) -> None:
    """In one transaction: the batch row, then each finished video's summary (done) or failure.
    Idempotent: a video already done or failed (another delivery got there first) is left as is,
    and at most one summary per video exists (unique video_pk, checked under the row lock).
    ``batch`` (an unsaved row) is inserted as a copy: it stays the caller's, unattached, for a
    retry of this call or a log line after it."""
    with session_scope(database_url) as session:
        session.add(dataclasses.replace(batch))
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
