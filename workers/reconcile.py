"""The reconcile pass: send a video back to its queue when the worker holding it died, or when its
message was lost. Every worker runs one every ``reconcile_every_s`` (a thread started when the
worker is ready; PostgreSQL only), ``tubesum run`` runs one, and ``tubesum reconcile`` runs one by
hand. The database is the one source of truth:

- **Expired leases.** A worker that claims a video (``fetching``/``summarising``) holds it under a
  lease that names it and runs out ``lease_s`` after its last heartbeat. A lease that ran out
  means the worker died or stalled: the video goes back to ``queued``/``fetched`` and gets a new
  message at once, and ``lease_expiries`` += 1. After ``max_reconciles`` expiries the video fails
  (it kills every worker). A late finisher (a stalled worker that wakes up) stores nothing twice:
  one summary and one transcript per video, checked under the row lock. A claimed video with no
  lease at all (rows from before leases) counts as expired once ``stuck_after_s`` old.
- **Lost messages.** A ``queued``/``fetched`` video with no lease, untouched for ``stuck_after_s``,
  while its queue is empty, has no message left (the producer died mid-send, a fetch worker died
  between commit and send, Redis restarted without persistence): it is sent again. That counts
  nothing against the video: no worker died on it, and an outage with no worker fails nothing.
  While its queue still holds messages, it may just be waiting its turn, and is left alone.

Passes of several workers take turns (a PostgreSQL advisory lock; rows a worker is writing are
skipped with ``SKIP LOCKED``). Claims are idempotent, so a message that was not lost after all
costs at most a duplicate that finds nothing to do.
A job whose submit stopped before sending every message (Ctrl-C, a crash: its send record,
``producer/submit.py``, says how far it got) gets the rest of its messages first, each sent once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu.common import ignore_errors
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from tubesum.celery_app import FETCH_TASK, SUMMARISE_QUEUE, SUMMARISE_TASK, TRANSCRIPTS_QUEUE
from tubesum.db import is_transient_db_error, session_scope
from tubesum.models import Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.producer.submit import resume_stale_sends
from tubesum.read.task_labels import video_label
from tubesum.settings import Settings, get_settings
from tubesum.workers.db_outage import OUTAGE
from tubesum.workers.video_state import clear_lease

log = logging.getLogger(__name__)

# A claimed state, and the state its video returns to when the lease runs out.
RETURNS_TO = {
    VideoStatus.fetching.value: VideoStatus.queued.value,
    VideoStatus.summarising.value: VideoStatus.fetched.value,
}
# States that wait on a queue (no worker holds them), that queue, and the task of their message.
WAITING_ON = {VideoStatus.queued.value: TRANSCRIPTS_QUEUE, VideoStatus.fetched.value: SUMMARISE_QUEUE}
RESEND_TASK = {VideoStatus.queued.value: FETCH_TASK, VideoStatus.fetched.value: SUMMARISE_TASK}
# The PostgreSQL advisory lock (a transaction-level one) that lets one pass run at a time: "tube".
RECONCILE_LOCK_KEY = 0x74756265


@dataclass
class ReconcileReport:
    resent: dict[str, list[int]] = field(default_factory=dict)  # state found in → video pks sent again
    expired: list[int] = field(default_factory=list)  # of them: leases that ran out (worker died)
    failed: list[int] = field(default_factory=list)  # gave up: too many expired leases
    waiting: int = 0  # stale but their queue is not empty yet
    resumed_jobs: list[int] = field(default_factory=list)  # jobs whose interrupted submit was finished
    skipped: bool = False  # another pass was running

    @property
    def resent_count(self) -> int:
        return sum(len(pks) for pks in self.resent.values())

    def summary(self) -> str:
        if self.skipped:
            return "another reconcile pass is running; nothing done"
        by_state = ", ".join(f"{len(p)} {s}" for s, p in sorted(self.resent.items())) or "none"
        resumed = (
            f"; finished the sends of job(s) {', '.join(map(str, self.resumed_jobs))}" if self.resumed_jobs else ""
        )
        return (
            f"re-enqueued {self.resent_count} ({by_state}); {len(self.expired)} expired leases; "
            f"failed {len(self.failed)}; left waiting {self.waiting}{resumed}"
        )


def queue_depths(celery_app: Celery, broker_url: str | None) -> dict[str, int]:
    """Messages waiting in each queue (not those a worker has reserved). On RabbitMQ the queues are
    only looked up (passive): declaring them again would need their quorum arguments; a queue not
    declared yet holds nothing."""
    passive = (broker_url or "").startswith(("amqp", "pyamqp"))
    depths: dict[str, int] = {}
    with celery_app.connection_for_write() as conn:
        for name in (TRANSCRIPTS_QUEUE, SUMMARISE_QUEUE):
            channel = conn.channel()  # a failed passive declare closes its channel
            try:
                depths[name] = channel.queue_declare(queue=name, passive=passive).message_count
            except conn.channel_errors:
                depths[name] = 0
            finally:
                ignore_errors(conn, channel.close)
    return depths


def take_turn(session: Session) -> bool:
    """True if no other pass is running (held until this transaction ends). SQLite: one machine,
    writers serialised by the file lock anyway."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(RECONCILE_LOCK_KEY))))


