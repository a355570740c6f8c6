"""The fetch task: parse the id, call tubesum.workers.fetch, decide retry. Runs on the ``transcripts`` queue.

What Flower shows (tubesum/read/task_labels.py): arguments ``job=N video=ID``, kept on retries and
passed on to the summarise message; a result such as ``fetched 12,345 chars (en)``; a permanently
failed video ends its task as FAILURE with the reason (``VideoFailed``, no retry).

A database outage delays a fetch, never fails it: every claim and write waits it out
(workers/db_outage.py, one log line per outage), and past what the message may wait it goes back
to the queue unacknowledged."""

from __future__ import annotations

import logging
from functools import partial

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Reject
from celery.signals import task_failure, task_retry

from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK, app
from tubesum.defaults import WORKER_LOST_RETRY_DELAY_S, backoff_delay
from tubesum.errors import TransientFetchError, VideoFailed
from tubesum.read.task_labels import fetch_result, label_of, now, video_report
from tubesum.settings import Settings, get_settings
from tubesum.workers.db_outage import DatabaseUnavailable, max_wait_s, wait_out
from tubesum.workers.fetch import Outcome, fetch_video
from tubesum.workers.video_state import Step, hold_for_retry, mark_failed, note_retry, takes_over

log = logging.getLogger(__name__)


def shown_args(request, video_pk: int, *, database_url: str) -> str:  # type: ignore[no-untyped-def]
    """This task's ``job=N video=ID`` (from its message, else the database), for the messages it sends."""
    argsrepr = getattr(request, "argsrepr", None) or ""
    return argsrepr if argsrepr.startswith("job=") else label_of(video_pk, database_url=database_url)


# max_retries comes from the app's task_annotations: fetch retries plus worker-lost retries.
# throws: a VideoFailed is an expected end, logged in one line without a traceback.
@app.task(name=FETCH_TASK, bind=True, throws=(VideoFailed,))
def fetch_transcript(self, video_pk: int) -> str:  # type: ignore[no-untyped-def]
    settings = get_settings()
    video_pk = int(video_pk)
    try:
        return fetch_and_report(
            self, video_pk, settings=settings, outage_wait_s=max_wait_s(settings.visibility_timeout_s)
        )
    except DatabaseUnavailable as exc:  # an outage past what the message may wait: back to the queue
        log.info("video %s handed back: %s", video_pk, exc)
        raise Reject(str(exc), requeue=True) from None


def fetch_and_report(task: Task, video_pk: int, *, settings: Settings, outage_wait_s: float) -> str:
    """Fetch, retry or fail the video; then send its summarise message and say what happened."""
    waiting = partial(wait_out, limit_s=outage_wait_s)
    started = now()
    try:
        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        outcome = fetch_video(
            video_pk,
            settings=settings,
            owner=task.request.hostname,
            takeover=takes_over(broker_url=settings.broker_url, redelivered=redelivered),
            outage_wait_s=outage_wait_s,
        )
    except TransientFetchError as exc:
        attempt = task.request.retries + 1
        if attempt > settings.fetch_max_retries:
            reason = f"gave up after {attempt} attempts: {exc}"
            log.warning("video %s: %s", video_pk, reason)
            waiting(lambda: mark_failed(video_pk, reason, database_url=settings.database_url, step=Step.fetch))
            outcome = Outcome.failed
        else:
            delay = backoff_delay(
                task.request.retries, base_s=settings.fetch_backoff_base_s, max_s=settings.fetch_backoff_max_s
            )
            log.info("video %s: attempt %d failed (%s); retrying in %.1fs", video_pk, attempt, exc, delay)
            try:  # only for the progress line: a database hiccup here must not stop the retry
                note_retry(video_pk, str(exc), step=Step.fetch, database_url=settings.database_url)
            except Exception:  # noqa: BLE001
                log.warning("video %s: could not record the retry reason", video_pk, exc_info=True)
            # Whichever worker gets the retry may claim it; nobody resends it before it is due.
            waiting(
                lambda: hold_for_retry(
                    video_pk, until_s=delay + settings.fetch_lease_s, database_url=settings.database_url
                )
            )
            shown = waiting(lambda: shown_args(task.request, video_pk, database_url=settings.database_url))
            raise task.retry(exc=exc, countdown=delay, argsrepr=shown) from None
    except DatabaseUnavailable:
        raise
    except Exception as exc:  # outermost: a bug is recorded on its video, the worker goes on
        log.exception("video %s: unexpected error", video_pk)
        reason = f"unexpected error: {type(exc).__name__}: {exc}"
        waiting(lambda: mark_failed(video_pk, reason, database_url=settings.database_url, step=Step.fetch))
        outcome = Outcome.failed
    report = waiting(lambda: video_report(video_pk, database_url=settings.database_url))
    if report is not None and report.failed_since(started):
        raise VideoFailed(f"{report.label}: {report.error}")
    if outcome is Outcome.fetched:
        app.send_task(SUMMARISE_TASK, args=[video_pk], argsrepr=report.label if report else None)
    return fetch_result(report, fetched=outcome is Outcome.fetched)


@task_failure.connect(sender=fetch_transcript)
def _fail_video_of_lost_worker(sender=None, exception=None, args=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Celery gave up retrying a task whose worker process kept dying (task_retry_on_worker_lost):
    record that on the video, in the worker's main process, instead of leaving it ``fetching``."""
    if not isinstance(exception, WorkerLostError) or not args:
        return
    reason = f"the fetch worker process died on every attempt ({type(exception).__name__}: {exception})"
    log.warning("video %s: %s", args[0], reason)
    mark_failed(int(args[0]), reason, database_url=get_settings().database_url, step=Step.fetch)


@task_retry.connect(sender=fetch_transcript)
def _release_lease_of_lost_child(sender=None, request=None, reason=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Celery retries a task whose prefork child died (task_retry_on_worker_lost), in the worker's
    main process: the retry may reach another worker, so the dead child's lease gives up its owner
    (as a retry after a transient error does) instead of making that worker drop the message."""
    lost = getattr(reason, "exc", reason)  # Celery passes Retry(exc=WorkerLostError(...))
    if not isinstance(lost, WorkerLostError) or request is None or not request.args:
        return
    hold_for_retry(
        int(request.args[0]),
        until_s=WORKER_LOST_RETRY_DELAY_S + get_settings().fetch_lease_s,
        database_url=get_settings().database_url,
    )
