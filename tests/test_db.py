"""Migrations apply on PostgreSQL and SQLite; models round-trip; unique constraints make writes idempotent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tests.factories import batch_row
from tubesum.db import alembic_config, make_engine, session_scope, upgrade
from tubesum.models import Base, Job, Summary, Transcript, Video, VideoStatus

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
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
    engine.dispose()


def head_revision() -> str:
    """The one head of the migrations (branches that each added one must be chained on merge)."""
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"the migrations have {len(heads)} heads: {heads}; chain their down_revision"
    return heads[0]


def test_the_migrations_build_what_the_models_describe(any_db_url: str) -> None:
    engine = create_engine(any_db_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert differences == []


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_0004_moves_the_queried_options_to_columns_and_back(dialect: str, request, tmp_path: Path) -> None:
    """Jobs recorded before 0004 keep their send record, prompt and CSV hash; a downgrade puts them back."""
    if dialect == "postgresql":
        url = request.getfixturevalue("db_url")  # the session's database: at head again at the end
        downgrade(url, "0003")
    else:
        url = f"sqlite:///{tmp_path / 'm.db'}"
        upgrade(url, "0003")
    at = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    send = {"total": 5, "sent": 2, "through": 1, "at": at.isoformat(), "stopped": True}
    options = {"prompt": "Summarise.", "csv_sha256": "ab" * 32, "send": send, "max_new_tokens": 9}
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO jobs (created_at, sources, model, options) VALUES (:t, '[]', 'm', :o)"),
                {"t": at, "o": json.dumps(options)},
            )
        upgrade(url)
        with Session(engine) as session:
            job = session.scalars(select(Job)).one()
            assert (job.prompt, job.csv_sha256, job.options) == ("Summarise.", "ab" * 32, {"max_new_tokens": 9})
            assert (job.send_total, job.send_sent, job.send_through, job.send_stopped) == (5, 2, 1, True)
            assert job.send_at is not None and job.send_at.replace(tzinfo=UTC) == at
        downgrade(url, "0003")
        with engine.connect() as conn:
            restored = conn.scalar(text("SELECT options FROM jobs"))
        assert (json.loads(restored) if isinstance(restored, str) else restored) == options
    finally:
        engine.dispose()
        upgrade(url)


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
        batch = batch_row(id="b" * 32, generated_tokens_per_s=10.0, started_at=now)
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


def test_the_stale_send_query_agrees_with_the_send_state(any_db_url: str) -> None:
    """``stale_sends`` (SQL, over the partial index) picks exactly the jobs ``SendState.resumable`` would."""
    from datetime import timedelta

    from tubesum.producer.submit import SEND_STALE_S, SendState, stale_sends

    now = datetime.now(UTC)
    silent = now - timedelta(seconds=SEND_STALE_S + 1)
    fresh = now - timedelta(seconds=1)
    states = [
        None,  # still being read
        SendState(10, 10, 9, silent),  # complete
        SendState(10, 4, 3, fresh),  # sending now
        SendState(10, 4, 3, fresh, stopped=True),  # interrupted: resumable at once
        SendState(10, 4, 3, silent),  # silent too long: its submit died
        SendState(0, 0, -1, silent),  # nothing to send
    ]
    with Session(make_engine(any_db_url)) as session:
        jobs = [Job(sources=[], **(state.columns() if state else {})) for state in states]
        session.add_all(jobs)
        session.commit()
        expected = [j.id for j in jobs if (s := SendState.of(j)) is not None and s.resumable(now)]
        assert expected == [jobs[3].id, jobs[4].id]
        assert stale_sends(session, now=now) == expected