def expired_leases(session: Session, *, now: datetime, stale: datetime) -> list[Video]:
    no_lease_and_stale = and_(Video.lease_expires_at.is_(None), Video.updated_at < stale)
    return list(
        session.scalars(
            select(Video)
            .where(Video.status.in_(list(RETURNS_TO)), or_(Video.lease_expires_at < now, no_lease_and_stale))
            .order_by(Video.id)
            .with_for_update(skip_locked=True)
        )
    )


def unsent(session: Session, *, now: datetime, stale: datetime) -> list[Video]:
    return list(
        session.scalars(
            select(Video)
            .where(
                Video.status.in_(list(WAITING_ON)),
                Video.updated_at < stale,
                or_(Video.lease_expires_at.is_(None), Video.lease_expires_at < now),
            )
            .order_by(Video.id)
            .with_for_update(skip_locked=True)
        )
    )


def return_expired(video: Video, *, settings: Settings, now: datetime, report: ReconcileReport) -> bool:
    """The lease of ``video`` ran out: back to its queue (True), or failed after too many (False)."""
    held_by, status = video.lease_owner or "a worker", video.status
    clear_lease(video)
    if video.lease_expiries >= settings.max_reconciles:
        video.error = (
            f"stuck in '{status}' after {video.lease_expiries} expired leases (its worker died each time); giving up"
        )
        video.status, video.failed_at = VideoStatus.failed.value, now
        report.failed.append(video.id)
        return False
    log.warning("video %s: lease of %s ran out in '%s'; sending it back to its queue", video.id, held_by, status)
    video.lease_expiries += 1
    video.reconciles += 1
    video.status, video.updated_at = RETURNS_TO[status], now
    report.expired.append(video.id)
    report.resent.setdefault(status, []).append(video.id)
    return True


def reconcile(
    *, settings: Settings, celery_app: Celery, stuck_after_s: float | None = None, now: datetime | None = None
) -> ReconcileReport:
    """One pass: finish the sends of interrupted submits; return expired leases and resend lost
    messages; commit, then send."""
    stuck_after_s = settings.stuck_after_s if stuck_after_s is None else stuck_after_s
    now = now or utcnow()
    stale = now - timedelta(seconds=stuck_after_s)
    report = ReconcileReport(resumed_jobs=resume_stale_sends(settings=settings, celery_app=celery_app))
    resend: list[tuple[int, str, str]] = []  # (video pk, task, shown arguments)
    with session_scope(settings.database_url) as session:
        if not take_turn(session):
            report.skipped = True
            return report
        for video in expired_leases(session, now=now, stale=stale):
            if return_expired(video, settings=settings, now=now, report=report):
                resend.append((video.id, RESEND_TASK[video.status], video_label(video.job_id, video.video_id)))
        candidates = unsent(session, now=now, stale=stale)
        depths = queue_depths(celery_app, settings.broker_url) if candidates else {}
        for video in candidates:
            if depths.get(WAITING_ON[video.status], 0) > 0:
                report.waiting += 1
                continue
            video.reconciles += 1
            video.updated_at = now  # not resent again before another stuck_after_s
            report.resent.setdefault(video.status, []).append(video.id)
            resend.append((video.id, RESEND_TASK[video.status], video_label(video.job_id, video.video_id)))
    # After the commit: a crash here leaves the videos to a later pass, stuck_after_s later.
    for pk, task, shown in resend:
        celery_app.send_task(task, args=[pk], argsrepr=shown)
    if resend or report.failed:
        log.warning("reconcile: %s", report.summary())
    return report


def run_periodically(
    *, settings: Settings, celery_app: Celery, every_s: float, stop: threading.Event, stuck_after_s: float | None = None
) -> None:
    """A pass every ``every_s`` seconds until ``stop`` is set; a failed pass (database or broker
    down) is logged and the next one tried on time. A database outage is the worker's one outage
    line (workers/db_outage.py), not a traceback every pass."""
    while True:
        try:
            reconcile(settings=settings, celery_app=celery_app, stuck_after_s=stuck_after_s)
            OUTAGE.up()
        except Exception as exc:  # noqa: BLE001 - outermost loop of a long-running thread
            if is_transient_db_error(exc):
                OUTAGE.down(exc)
            else:
                log.exception("reconcile pass failed; next one in %.1fs", every_s)
        if stop.wait(every_s):
            return


# --- the pass inside every worker -------------------------------------------------------------------
_worker_stop = threading.Event()


@worker_ready.connect
def _start_in_worker(sender=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Every fetch and GPU worker runs the reconcile pass in a thread of its main process, so a dead
    worker's videos come back wherever any worker still runs, with no extra service to deploy."""
    settings = get_settings()
    if settings.reconcile_every_s <= 0 or not settings.database_url.startswith("postgresql"):
        return  # turned off, or embedded mode (SQLite): `tubesum run` runs the passes itself
    _worker_stop.clear()
    threading.Thread(
        target=run_periodically,
        name="tubesum-reconcile",
        daemon=True,
        kwargs=dict(settings=settings, celery_app=sender.app, every_s=settings.reconcile_every_s, stop=_worker_stop),
    ).start()
    log.info("reconcile pass every %.0fs in this worker", settings.reconcile_every_s)


@worker_shutdown.connect
def _stop_in_worker(**_kwargs) -> None:  # type: ignore[no-untyped-def]
    _worker_stop.set()
