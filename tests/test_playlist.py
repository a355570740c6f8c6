"""Playlists through the REAL yt-dlp (youtube:tab extractor) against recorded pages, no network;
then ``submit`` recording the job in PostgreSQL and publishing to Redis."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import kombu.pools
import pytest
import redis

from tests.youtube_replay import playlist_initial_data, playlist_page, replay_ydl
from tubesum.celery_app import create_app
from tubesum.errors import BadInput
from tubesum.models import Job, Transcript, Video
from tubesum.producer.sources import PlaylistRef, VideoRef, resolve_playlist
from tubesum.producer.submit import EMPTY_CSV_TRANSCRIPT, submit

PL = "PLreplayNature0001"
VIDEOS = [
    ("dQw4w9WgXcQ", "How bees dance"),
    ("abcdefghijk", "[Private video]"),
    ("ABCDEFGHIJK", "Owls at night"),
    ("a_b-c_d-e_f", "[Deleted video]"),
]


def task_args(message: dict) -> list:
    """The positional arguments of a Celery protocol-2 message as kombu stored it in Redis."""
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args


def recorded(playlist_id: str, data: dict) -> dict:
    """The playlist page and the innertube browse call yt-dlp makes to reload unavailable videos."""
    return {
        ("GET", f"/playlist?list={playlist_id}"): (200, playlist_page(data)),
        ("POST", "/youtubei/v1/browse"): (200, json.dumps(data).encode()),
    }


def test_playlist_resolves_ids_and_titles_in_order_keeping_private_entries() -> None:
    calls: list = []
    make = replay_ydl(recorded(PL, playlist_initial_data(PL, "Nature", VIDEOS)), calls)
    assert resolve_playlist(PlaylistRef(PL), make_ydl=make) == [VideoRef(v, t) for v, t in VIDEOS]
    assert all(url.startswith("https://www.youtube.com/") for _, url in calls)
    assert not any("/watch" in url for _, url in calls), "flat extraction must not visit the videos"


@pytest.mark.parametrize("message", ["The playlist does not exist.", "This playlist is private."])
def test_missing_or_private_playlist_is_bad_input_with_youtubes_reason(message: str) -> None:
    data = playlist_initial_data(PL, "", [], alerts=[("ERROR", message)])
    with pytest.raises(BadInput) as info:
        resolve_playlist(PlaylistRef(PL), make_ydl=replay_ydl(recorded(PL, data)))
    assert str(info.value) == f"playlist {PL} cannot be read: YouTube said: {message}"


def test_unreachable_playlist_page_is_bad_input() -> None:
    with pytest.raises(BadInput, match=f"playlist {PL} cannot be read: .*404"):
        resolve_playlist(PlaylistRef(PL), make_ydl=replay_ydl({}))


def test_empty_playlist_is_bad_input() -> None:
    make = replay_ydl(recorded(PL, playlist_initial_data(PL, "Empty", [])))
    with pytest.raises(BadInput, match=f"^playlist {PL} has no videos$"):
        resolve_playlist(PlaylistRef(PL), make_ydl=make)


@pytest.fixture
def celery_app(settings):  # type: ignore[no-untyped-def]
    """A Celery app on the test broker. kombu's process-wide producer pools may still hold a
    connection pool that the shared ``settings`` fixture closed: start from fresh ones."""
    kombu.pools.reset()
    return create_app(settings)


def test_submit_records_job_and_publishes_ids_only(settings, celery_app, db_session, redis_url, tmp_path) -> None:
    sources = tmp_path / "sources.txt"
    sources.write_text(f"# more\nhttps://youtu.be/{VIDEOS[0][0]}\nzzzzzzzzzzz\n")
    csv = tmp_path / "t.csv"
    csv.write_text(
        "video_id,transcript,title\nmy-own-1,Bees dance to tell where flowers are.,Bees\nmy-own-2,,Nothing\n"
    )
    make = replay_ydl(recorded(PL, playlist_initial_data(PL, "Nature", VIDEOS)))

    job_id = submit(
        [f"https://www.youtube.com/playlist?list={PL}"],
        from_file=sources,
        transcripts_csv=csv,
        make_ydl=make,
        celery_app=celery_app,
    )

    job = db_session.get(Job, job_id)
    assert job.sources[0].endswith(PL) and job.model == settings.model
    videos = db_session.query(Video).filter_by(job_id=job_id).order_by(Video.position).all()
    assert [(v.position, v.video_id, v.status) for v in videos] == [
        (0, "dQw4w9WgXcQ", "queued"),  # also in the sources file: kept once, first position
        (1, "abcdefghijk", "queued"),
        (2, "ABCDEFGHIJK", "queued"),
        (3, "a_b-c_d-e_f", "queued"),
        (4, "zzzzzzzzzzz", "queued"),
        (5, "my-own-1", "fetched"),
        (6, "my-own-2", "failed"),
    ]
    assert videos[0].title == "How bees dance"
    assert videos[6].error == EMPTY_CSV_TRANSCRIPT and videos[6].failed_at is not None
    transcript = db_session.query(Transcript).filter_by(video_pk=videos[5].id).one()
    assert (transcript.source, transcript.text) == ("csv", "Bees dance to tell where flowers are.")

    broker = redis.Redis.from_url(redis_url)
    fetch_msgs = [json.loads(m) for m in broker.lrange("transcripts", 0, -1)]
    summarise_msgs = [json.loads(m) for m in broker.lrange("summarise", 0, -1)]
    assert sorted(task_args(m) for m in fetch_msgs) == [[v.id] for v in videos[:5]]
    assert [m["headers"]["task"] for m in fetch_msgs] == ["tubesum.fetch_transcript"] * 5
    assert [task_args(m) for m in summarise_msgs] == [[videos[5].id]]


def test_submit_bad_input_writes_nothing(settings, db_session) -> None:
    with pytest.raises(BadInput, match="'https://vimeo.com/1' is not a YouTube URL"):
        submit(["dQw4w9WgXcQ", "https://vimeo.com/1"])
    assert db_session.query(Job).count() == 0


def test_cli_submit_bad_input_is_one_line_exit_2(env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "submit", "not a url"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: 'not a url' is not a YouTube URL or an 11-character video id"
    assert "Traceback" not in result.stderr


def imports_torch(modules: str, cwd: Path) -> bool:
    """Whether importing ``modules`` (installed names, comma-separated) loads torch, in a fresh
    interpreter that sees only the installed package (-P: not the checkout's folders)."""
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_producer_and_fetch_worker_never_import_torch(tmp_path: Path) -> None:
    producer = "tubesum.producer.submit, tubesum.producer.sources, tubesum.workers.fetch_tasks, tubesum.workers.fetch"
    assert not imports_torch(producer, tmp_path)
    assert imports_torch("tubesum.workers.gpu.engine", tmp_path)  # the check sees torch where it is


def test_wait_for_job_counts_until_every_video_is_terminal(settings, db_session) -> None:
    from tubesum.read.progress import wait_for_job

    job = Job(sources=["x"])
    db_session.add_all(
        [
            job,
            *(
                Video(job=job, video_id=f"v{i}", position=i, status=s)
                for i, s in enumerate(["done", "failed", "fetching", "summarising"])
            ),
        ]
    )
    db_session.commit()
    counts = wait_for_job(job.id, database_url=settings.database_url, poll_s=0.01, timeout_s=0.05, show=False)
    assert (counts.queued, counts.fetched, counts.summarised, counts.failed, counts.finished) == (1, 1, 1, 1, False)
    db_session.query(Video).filter(Video.status != "failed").update({"status": "done"})
    db_session.commit()
    counts = wait_for_job(job.id, database_url=settings.database_url, poll_s=0.01, show=False)
    assert (counts.total, counts.summarised, counts.failed, counts.finished) == (4, 3, 1, True)
