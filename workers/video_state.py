"""A video's state transitions that every step shares: the row lock, the claim of a video by a
step (``claim(step=…)``), its lease, handing it back, and recording a permanent failure
(``mark_failed``). The steps' own result writes live beside them (workers/fetch.py ``store``,
workers/summarise/store.py ``store_batch``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tubesum.db import session_scope
from tubesum.models import Transcript, Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.models.tables import MAP_REDUCE_NOTE, TERMINAL_STATUSES

# A delivery of a video in one of these states is (re)claimed by its step: the second state is what
# an earlier delivery that died before its commit leaves behind.
FETCH_CLAIMABLE = (VideoStatus.queued.value, VideoStatus.fetching.value)
SUMMARISE_CLAIMABLE = (VideoStatus.fetched.value, VideoStatus.summarising.value)
# Longest failure reason stored on a video, characters.
MAX_REASON_CHARS = 600

log = logging.getLogger(__name__)


class Step(str, Enum):
    """The step a worker claims a video for."""

    fetch = "fetch"
    summarise = "summarise"


# What each step claims from, and the state (and its timestamp column) it puts the video in.
CLAIMABLE = {Step.fetch: FETCH_CLAIMABLE, Step.summarise: SUMMARISE_CLAIMABLE}
CLAIMED_STATE = {Step.fetch: VideoStatus.fetching.value, Step.summarise: VideoStatus.summarising.value}


@dataclass(frozen=True)
class Claimed:
    """A video a step now holds: its YouTube id, and (summarise) the transcript to summarise."""

    video_pk: int
    video_id: str
    transcript: str | None = None


def claim(
    video_pk: int,
    *,
    step: Step,
    database_url: str,
    max_attempts: int | None = None,
    owner: str | None = None,
    lease_s: float | None = None,
    takeover: bool = False,
    refuse: Callable[[str], str | None] = lambda _text: None,
) -> Claimed | None:
    """Claim a video for ``step``: from the step's claimable states to its working state
    (fetching, summarising), the claim counted, held under ``owner``'s lease for ``lease_s``.
    None when there is nothing to do: gone, another state (already done or failed; summarise: not
    fetched yet), held by another live worker (unless ``takeover``: the broker redelivered
    because that worker's connection died), or failed here: claimed ``max_attempts`` times
    already (its workers keep dying on it, so no message loops forever) or, for summarise, an
    empty transcript or one that ``refuse`` gives a reason against (too long, unreadable).

    The working state is claimable too: it is what a worker that died before its commit leaves."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status not in CLAIMABLE[step]:
            if step is Step.summarise and video is not None and video.status not in TERMINAL_STATUSES:
                log.warning("video %s is %s, not fetched: summarise message ignored", video_pk, video.status)
            return None
        now = utcnow()
        if not takeover and held_elsewhere(video, owner=owner, now=now):
            # Redis gave a long chunk's message to a second worker, or a resend raced a claim.
            log.info(
                "video %s is held by %s until %s: message dropped", video_pk, video.lease_owner, video.lease_expires_at
            )
            return None
        attempts = video.attempts if step is Step.fetch else video.summarise_attempts
        if max_attempts is not None and attempts >= max_attempts:
            fail(video, f"gave up after {attempts} {step.value} attempts that never finished (worker died?)", now=now)
            log.warning("video %s: %s", video_pk, video.error)
            return None
        transcript = None
        if step is Step.fetch:
            video.attempts += 1
        else:
            # Another delivery to the worker that holds it (it joins the video in flight) is no new attempt.
            if not (
                video.status == CLAIMED_STATE[step] and video.lease_owner is not None and video.lease_owner == owner
            ):
                video.summarise_attempts += 1
            transcript = session.scalar(select(Transcript.text).where(Transcript.video_pk == video_pk))
            reason = refuse(transcript) if transcript else "empty transcript"
            if reason is not None:
                fail(video, reason, now=now)
                return None
        video.status = CLAIMED_STATE[step]
        if step is Step.fetch:
            video.fetching_at = video.fetching_at or now
        else:
            video.summarising_at = video.summarising_at or now
        if lease_s is not None:
            take_lease(video, owner=owner, lease_s=lease_s, now=now)
        return Claimed(video_pk=video_pk, video_id=video.video_id, transcript=transcript)


def release(video_pk: int, *, step: Step, database_url: str, owner: str | None) -> bool:
    """Hand a claimed video back (the worker stops before finishing it): back to the state it was
    claimed from, no lease, and the claim not counted (no worker died on it). False if ``owner``
    no longer holds it."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status != CLAIMED_STATE[step] or video.lease_owner != owner:
            return False
        if step is Step.fetch:
            video.status, video.attempts = VideoStatus.queued.value, max(0, video.attempts - 1)
        else:
            video.status = VideoStatus.fetched.value
            video.summarise_attempts = max(0, video.summarise_attempts - 1)
        video.error = None  # a progress note of the worker that gives it back
        clear_lease(video)
        return True


def note_map_reduce(video_pk: int, note: str, *, owner: str | None, database_url: str) -> None:
    """Note on a long video that ``owner`` is summarising it in several steps (``status`` shows
    it); the summary or a failure replaces the note."""
    with session_scope(database_url) as session:
        session.execute(
            update(Video)
            .where(Video.id == video_pk, Video.status == VideoStatus.summarising.value, Video.lease_owner == owner)
            .values(error=clip_reason(MAP_REDUCE_NOTE + note))
        )


def note_retry(video_pk: int, reason: str, *, step: Step, database_url: str) -> None:
    """Record why a step is being retried on the video it still holds, so progress shows it (the
    step's success clears it, ``mark_failed`` replaces it)."""
    with session_scope(database_url) as session:
        video = session.get(Video, video_pk)
        if video is not None and video.status in CLAIMABLE[step]:
            video.error = clip_reason(f"retrying: {reason}")


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


def fail(video: Video, reason: str, *, now: datetime) -> None:
    """The locked video failed for good, with ``reason``; nobody holds it any more."""
    video.status, video.error, video.failed_at = VideoStatus.failed.value, clip_reason(reason), now
    clear_lease(video)


def mark_failed(video_pk: int, reason: str, *, database_url: str, step: Step | None = None) -> None:
    """Record a permanent failure: if the video is in one of ``step``'s claimable states (a later
    step's state means another delivery got further), or, without a step, unless it already
    finished."""
    with session_scope(database_url) as session:
        video = lock_video(session, video_pk)
        if video is None or video.status in TERMINAL_STATUSES:
            return
        if step is not None and video.status not in CLAIMABLE[step]:
            return
        fail(video, reason, now=utcnow())
