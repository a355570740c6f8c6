"""The fetch task: parse the id, call tubesum.workers.fetch, decide retry. Runs on the ``transcripts`` queue."""

from __future__ import annotations

import logging

from billiard.exceptions import WorkerLostError
from celery.signals import task_failure, task_retry

from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK, app
from tubesum.db import is_transient_db_error
from tubesum.defaults import DB_MAX_RETRIES, DB_RETRY_MAX_DELAY_S, WORKER_LOST_RETRY_DELAY_S, backoff_delay
from tubesum.errors import TransientFetchError
from tubesum.settings import get_settings
from tubesum.workers.fetch import Outcome, fetch_video, mark_failed
from tubesum.workers.video_state import hold_for_retry, takes_over

log = logging.getLogger(__name__)

# max_retries comes from the app's task_annotations: fetch retries plus worker-lost retries.
@app.task(name=FETCH_TASK, bind=True)
def fetch_transcript(self, video_pk: int) -> str:  # type: ignore[no-untyped-def]
    settings = get_settings()
    video_pk = int(video_pk)
    try:
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        outcome = fetch_video(video_pk, settings=settings, owner=self.request.hostname,
                              takeover=takes_over(broker_url=settings.broker_url, redelivered=redelivered))
    except TransientFetchError as exc:
        attempt = self.request.retries + 1
        if attempt > settings.fetch_max_retries:
            reason = f"gave up after {attempt} attempts: {exc}"
            log.warning("video %s: %s", video_pk, reason)
            mark_failed(video_pk, reason, database_url=settings.database_url)
            return Outcome.failed.value
        delay = backoff_delay(self.request.retries, base_s=settings.fetch_backoff_base_s,
                              max_s=settings.fetch_backoff_max_s)
        log.info("video %s: attempt %d failed (%s); retrying in %.1fs", video_pk, attempt, exc, delay)
        # Whichever worker gets the retry may claim it; nobody resends it before it is due.
        hold_for_retry(video_pk, until_s=delay + settings.fetch_lease_s, database_url=settings.database_url)
        raise self.retry(exc=exc, countdown=delay)
    except Exception as exc:  # outermost: a bug is recorded on its video, the worker goes on
        if is_transient_db_error(exc) and self.request.retries < DB_MAX_RETRIES:
            delay = backoff_delay(self.request.retries, base_s=1.0, max_s=DB_RETRY_MAX_DELAY_S, jitter=False)
            log.warning("video %s: database error (%s); retrying in %.0fs", video_pk, exc, delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=DB_MAX_RETRIES) from None
        log.exception("video %s: unexpected error", video_pk)
        mark_failed(video_pk, f"unexpected error: {type(exc).__name__}: {exc}", database_url=settings.database_url)
        return Outcome.failed.value
    if outcome is Outcome.fetched:
        app.send_task(SUMMARISE_TASK, args=[video_pk])
    return outcome.value


@task_failure.connect(sender=fetch_transcript)
def _fail_video_of_lost_worker(sender=None, exception=None, args=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Celery gave up retrying a task whose worker process kept dying (task_retry_on_worker_lost):
    record that on the video, in the worker's main process, instead of leaving it ``fetching``."""
    if not isinstance(exception, WorkerLostError) or not args:
        return
    reason = f"the fetch worker process died on every attempt ({type(exception).__name__}: {exception})"
    log.warning("video %s: %s", args[0], reason)
    mark_failed(int(args[0]), reason, database_url=get_settings().database_url)


@task_retry.connect(sender=fetch_transcript)
def _release_lease_of_lost_child(sender=None, request=None, reason=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Celery retries a task whose prefork child died (task_retry_on_worker_lost), in the worker's
    main process: the retry may reach another worker, so the dead child's lease gives up its owner
    (as a retry after a transient error does) instead of making that worker drop the message."""
    lost = getattr(reason, "exc", reason)  # Celery passes Retry(exc=WorkerLostError(...))
    if not isinstance(lost, WorkerLostError) or request is None or not request.args:
        return
    hold_for_retry(int(request.args[0]), until_s=WORKER_LOST_RETRY_DELAY_S + get_settings().fetch_lease_s,
                   database_url=get_settings().database_url)
