"""`tubesum report`: batches.csv, the plots and the table, from rows in PostgreSQL."""

from __future__ import annotations

import csv
from datetime import timedelta

from typer.testing import CliRunner

from tests.factories import batch_row
from tubesum.cli import app as cli
from tubesum.models import Batch, Job, Summary, Video
from tubesum.models.base import utcnow
from tubesum.read.report import write_report

PNG_MAGIC = b"\x89PNG"


def batch(batch_id: str, *, at, size: int, status: str = "ok", host: str = "gpu1", oom_split: bool = False) -> Batch:
    wall = 0.5 * size
    return batch_row(
        id=batch_id,
        worker_host=host,
        devices="cuda:0",
        model="m",
        batch_size=size,
        generated_tokens=0 if status == "oom" else 50 * size,
        decode_s=wall - 0.1,
        wall_s=wall,
        generated_tokens_per_s=0.0 if status == "oom" else 100.0 * size**0.5,
        oom_split=oom_split,
        status=status,
        note="out of memory" if status == "oom" else None,
        started_at=at,
        ended_at=at + timedelta(seconds=wall),
    )


def make_job(session) -> int:
    t0 = utcnow()
    job = Job(sources=["x"], model="m", created_at=t0)
    other = Job(sources=["y"], model="m", created_at=t0)
    session.add_all([job, other])
    rows = [
        batch("oom8", at=t0 + timedelta(seconds=1), size=8, status="oom"),
        batch("ok4a", at=t0 + timedelta(seconds=2), size=4, oom_split=True),
        batch("ok4b", at=t0 + timedelta(seconds=5), size=4, oom_split=True),
        batch("map3", at=t0 + timedelta(seconds=8), size=3),  # map pieces: no summary points here
        batch("red1", at=t0 + timedelta(seconds=10), size=1),
        batch("elsewhere", at=t0 + timedelta(seconds=3), size=2, host="gpu2"),  # another worker, another job
    ]
    session.add_all(rows)
    by_batch = ["ok4a"] * 4 + ["ok4b"] * 4 + ["red1"]
    for i, batch_id in enumerate(by_batch):
        video = Video(job=job, video_id=f"v{i}", position=i, status="done", queued_at=t0)
        session.add(video)
        session.add(
            Summary(
                video=video,
                batch_id=batch_id,
                text="s",
                model="m",
                prompt_tokens=100,
                generated_tokens=50,
                finish_reason="stop",
                pieces=3 if batch_id == "red1" else 1,
                queue_wait_s=1.0,
                latency_s=3.0 + i,
            )
        )
    video = Video(job=other, video_id="w", position=0, status="done", queued_at=t0)
    session.add(video)
    session.add(
        Summary(
            video=video,
            batch_id="elsewhere",
            text="s",
            model="m",
            prompt_tokens=1,
            generated_tokens=1,
            finish_reason="stop",
            latency_s=99.0,
        )
    )
    session.commit()
    return job.id


def test_write_report(db_session, tmp_path):
    job_id = make_job(db_session)
    report = write_report(db_session, job_id, tmp_path / "out")
    with (tmp_path / "out" / "batches.csv").open() as f:
        rows = list(csv.DictReader(f))
    # Every stored field of a batch, and how many of the job's videos it finished.
    assert set(rows[0]) == {c.key for c in Batch.__table__.columns} | {"videos_finished"}
    assert [r["id"] for r in rows] == ["oom8", "ok4a", "ok4b", "map3", "red1"]
    assert [r["videos_finished"] for r in rows] == ["0", "4", "4", "0", "1"]
    assert rows[0]["status"] == "oom" and rows[1]["oom_split"] == "True" and rows[0]["started_at"]
    assert [(s.batch_size, s.batches) for s in report.by_size] == [(1, 1), (3, 1), (4, 2)]
    assert report.latencies_s == [3.0 + i for i in range(9)] and report.oom_batches == 1
    for name in ("tokens_per_s_by_batch_size.png", "latency_histogram.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_report_command(settings, db_session, tmp_path):
    job_id = make_job(db_session)
    result = CliRunner().invoke(cli, ["report", str(job_id), "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "5 batches (1 out of memory)" in result.output and "median" in result.output
    assert (tmp_path / "r" / "batches.csv").exists()
    missing = CliRunner().invoke(cli, ["report", "999999", "-o", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "no job 999999" in missing.output
