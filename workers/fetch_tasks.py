"""The fetch task: parse the id, call workers.fetch, decide retry. Runs on the ``transcripts`` queue."""

from __future__ import annotations

import logging

from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK, app
from tubesum.errors import TransientFetchError
from tubesum.settings import get_settings
from workers.fetch import Outcome, backoff_delay, fetch_video, mark_failed

log = logging.getLogger(__name__)


@app.task(name=FETCH_TASK, bind=True, max_retries=None)
def fetch_transcript(self, video_pk: int) -> str:  # type: ignore[no-untyped-def]
    settings = get_settings()
    video_pk = int(video_pk)
    try:
        outcome = fetch_video(video_pk, settings=settings)
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
        raise self.retry(exc=exc, countdown=delay)
    except Exception as exc:  # outermost: a bug is recorded on its video, the worker goes on
        log.exception("video %s: unexpected error", video_pk)
        mark_failed(video_pk, f"unexpected error: {type(exc).__name__}: {exc}", database_url=settings.database_url)
        return Outcome.failed.value
    if outcome is Outcome.fetched:
        app.send_task(SUMMARISE_TASK, args=[video_pk])
    return outcome.value
