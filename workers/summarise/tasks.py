"""The summarise task: claim the video, hand it to this process's Batcher, wait, decide retry.

Runs on the ``summarise`` queue in the GPU worker only (``tubesum worker summarise``: threads pool,
two threads per chunk slot). This module is imported by every process that builds the Celery app
(producer, fetch workers), so it must not import torch or load a model at import time: the GPU
worker puts its Batcher on the Celery app (``attach_batcher``) before it consumes a message.

What Flower shows (tubesum/read/task_labels.py): arguments ``job=N video=ID``; a result such as
``summary 412 chars, batch 3f2a9c01 of 32, generate 3.21 s``; a video that failed ends its task as
FAILURE with the reason (``VideoFailed``, no retry).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from celery import Celery
from celery.exceptions import Reject

from tubesum.celery_app import SUMMARISE_TASK, app
from tubesum.defaults import STORE_MAX_RETRIES, STORE_RETRY_DELAY_S
from tubesum.errors import PromptError, VideoFailed, WorkerStopping
from tubesum.read.task_labels import now, summarise_result, summary_line, video_report
from tubesum.settings import Settings, get_settings
from tubesum.text import is_blank
from tubesum.workers.db_outage import DatabaseUnavailable, max_wait_s, wait_out
from tubesum.workers.summarise.prompt import sanitize
from tubesum.workers.summarise.store import VideoInput
from tubesum.workers.video_state import Step, claim, hold_for_retry, mark_failed, release, takes_over

if TYPE_CHECKING:  # the batcher's engine imports torch
    from tubesum.workers.gpu.batcher import Batcher

log = logging.getLogger(__name__)

# The attribute of the Celery app that holds the one Batcher of a GPU worker process.
_BATCHER_ATTR = "tubesum_batcher"


def attach_batcher(celery_app: Celery, batcher: Batcher | None) -> None:
    """Give the tasks of this process their Batcher (the GPU worker, before it consumes)."""
    setattr(celery_app, _BATCHER_ATTR, batcher)


def batcher_of(celery_app: Celery) -> Batcher:
    batcher = getattr(celery_app, _BATCHER_ATTR, None)
    if batcher is None:
        raise RuntimeError("no model in this process: summarise tasks run in `tubesum worker summarise`")
    return batcher


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
    batcher = batcher_of(self.app)
    owner = self.request.hostname
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    try:
        claimed = wait_out(
            lambda: claim(
                video_pk,
                step=Step.summarise,
                database_url=settings.database_url,
                max_attempts=max_summarise_attempts(settings),
                owner=owner,
                lease_s=settings.lease_s,
                takeover=takes_over(broker_url=settings.broker_url, redelivered=redelivered),
                refuse=partial(refusal, max_chars=settings.max_transcript_chars),
            ),
            limit_s=max_wait_s(settings.visibility_timeout_s),
        )
    except DatabaseUnavailable as exc:  # an outage past what the message may wait: back to the queue
        log.info("video %s handed back: %s", video_pk, exc)
        raise Reject(str(exc), requeue=True) from None
    video = None if claimed is None else VideoInput(video_pk=video_pk, transcript=claimed.transcript or "")
    if video is not None:  # None: already done or failed (a redelivery), not ours to do, or failed by the claim
        try:
            outcome = batcher.submit(video).result()
            if outcome.status == "done":
                # Shown from what the batcher stored, not read back: a chunk's 256 task threads
                # would otherwise query the database while the next chunk prefills, and the GPU
                # thread's kernel launches wait for the GIL behind them.
                return summary_line(len(outcome.text), outcome.batch_id, outcome.batch_size, outcome.generate_s)
        except PromptError as exc:  # the transcript cannot make a prompt for this model
            log.warning("video %s failed: %s", video_pk, exc)
            mark_failed(
                video_pk, f"cannot build a prompt: {exc}", database_url=settings.database_url, step=Step.summarise
            )
        except WorkerStopping as exc:  # SIGTERM: hand the message back now, for another worker to take
            release(video_pk, step=Step.summarise, database_url=settings.database_url, owner=owner)
            log.info("video %s handed back: %s", video_pk, exc)
            raise Reject(str(exc), requeue=True) from None
        except Exception as exc:  # storing the chunk failed: redeliver later
            log.warning("video %s: %s; retrying in %.0fs", video_pk, exc, STORE_RETRY_DELAY_S)
            try:  # whichever worker gets the retry may claim it
                hold_for_retry(
                    video_pk, until_s=STORE_RETRY_DELAY_S + settings.lease_s, database_url=settings.database_url
                )
            except Exception:  # noqa: BLE001 - database still down: the lease runs out and the video is resent
                log.warning("video %s: could not release its lease for the retry", video_pk)
            raise self.retry(exc=exc, countdown=STORE_RETRY_DELAY_S, argsrepr=_argsrepr(self.request)) from None
    report = video_report(video_pk, database_url=settings.database_url)
    if report is not None and report.failed_since(started):
        raise VideoFailed(f"{report.label}: {report.error}")
    return summarise_result(report, summarised=video is not None)


def refusal(transcript: str, *, max_chars: int) -> str | None:
    """Why this transcript is not summarised (the video's failure reason), or None: longer than
    TUBESUM_MAX_TRANSCRIPT_CHARS, or nothing left once control and zero-width characters are gone."""
    if len(transcript) > max_chars:
        return f"transcript of {len(transcript):,} characters is over TUBESUM_MAX_TRANSCRIPT_CHARS ({max_chars:,})"
    if is_blank(sanitize(transcript)):
        return "empty transcript"
    return None


def _argsrepr(request) -> str | None:  # type: ignore[no-untyped-def]
    """The message's shown arguments (``job=N video=ID``), kept on a retry."""
    return getattr(request, "argsrepr", None) or None
