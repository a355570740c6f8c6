"""A long transcript neither blocks a GPU worker nor hides (issue 18, item 5), with a real GPU
worker process (tiny model, CPU), PostgreSQL and Redis: a transcript over
TUBESUM_MAX_TRANSCRIPT_CHARS fails with that reason; one in map-reduce is listed by `tubesum
status` while it runs, with where it stands; videos sent with it finish first.
"""

from __future__ import annotations

import csv as csv_module
import subprocess
import sys
from pathlib import Path

import kombu
import pytest

from tests.test_faults import REPO, in_state, wait_statuses
from tests.test_summarise_worker import SENTENCES
from tests.test_worker_loss import TERMINAL, start_gpu
from tubesum.celery_app import create_app
from tubesum.settings import Settings

pytestmark = pytest.mark.slow

MAX_CHARS = 30_000  # TUBESUM_MAX_TRANSCRIPT_CHARS of the worker
LONG = " ".join(SENTENCES) * 60  # ~26,000 chars: many pieces on the tiny model, under MAX_CHARS
TOO_LONG = "word " * (MAX_CHARS // 5 + 1)


@pytest.fixture
def db(db_url: str):
    from sqlalchemy import create_engine

    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def submit_transcripts(env: dict[str, str], rows: dict[str, str], tmp_path: Path) -> int:
    from tubesum.producer.submit import submit

    csv = tmp_path / "transcripts.csv"
    with csv.open("w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["video_id", "transcript"])
        writer.writerows(rows.items())
    settings = Settings(**{k[len("TUBESUM_") :].lower(): v for k, v in env.items() if k.startswith("TUBESUM_")})
    kombu.pools.reset()
    return submit([], transcripts_csv=csv, settings=settings, celery_app=create_app(settings))


def status(env: dict[str, str], job_id: int) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "status", str(job_id)],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_lists_a_long_map_reduce_and_a_too_long_transcript_fails_with_its_reason(
    env, db, start_worker, wait_until, tiny_model_dir, tmp_path
):
    worker_env = {**env, "TUBESUM_MAX_TRANSCRIPT_CHARS": str(MAX_CHARS)}
    start_gpu(start_worker, worker_env, "gpu-a", tiny_model_dir, slow_s=1, chunk_size=8)
    rows = {"longvideo01": LONG, "toolong0001": TOO_LONG, "small000001": SENTENCES[0], "small000002": SENTENCES[1]}
    job_id = submit_transcripts(env, rows, tmp_path)
    wait_until(lambda: "long transcripts in map-reduce" in status(env, job_id), message="status lists the long video")
    shown = status(env, job_id)
    assert "longvideo01" in shown and "pieces" in shown
    wait_statuses(wait_until, db, job_id, TERMINAL, timeout=180)
    assert sorted(in_state(db, job_id, "done")) == ["longvideo01", "small000001", "small000002"]
    assert in_state(db, job_id, "failed") == ["toolong0001"]
    final = status(env, job_id)
    assert "TUBESUM_MAX_TRANSCRIPT_CHARS" in final and "map-reduce" not in final
