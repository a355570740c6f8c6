"""Fetch one video's transcript from YouTube and store it. Plain functions; the Celery task is thin.

Error policy (per youtube-transcript-api exception):
- transient, retried with backoff: ``RequestBlocked``/``IpBlocked`` (429, captcha, bot check — may
  pass with time or another proxy), ``YouTubeRequestFailed`` (HTTP errors), requests' connection
  errors and timeouts;
- permanent, recorded on the video: every other ``CouldNotRetrieveTranscript`` — transcripts
  disabled, no transcript in any wanted language, unavailable/unplayable/age-restricted video,
  invalid id, not translatable, PO token required, consent cookie refused, unparsable page.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from enum import Enum

import requests
from sqlalchemy.exc import IntegrityError
from urllib3.exceptions import NameResolutionError
from youtube_transcript_api import (
    CouldNotRetrieveTranscript,
    NoTranscriptFound,
    RequestBlocked,
    YouTubeRequestFailed,
    YouTubeTranscriptApi,
)
from youtube_transcript_api._transcripts import Transcript as YtTranscript
from youtube_transcript_api._transcripts import TranscriptList
from youtube_transcript_api.proxies import GenericProxyConfig, ProxyConfig, WebshareProxyConfig

from tubesum.db import session_scope
from tubesum.errors import PermanentFetchError, TransientFetchError
from tubesum.models import Transcript, VideoStatus
from tubesum.models.base import utcnow
from tubesum.settings import Settings
from tubesum.workers import video_state
from tubesum.workers.db_outage import wait_out
from tubesum.workers.video_state import FETCH_CLAIMABLE, Step, clear_lease, clip_reason, lock_video

log = logging.getLogger(__name__)

# Offline, a CSV of transcripts still makes a job (the example ships with the repository).
OFFLINE_HINT = "offline? summarise a CSV instead: --transcripts examples/nature_transcripts.csv"
TRANSIENT_ERRORS = (RequestBlocked, YouTubeRequestFailed, requests.ConnectionError, requests.Timeout)


class Outcome(str, Enum):
    fetched = "fetched"  # transcript stored: enqueue the summary
    failed = "failed"  # permanent failure recorded on the video
    skipped = "skipped"  # not ours to do (already fetched, failed, or gone)


@dataclass(frozen=True)
class FetchedText:
    text: str
    language: str
    language_code: str
    is_generated: bool
    translated_from: str | None
    snippet_count: int
    duration_s: float | None


# --- HTTP ----------------------------------------------------------------------------------------


class TimeoutSession(requests.Session):
    """A Session that gives every request a (connect, read) timeout: the library passes none, and a
    stalled socket would otherwise hold a worker forever."""

    def __init__(self, *, timeout: tuple[float, float]):
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):  # type: ignore[no-untyped-def, override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, **kwargs)


def make_http_session(settings: Settings) -> requests.Session:
    return TimeoutSession(timeout=(settings.http_connect_timeout_s, settings.http_read_timeout_s))


def make_proxy_config(settings: Settings) -> ProxyConfig | None:
    if settings.webshare_proxy_username and settings.webshare_proxy_password:
        return WebshareProxyConfig(
            proxy_username=settings.webshare_proxy_username,
            proxy_password=settings.webshare_proxy_password,
        )
    if settings.proxy_http or settings.proxy_https:
        return GenericProxyConfig(http_url=settings.proxy_http, https_url=settings.proxy_https)
    return None


_local = threading.local()


def thread_api(settings: Settings) -> YouTubeTranscriptApi:
    """This thread's API instance: the library (and its Session) is not thread-safe."""
    api = getattr(_local, "api", None)
    if api is None:
        api = YouTubeTranscriptApi(proxy_config=make_proxy_config(settings), http_client=make_http_session(settings))
        _local.api = api
    return api


# --- choosing and fetching -------------------------------------------------------------------------


def choose_transcript(transcripts: TranscriptList, languages: list[str]) -> tuple[YtTranscript, str | None]:
    """Manual in a preferred language, else generated in one, else any transcript translated into the
    first preferred language. Returns (transcript, code it was translated from or None)."""
    for find in (transcripts.find_manually_created_transcript, transcripts.find_generated_transcript):
        try:
            return find(languages), None
        except NoTranscriptFound:
            pass
    target = languages[0]
    for candidate in transcripts:  # manual ones first
        if candidate.is_translatable and any(t.language_code == target for t in candidate.translation_languages):
            return candidate.translate(target), candidate.language_code
    raise NoTranscriptFound(transcripts.video_id, languages, transcripts)


