"""A video's state transitions that every step shares: the row lock, which states a step may
(re)claim, and recording a permanent failure. The steps' own writes live beside them
(workers/fetch.py, workers/summarise/store.py)."""

from __future__ import annotations

from sqlalchemy import select
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
