"""The REAL youtube-transcript-api against recorded YouTube responses (replayed at the requests
transport layer), tubesum's fetch functions on PostgreSQL, and a real fetch worker process."""

from __future__ import annotations

import json
from pathlib import Path

import kombu.pools
import pytest
import redis
from youtube_transcript_api import YouTubeTranscriptApi

from tests.youtube_replay import RECORDED_VIDEO_ID, REPLAY_ENV, ReplayAdapter, fetch_worker_argv, mount_replay
from tubesum.defaults import backoff_delay
from tubesum.errors import PermanentFetchError, TransientFetchError
from tubesum.models import Job, Transcript, Video
from tubesum.settings import Settings
from tubesum.workers.fetch import (
    Outcome,
    TimeoutSession,
    download_transcript,
    fetch_video,
    make_http_session,
    make_proxy_config,
)

REPO = Path(__file__).resolve().parent.parent
EXPECTED_TEXT = (
    "Hey, this is just a test this is not the original transcript just something shorter, I made up for testing"
)


def replay_api(settings: Settings, scenarios: dict[str, str] | None = None, default: str = "ok"):  # type: ignore[no-untyped-def]
    adapter = ReplayAdapter(scenario_for=scenarios or {}, default=default)
    api = YouTubeTranscriptApi(http_client=mount_replay(make_http_session(settings), adapter))
    return api, adapter


# --- the library against recordings -----------------------------------------------------------------


def test_normal_case_manual_english(settings) -> None:
    api, adapter = replay_api(settings)
    got = download_transcript(RECORDED_VIDEO_ID, api=api, languages=["en"])
    assert got.text == EXPECTED_TEXT
    assert (got.language, got.language_code, got.is_generated, got.translated_from) == ("English", "en", False, None)
    assert got.snippet_count == 3 and got.duration_s == pytest.approx(5.7 + 3.239)
    assert [c.method for c in adapter.calls] == ["GET", "POST", "GET"]  # watch page, player, captions


def test_every_request_carries_connect_and_read_timeouts(settings) -> None:
    session = make_http_session(settings)
    assert isinstance(session, TimeoutSession)
    api, adapter = replay_api(settings)
    download_transcript(RECORDED_VIDEO_ID, api=api, languages=["en"])
    expected = (settings.http_connect_timeout_s, settings.http_read_timeout_s)
    assert adapter.calls and all(c.timeout == expected for c in adapter.calls)


def test_language_preference_manual_before_generated(settings) -> None:
    api, adapter = replay_api(settings)
    got = download_transcript(RECORDED_VIDEO_ID, api=api, languages=["xx", "de", "en"])
    assert (got.language_code, got.is_generated) == ("de", False)
    assert "lang=de" in adapter.calls[-1].url


def test_translation_fallback_into_first_preferred_language(settings) -> None:
    api, adapter = replay_api(settings)
    got = download_transcript(RECORDED_VIDEO_ID, api=api, languages=["ar", "xx"])  # no Arabic track: translate
    assert got.language_code == "ar" and got.translated_from == "zh" and got.is_generated
    assert "tlang=ar" in adapter.calls[-1].url


def test_no_transcript_in_any_language_is_permanent(settings) -> None:
    api, _ = replay_api(settings)
    with pytest.raises(
        PermanentFetchError,
        match="^NoTranscriptFound: No transcripts were found for any of the requested language codes: \\['xx'\\]",
    ):
        download_transcript(RECORDED_VIDEO_ID, api=api, languages=["xx"])


def test_consent_page_is_accepted(settings) -> None:
    api, adapter = replay_api(settings, default="consent")
    assert download_transcript(RECORDED_VIDEO_ID, api=api, languages=["en"]).text == EXPECTED_TEXT
    assert adapter.calls[1].headers["Cookie"] == "CONSENT=YES+cb.20210328-17-p0.de+FX+119"


@pytest.mark.parametrize(
    ("scenario", "error", "reason"),
    [
        ("consent_refused", PermanentFetchError, "FailedToCreateConsentCookie: Failed to automatically give consent"),
        ("age_restricted", PermanentFetchError, "AgeRestricted: This video is age-restricted"),
        (
            "unplayable",
            PermanentFetchError,
            "VideoUnplayable: The video is unplayable for the following reason: Custom Reason",
        ),
        ("unavailable", PermanentFetchError, "VideoUnavailable: The video is no longer available"),
        ("transcripts_disabled", PermanentFetchError, "TranscriptsDisabled: Subtitles are disabled for this video"),
        ("too_many_requests", TransientFetchError, "IpBlocked: YouTube is blocking requests from your IP"),
        ("http_429", TransientFetchError, "IpBlocked: YouTube is blocking requests from your IP"),
        ("request_blocked", TransientFetchError, "RequestBlocked: YouTube is blocking requests from your IP"),
        ("server_error", TransientFetchError, "YouTubeRequestFailed: Request to YouTube failed: 500"),
    ],
)
def test_failures_are_classified_with_readable_reasons(settings, scenario, error, reason) -> None:
    api, _ = replay_api(settings, default=scenario)
    with pytest.raises(error) as info:
        download_transcript(RECORDED_VIDEO_ID, api=api, languages=["en"])
    assert str(info.value).startswith(reason)
    assert "\n" not in str(info.value)