def download_transcript(video_id: str, *, api: YouTubeTranscriptApi, languages: list[str]) -> FetchedText:
    """Raises PermanentFetchError or TransientFetchError with a human-readable reason."""
    try:
        chosen, translated_from = choose_transcript(api.list(video_id), languages)
        fetched = chosen.fetch()
    except TRANSIENT_ERRORS as exc:
        if unresolvable_host(exc):  # offline or no DNS: retrying for minutes would only hide it
            raise PermanentFetchError(
                f"cannot resolve YouTube's host name (offline, or no DNS): {describe(exc)}; {OFFLINE_HINT}"
            ) from exc
        raise TransientFetchError(describe(exc)) from exc
    except CouldNotRetrieveTranscript as exc:
        raise PermanentFetchError(describe(exc)) from exc
    snippets = fetched.snippets
    return FetchedText(
        text=" ".join(s.text.replace("\n", " ").strip() for s in snippets if s.text.strip()),
        language=fetched.language,
        language_code=fetched.language_code,
        is_generated=fetched.is_generated,
        translated_from=translated_from,
        snippet_count=len(snippets),
        duration_s=(snippets[-1].start + snippets[-1].duration) if snippets else None,
    )


def unresolvable_host(exc: BaseException) -> bool:
    """True when a requests error comes from a failed DNS lookup (urllib3 wraps socket.gaierror in
    NameResolutionError inside MaxRetryError inside requests' ConnectionError)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (NameResolutionError, socket.gaierror)):
            return True
        todo.extend([getattr(current, "reason", None), current.__cause__, current.__context__, *current.args])
    return False


def describe(exc: BaseException) -> str:
    """One readable line: the exception's name and the library's cause, without its boilerplate."""
    if isinstance(exc, CouldNotRetrieveTranscript):
        cause = " ".join(line.strip() for line in exc.cause.splitlines() if line.strip())
        text = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc}"
    return clip_reason(text)


# --- database ------------------------------------------------------------------------------------


def store(video_pk: int, fetched: FetchedText, *, database_url: str) -> bool:
    """fetching → fetched with the transcript, once. False if another delivery got there first."""
    try:
        with session_scope(database_url) as session:
            video = lock_video(session, video_pk)
            if video is None or video.status not in FETCH_CLAIMABLE:
                return False
            session.add(Transcript(video_pk=video_pk, source="youtube", **fetched.__dict__))
            video.status, video.fetched_at, video.error = VideoStatus.fetched.value, utcnow(), None
            clear_lease(video)
    except IntegrityError:  # the unique video_pk: a transcript is already stored
        return False
    return True


def fetch_video(
    video_pk: int,
    *,
    settings: Settings,
    api: YouTubeTranscriptApi | None = None,
    owner: str | None = None,
    takeover: bool = False,
    outage_wait_s: float = 0.0,
) -> Outcome:
    """Claim (as worker ``owner``), download, store. Transient errors propagate as
    TransientFetchError (the caller retries); permanent ones are recorded and return Outcome.failed.
    Each database call waits out an outage for up to ``outage_wait_s`` seconds, then raises
    DatabaseUnavailable (workers/db_outage.py): a downloaded transcript is not thrown away for it."""
    claimed = wait_out(
        lambda: video_state.claim(
            video_pk,
            step=Step.fetch,
            database_url=settings.database_url,
            max_attempts=max_fetch_attempts(settings),
            owner=owner,
            lease_s=settings.fetch_lease_s,
            takeover=takeover,
        ),
        limit_s=outage_wait_s,
    )
    if claimed is None:
        return Outcome.skipped
    video_id = claimed.video_id
    try:
        fetched = download_transcript(
            video_id, api=api or thread_api(settings), languages=settings.transcript_languages
        )
    except PermanentFetchError as exc:
        reason = str(exc)
        log.info("video %s (%s) failed: %s", video_pk, video_id, reason)
        wait_out(
            lambda: video_state.mark_failed(video_pk, reason, database_url=settings.database_url, step=Step.fetch),
            limit_s=outage_wait_s,
        )
        return Outcome.failed
    if not wait_out(lambda: store(video_pk, fetched, database_url=settings.database_url), limit_s=outage_wait_s):
        return Outcome.skipped
    return Outcome.fetched


def max_fetch_attempts(settings: Settings) -> int:
    """Claims of one video before it fails: every retry of a transient error, plus the deliveries
    a dying worker may cost (prefork child lost, whole worker killed, reconciler re-enqueue)."""
    return settings.fetch_max_retries + 1 + settings.max_worker_lost_retries
