"""``tubesum reconcile``: send again the message of every video stuck in a non-terminal state.

Late acknowledgement brings back the message of a task whose worker died (Celery's worker-lost
retry for a prefork child, Redis' visibility timeout for a whole worker). What it cannot bring
back is a message that was never sent: the producer died between committing the videos and
enqueuing them (``queued``), or a fetch worker died between committing a transcript and sending
the summarise message (``fetched``). It also cannot notice a message that a broker without
persistence lost. The reconciler covers all of these from the database, the one source of truth:

- first, a job whose submit stopped before sending every message (Ctrl-C, a crash: its send record,
  ``producer/submit.py``, says how far it got) gets the rest of its messages, each sent once;
- a video is *stuck* when its ``updated_at`` is older than ``stuck_after_s``. In-flight work keeps
  it fresh: a fetch claims (and so touches) the video on every attempt and is bounded by its HTTP
  timeouts and backoff; the GPU worker touches the videos it holds every ``heartbeat_s``;
- a ``queued``/``fetched`` video whose queue still holds messages may simply be waiting its turn
  (a long playlist): it is left alone until that queue drains;
- a stuck video gets a new message on its stage's queue (fetch for ``queued``/``fetching``,
  summarise for ``fetched``/``summarising``) and ``reconciles`` += 1; after ``max_reconciles`` it
  fails with a reason instead. The claims are idempotent, so a message that was not lost after
  all costs at most a duplicate that finds nothing to do.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select

from tubesum.models import Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.celery_app import FETCH_TASK, SUMMARISE_QUEUE, SUMMARISE_TASK, TRANSCRIPTS_QUEUE
from tubesum.db import session_scope
from tubesum.producer.submit import resume_stale_sends
from tubesum.settings import Settings
from tubesum.workers.task_report import video_label

log = logging.getLogger(__name__)

# Which task a stuck video's message goes to, by state.
RESEND_TASK = {
    VideoStatus.queued.value: FETCH_TASK,
    VideoStatus.fetching.value: FETCH_TASK,
    VideoStatus.fetched.value: SUMMARISE_TASK,
    VideoStatus.summarising.value: SUMMARISE_TASK,
}
# States that wait on a queue (no worker holds them yet), and that queue.
WAITING_ON = {VideoStatus.queued.value: TRANSCRIPTS_QUEUE, VideoStatus.fetched.value: SUMMARISE_QUEUE}


@dataclass
class ReconcileReport:
    resent: dict[str, list[int]] = field(default_factory=dict)  # state → video pks sent again
    failed: list[int] = field(default_factory=list)  # gave up: too many reconciles
    waiting: int = 0  # stale but their queue is not empty yet
    resumed_jobs: list[int] = field(default_factory=list)  # jobs whose interrupted submit was finished

    @property
    def resent_count(self) -> int:
        return sum(len(pks) for pks in self.resent.values())

    def summary(self) -> str:
        by_state = ", ".join(f"{len(p)} {s}" for s, p in sorted(self.resent.items())) or "none"
        resumed = f"; finished the sends of job(s) {', '.join(map(str, self.resumed_jobs))}" if self.resumed_jobs else ""
        return (f"re-enqueued {self.resent_count} ({by_state}); failed {len(self.failed)}; "
                f"left waiting {self.waiting}{resumed}")


def queue_depths(celery_app: Celery) -> dict[str, int]:
    """Messages waiting in each queue (not those a worker has reserved)."""
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        return {name: channel.queue_declare(queue=name).message_count for name in (TRANSCRIPTS_QUEUE, SUMMARISE_QUEUE)}


def reconcile(*, settings: Settings, celery_app: Celery, stuck_after_s: float | None = None,
              now: datetime | None = None) -> ReconcileReport:
    """One pass: finish the sends of interrupted submits; find the stuck videos, count and commit,
    then send their messages."""
    stuck_after_s = settings.stuck_after_s if stuck_after_s is None else stuck_after_s
    now = now or utcnow()
    report = ReconcileReport(resumed_jobs=resume_stale_sends(settings=settings, celery_app=celery_app))
    depths = queue_depths(celery_app)
    resend: list[tuple[int, str, str]] = []  # (video pk, task, shown arguments)
    with session_scope(settings.database_url) as session:
        # SKIP LOCKED: a video a worker is writing right now is not stuck; two reconcilers split the work.
        stuck = session.scalars(
            select(Video).where(Video.status.in_(list(RESEND_TASK)),
                                Video.updated_at < now - timedelta(seconds=stuck_after_s))
            .order_by(Video.id).with_for_update(skip_locked=True)).all()
        for video in stuck:
            queue = WAITING_ON.get(video.status)
            if queue is not None and depths.get(queue, 0) > 0:
                report.waiting += 1
                continue
            if video.reconciles >= settings.max_reconciles:
                video.error = (f"stuck in '{video.status}' after {video.reconciles} re-enqueues by the "
                               f"reconciler; giving up")
                video.status, video.failed_at = VideoStatus.failed.value, now
                report.failed.append(video.id)
                continue
            video.reconciles += 1
            video.updated_at = now  # not stuck again before another stuck_after_s
            report.resent.setdefault(video.status, []).append(video.id)
            resend.append((video.id, RESEND_TASK[video.status], video_label(video.job_id, video.video_id)))
    # After the commit: a crash here leaves the videos to the next pass, stuck_after_s later.
    for pk, task, shown in resend:
        celery_app.send_task(task, args=[pk], argsrepr=shown)
    if resend or report.failed:
        log.warning("reconcile: %s", report.summary())
    return report


def run_periodically(*, settings: Settings, celery_app: Celery, every_s: float, stop: threading.Event,
                     stuck_after_s: float | None = None) -> None:
    """A pass every ``every_s`` seconds until ``stop`` is set; a failed pass (database or broker
    down) is logged and the next one tried on time."""
    while True:
        try:
            reconcile(settings=settings, celery_app=celery_app, stuck_after_s=stuck_after_s)
        except Exception:  # noqa: BLE001 - outermost loop of a long-running process
            log.exception("reconcile pass failed; next one in %.0fs", every_s)
        if stop.wait(every_s):
            return