def test_proxy_settings_choose_the_proxy_config() -> None:
    assert make_proxy_config(Settings(_env_file=None)) is None
    generic = make_proxy_config(Settings(proxy_http="http://p:8080", proxy_https="http://p:8443"))
    assert generic.to_requests_dict() == {"http": "http://p:8080", "https": "http://p:8443"}
    webshare = make_proxy_config(Settings(webshare_proxy_username="u", webshare_proxy_password="pw"))
    assert type(webshare).__name__ == "WebshareProxyConfig"


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    for retries, ceiling in [(0, 2.0), (1, 4.0), (3, 16.0), (20, 300.0)]:
        delays = [backoff_delay(retries, base_s=2.0, max_s=300.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


# --- fetch_video on PostgreSQL --------------------------------------------------------------------------


def add_video(session, video_id: str = RECORDED_VIDEO_ID, status: str = "queued") -> int:  # type: ignore[no-untyped-def]
    job = Job(sources=[video_id])
    video = Video(job=job, video_id=video_id, status=status)
    session.add_all([job, video])
    session.commit()
    return video.id


def test_fetch_video_stores_transcript_once(settings, db_session) -> None:
    pk = add_video(db_session)
    api, adapter = replay_api(settings)
    assert fetch_video(pk, settings=settings, api=api) is Outcome.fetched
    assert fetch_video(pk, settings=settings, api=api) is Outcome.skipped  # a redelivered message
    db_session.expire_all()
    video = db_session.get(Video, pk)
    assert (video.status, video.attempts, video.error) == ("fetched", 1, None)
    assert video.fetching_at <= video.fetched_at
    transcript = db_session.query(Transcript).filter_by(video_pk=pk).one()
    assert (transcript.text, transcript.language_code, transcript.is_generated, transcript.source) == (
        EXPECTED_TEXT,
        "en",
        False,
        "youtube",
    )
    assert len(adapter.calls) == 3


def test_fetch_video_records_permanent_failure(settings, db_session) -> None:
    pk = add_video(db_session)
    api, _ = replay_api(settings, default="transcripts_disabled")
    assert fetch_video(pk, settings=settings, api=api) is Outcome.failed
    db_session.expire_all()
    video = db_session.get(Video, pk)
    assert video.status == "failed" and video.failed_at is not None
    assert video.error == "TranscriptsDisabled: Subtitles are disabled for this video"


@pytest.mark.parametrize("status", ["fetched", "summarising", "done", "failed"])
def test_fetch_video_leaves_finished_videos_alone(settings, db_session, status) -> None:
    pk = add_video(db_session, status=status)
    api, adapter = replay_api(settings)
    assert fetch_video(pk, settings=settings, api=api) is Outcome.skipped
    assert adapter.calls == []


# --- a real worker process --------------------------------------------------------------------------------


@pytest.mark.slow
def test_fetch_worker_end_to_end(settings, env, db_session, redis_url, start_worker, wait_until, tmp_path) -> None:
    from tubesum.celery_app import create_app
    from tubesum.producer.submit import submit

    scenarios = {
        "okVideo0001": "ok",
        "consent0001": "consent",
        "flaky429001": "flaky_429",
        "blocked0001": "http_429",
        "disabled001": "transcripts_disabled",
        "ageRestrict": "age_restricted",
    }
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"videos": scenarios}))
    worker_env = {
        **env,
        REPLAY_ENV: str(replay),
        "PYTHONPATH": str(REPO),
        "TUBESUM_FETCH_MAX_RETRIES": "2",
        "TUBESUM_FETCH_BACKOFF_BASE_S": "0.2",
        "TUBESUM_FETCH_BACKOFF_MAX_S": "1",
    }
    start_worker(
        env=worker_env,
        cwd=REPO,
        name="fetch",
        argv=fetch_worker_argv("fetch", concurrency=3),
    )

    kombu.pools.reset()
    job_id = submit(list(scenarios), celery_app=create_app(settings))

    def all_terminal():  # type: ignore[no-untyped-def]
        db_session.expire_all()
        videos = db_session.query(Video).filter_by(job_id=job_id).all()
        return videos if all(v.status in ("fetched", "failed") for v in videos) else None

    videos = {v.video_id: v for v in wait_until(all_terminal, timeout=60, message="every video fetched or failed")}
    assert {vid: v.status for vid, v in videos.items()} == {
        "okVideo0001": "fetched",
        "consent0001": "fetched",
        "flaky429001": "fetched",
        "blocked0001": "failed",
        "disabled001": "failed",
        "ageRestrict": "failed",
    }
    assert videos["flaky429001"].attempts == 2
    assert videos["blocked0001"].attempts == 3
    assert videos["blocked0001"].error.startswith("gave up after 3 attempts: IpBlocked: YouTube is blocking requests")
    assert videos["disabled001"].error == "TranscriptsDisabled: Subtitles are disabled for this video"
    assert videos["ageRestrict"].error.startswith("AgeRestricted: This video is age-restricted")
    fetched_pks = sorted(v.id for v in videos.values() if v.status == "fetched")
    assert sorted(t.video_pk for t in db_session.query(Transcript).all()) == fetched_pks

    broker = redis.Redis.from_url(redis_url)
    summarise = wait_until(
        lambda: broker.llen("summarise") == 3 and broker.lrange("summarise", 0, -1),
        timeout=10,
        message="three summarise messages",
    )
    from tests.test_playlist import task_args

    assert sorted(task_args(json.loads(m)) for m in summarise) == [[pk] for pk in fetched_pks]
