"""The summarise task: claim the video, hand it to this process's Batcher, wait, decide retry.

Runs on the ``summarise`` queue in the GPU worker only (``tubesum worker summarise``: threads pool,
two threads per chunk slot). This module is imported by every process that builds the Celery app
(producer, fetch workers), so it must not import torch or load a model at import time.

What Flower shows (workers/task_report.py): arguments ``job=N video=ID``; a result such as
``summary 412 chars, batch 3f2a9c01 of 32, generate 3.21 s``; a video that failed ends its task as
FAILURE with the reason (``VideoFailed``, no retry).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tubesum.celery_app import SUMMARISE_TASK, app
from tubesum.db import is_transient_db_error
from tubesum.errors import VideoFailed
from tubesum.settings import Settings, get_settings
from tubesum.workers.summarise import claim_video, mark_failed
from tubesum.workers.task_report import now, summarise_result, video_report

if TYPE_CHECKING:  # importing the batcher imports torch
    from tubesum.workers.gpu.batcher import Batcher

log = logging.getLogger(__name__)

# A commit of a finished chunk that failed (database unreachable) is retried this many times.
STORE_MAX_RETRIES = 5
# Delay before such a retry, seconds.
STORE_RETRY_DELAY_S = 10.0
# Delay before retrying a claim whose database connection dropped, seconds.
CLAIM_RETRY_DELAY_S = 2.0

# The registry: the one Batcher of this process. `tubesum worker summarise` loads the model, builds
# the Batcher and installs it here before the worker consumes its first message; the tasks read it.
# A plain module-level slot because the model must be loaded once per process, by the worker
# command, and never by the other processes that import this module.
_batcher: Batcher | None = None


def install_batcher(batcher: Batcher | None) -> None:
    global _batcher
    _batcher = batcher


def current_batcher() -> Batcher:
    if _batcher is None:
        raise RuntimeError("no model in this process: summarise tasks run in `tubesum worker summarise`")
    return _batcher


def max_summarise_attempts(settings: Settings) -> int:
    """Claims of one video before it fails: the first, every store retry, and the deliveries a
    dying GPU worker may cost (visibility-timeout redelivery, reconciler re-enqueue)."""
    return 1 + STORE_MAX_RETRIES + settings.max_worker_lost_retries


# throws: a VideoFailed is an expected end, logged in one line without a traceback.
@app.task(name=SUMMARISE_TASK, bind=True, max_retries=STORE_MAX_RETRIES, throws=(VideoFailed,))
def summarise(self, video_pk: int) -> str:  # type: ignore[no-untyped-def]
    settings = get_settings()
    video_pk = int(video_pk)
    started = now()
    batcher = current_batcher()
    try:
        video = claim_video(video_pk, database_url=settings.database_url,
                            max_attempts=max_summarise_attempts(settings))
    except Exception as exc:
        if not is_transient_db_error(exc):
            raise
        log.warning("video %s: database error (%s); retrying in %.0fs", video_pk, exc, CLAIM_RETRY_DELAY_S)
        raise self.retry(exc=exc, countdown=CLAIM_RETRY_DELAY_S, argsrepr=_argsrepr(self.request)) from None
    if video is not None:  # None: already done or failed (a redelivery), not ours to do, or failed by the claim
        try:
            batcher.submit(video).result()
        except ValueError as exc:  # the transcript cannot make a prompt for this model
            log.warning("video %s failed: %s", video_pk, exc)
            mark_failed(video_pk, f"cannot build a prompt: {exc}", database_url=settings.database_url)
        except Exception as exc:  # storing the chunk failed, or the worker is stopping: try again later
            log.warning("video %s: %s; retrying in %.0fs", video_pk, exc, STORE_RETRY_DELAY_S)
            raise self.retry(exc=exc, countdown=STORE_RETRY_DELAY_S, argsrepr=_argsrepr(self.request))
    report = video_report(video_pk, database_url=settings.database_url)
    if report is not None and report.failed_since(started):
        raise VideoFailed(f"{report.label}: {report.error}")
    return summarise_result(report, summarised=video is not None)


def _argsrepr(request) -> str | None:  # type: ignore[no-untyped-def]
    """The message's shown arguments (``job=N video=ID``), kept on a retry."""
    return getattr(request, "argsrepr", None) or None
