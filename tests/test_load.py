"""Load: a 2,000-video job from a transcripts CSV through `tubesum run` on Redis and PostgreSQL,
with real worker processes and the tiny CPU model (short transcripts, a few new tokens: GPU time
made tiny so the queue and the database do most of the work). Nothing lost, nothing done twice.

It asserts completion only, never timing; the per-video overhead of the queue and the database is
measured by benchmarks/pipeline_overhead.py (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tubesum.models import Batch, Summary, Video

pytestmark = pytest.mark.slow

VIDEOS = 2000
CHUNK = 64
MAX_NEW_TOKENS = 4
# Bounds of the whole `tubesum run` and of its wait for the job, seconds (it takes ~1 minute on 2 cores).
RUN_TIMEOUT_S = 420
JOB_TIMEOUT_S = 360
WORDS = ["owls", "bees", "whales", "ferns", "moss", "rivers", "stars", "seeds", "fungi", "foxes"]


def write_transcripts(path: Path) -> list[str]:
    ids = [f"load{i:05d}" for i in range(VIDEOS)]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "transcript"])
        for i, vid in enumerate(ids):
            w.writerow([vid, f"Video {i} is about {WORDS[i % 10]} and {WORDS[(i // 10) % 10]}."])
    return ids


def test_two_thousand_videos_nothing_lost(env, db_session, tmp_path, tiny_model_dir):
    ids = write_transcripts(tmp_path / "load.csv")
    env.update(TUBESUM_DEVICE_MAP="cpu", TUBESUM_CHUNK_WAIT_S="0.5")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tubesum.cli",
            "run",
            "--transcripts",
            "load.csv",
            "--model",
            str(tiny_model_dir),
            "--chunk-size",
            str(CHUNK),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "-o",
            "export.csv",
            "--timeout",
            str(JOB_TIMEOUT_S),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in (tmp_path / ".tubesum" / "logs").glob("*.log"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    assert f"{VIDEOS} summarised, 0 awaiting summary, 0 failed of {VIDEOS}" in result.stdout

    # Every video done, exactly one summary each, and each generated exactly once.
    statuses = dict(db_session.execute(select(Video.status, func.count()).group_by(Video.status)).all())
    assert statuses == {"done": VIDEOS}
    assert sorted(db_session.scalars(select(Video.video_id))) == ids
    assert db_session.scalar(select(func.count(func.distinct(Summary.video_pk)))) == VIDEOS
    assert db_session.scalar(select(func.count()).select_from(Summary)) == VIDEOS
    assert db_session.scalar(select(func.sum(Batch.batch_size)).where(Batch.status == "ok")) == VIDEOS
    with (tmp_path / "export.csv").open(newline="") as f:
        exported = list(csv.DictReader(f))
    assert [r["video_id"] for r in exported] == ids and all(r["status"] == "done" for r in exported)
