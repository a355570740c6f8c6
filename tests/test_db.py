"""Migrations apply on PostgreSQL and SQLite; models round-trip; unique constraints make writes idempotent."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tubesum.db import make_engine, session_scope, upgrade
from tubesum.models import Batch, Job, Summary, Transcript, Video, VideoStatus

EXPECTED_TABLES = {"jobs", "videos", "transcripts", "batches", "summaries", "alembic_version"}


def _sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tubesum.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("db_url")
    return _sqlite_url(tmp_path)


def _job_with_video(session: Session, video_id: str = "abcdefghijk") -> Video:
    job = Job(sources=["https://www.youtube.com/playlist?list=PL1"], model="m", options={"k": 1})
    video = Video(job=job, video_id=video_id, title="A title", position=0)
    session.add_all([job, video])
    session.flush()
    return video


def test_migrations_create_every_table(any_db_url: str) -> None:
    engine = create_engine(any_db_url)
    assert EXPECTED_TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_upgrade_twice_is_harmless(tmp_path: Path) -> None:
    url = _sqlite_url(tmp_path)
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0004"
    engine.dispose()


def test_models_round_trip(any_db_url: str) -> None:
    now = datetime.now(UTC)
    with Session(make_engine(any_db_url)) as session:
        video = _job_with_video(session)
        session.add(
            Transcript(
                video=video,
                text="hello " * 10,
                language="English",
                language_code="en",
                is_generated=False,
                snippet_count=3,
                duration_s=12.5,
                source="csv",
            )
        )
        batch = Batch(
            id="b" * 32,
            worker_host="gpu@host",
            devices="cuda:0",
            model="m",
            dtype="bfloat16",
            attn_implementation="sdpa",
            engine="static",
            chunk_size=8,
            batch_size=1,
            prompt_tokens=40,
            padded_prompt_tokens=48,
            generated_tokens=20,
            wall_s=2.0,
            generated_tokens_per_s=10.0,
            started_at=now,
            ended_at=now,
        )
        session.add(
            Summary(
                video=video,
                batch=batch,
                text="short",
                model="m",
                prompt_tokens=40,
                generated_tokens=20,
                finish_reason="stop",
                queue_wait_s=0.5,
                latency_s=3.0,
            )
        )
        video.status = VideoStatus.done.value
        session.commit()
        video_pk = video.id

    with Session(make_engine(any_db_url)) as session:
        video = session.get(Video, video_pk)
        assert video is not None
        assert video.status == "done"
        assert video.job.sources == ["https://www.youtube.com/playlist?list=PL1"]
        assert video.job.options == {"k": 1}
        assert video.transcript.language_code == "en" and video.transcript.duration_s == 12.5
        assert video.summary.batch.generated_tokens_per_s == 10.0
        assert video.summary.batch.started_at.tzinfo is not None or any_db_url.startswith("sqlite")
        assert video.queued_at is not None


@pytest.mark.parametrize("duplicate", ["video", "transcript", "summary"])
def test_unique_constraints_make_writes_idempotent(any_db_url: str, duplicate: str) -> None:
    engine = make_engine(any_db_url)
    with Session(engine) as session:
        video = _job_with_video(session)
        session.add(Transcript(video=video, text="t"))
        session.add(
            Summary(video=video, text="s", model="m", prompt_tokens=1, generated_tokens=1, finish_reason="stop")
        )
        session.commit()
        job_id, video_pk = video.job_id, video.id

    with Session(engine) as session:
        if duplicate == "video":  # the same video twice in one job
            session.add(Video(job_id=job_id, video_id="abcdefghijk"))
        elif duplicate == "transcript":  # a redelivered fetch
            session.add(Transcript(video_pk=video_pk, text="again"))
        else:  # a redelivered chunk
            session.add(
                Summary(
                    video_pk=video_pk,
                    text="again",
                    model="m",
                    prompt_tokens=1,
                    generated_tokens=1,
                    finish_reason="stop",
                )
            )
        with pytest.raises(IntegrityError):
            session.commit()


def test_same_video_in_two_jobs_is_allowed(db_url: str) -> None:
    with session_scope(db_url) as session:
        _job_with_video(session)
        _job_with_video(session)
    with session_scope(db_url) as session:
        assert len(session.scalars(select(Video)).all()) == 2


def test_deleting_a_job_cascades(db_url: str) -> None:
    with session_scope(db_url) as session:
        video = _job_with_video(session)
        session.add(Transcript(video=video, text="t"))
    with session_scope(db_url) as session:
        session.execute(Job.__table__.delete())
    with session_scope(db_url) as session:
        assert session.scalars(select(Transcript)).all() == []
