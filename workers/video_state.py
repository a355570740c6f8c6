"""A video's state transitions that every step shares: the row lock, which states a step may
(re)claim, and recording a permanent failure. The steps' own writes live beside them
(workers/fetch.py, workers/summarise/store.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tubesum.db import session_scope
from tubesum.models import Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.models.tables import TERMINAL_STATUSES

# A delivery of a video in one of these states is (re)claimed by its step: the second state is what
# an earlier delivery that died before its commit leaves behind.
FETCH_CLAIMABLE = (VideoStatus.queued.value, VideoStatus.fetching.value)
SUMMARISE_CLAIMABLE = (VideoStatus.fetched.value, VideoStatus.summarising.value)
# Longest failure reason stored on a video, characters.
MAX_REASON_CHARS = 600


def lock_video(session: Session, video_pk: int) -> Video | None:
    """The video's row, locked until the transaction ends (SELECT … FOR UPDATE), or None if gone.
    Every state change goes through this lock, so two deliveries of one video never interleave."""
    return session.execute(select(Video).where(Video.id == video_pk).with_for_update()).scalar_one_or_none()


def held_elsewhere(video: Video, *, owner: str | None, now: datetime) -> bool:
    """Another live worker holds this video: its lease names someone else and has not run out. A
    delivery that finds this (Redis redelivering a long chunk's message, a resend that raced a
    claim) must not run the video a second time at once."""
    if video.lease_owner is None or video.lease_owner == owner or video.lease_expires_at is None:
        return False
    return aware(video.lease_expires_at) > now


def take_lease(video: Video, *, owner: str | None, lease_s: float, now: datetime) -> None:
    """The claiming worker holds the (locked) video until now + lease_s, unless renewed."""
    if video.lease_owner != owner or video.leased_at is None:
        video.leased_at = now
    video.lease_owner, video.lease_expires_at = owner, now + timedelta(seconds=lease_s)


def clear_lease(video: Video) -> None:
    video.lease_owner = video.leased_at = video.lease_expires_at = None


def takes_over(*, broker_url: str | None, redelivered: bool) -> bool:
    """May this delivery take a video from the worker whose lease still runs? Only on RabbitMQ
    (amqp), which redelivers an unacknowledged message only once its consumer's connection closed
    (the worker died or handed it back). Redis also redelivers a live worker's message after its
    visibility timeout, so there the lease decides."""
    return redelivered and (broker_url or "").startswith(("amqp", "pyamqp"))


def hold_for_retry(video_pk: int, *, until_s: float, database_url: str) -> None:
    """A task retries this video later (a countdown): the lease loses its owner, since any worker
    may get the retry message, but keeps an expiry, so nobody resends the video meanwhile."""
    with session_scope(database_url) as session:
        session.execute(
            update(Video)
            .where(Video.id == video_pk, Video.status.not_in(TERMINAL_STATUSES))
            .values(lease_owner=None, leased_at=None, lease_expires_at=utcnow() + timedelta(seconds=until_s))
        )


def aware(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every timestamp tubesum writes is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def clip_reason(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


def mark_failed(video_pk: int, reason: str, *, database_url: str, only_from: tuple[str, ...] | None = None) -> None:
    """Record a permanent failure: if the video is in one of ``only_from`` (the step's claimable
    states), or, without it, unless it already finished."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status in TERMINAL_STATUSES:
            return
        if only_from is not None and video.status not in only_from:
            return
        video.status, video.error, video.failed_at = VideoStatus.failed.value, clip_reason(reason), utcnow()
        clear_lease(video)
