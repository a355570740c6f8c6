"""End to end on the embedded mode: `tubesum run` with the tiny model over 20 CSV transcripts.

No service: a SQLite file and the filesystem broker in the working directory, a fetch worker and a
summarise worker started (and stopped) by `tubesum run`, the export written at the end.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tubesum.models import Batch, Summary, Video

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 300
VIDEOS = 20
CHUNK = 8
EXPORT_SUMMARY_COLUMNS = (
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
TIMING_COLUMNS = (
    "worker_host",
    "devices",
    "model",
    "dtype",
    "attn_implementation",
    "engine",
    "chunk_size",
    "batch_size",
    "prompt_tokens",
    "padded_prompt_tokens",
    "generated_tokens",
    "prefill_s",
    "decode_s",
    "wall_s",
    "generated_tokens_per_s",
    "status",
    "started_at",
    "ended_at",
)
FACTS = [
    "Octopuses have three hearts and blue blood.",
    "Bees dance to tell their sisters where the flowers are.",
    "The blue whale is the largest animal that has ever lived.",
    "Trees talk to each other through fungi.",
]


def test_run_twenty_videos_with_the_tiny_model(env, tmp_path, tiny_model_dir):
    rows = [
        (f"video{i:06d}", " ".join(FACTS[(i + k) % 4] for k in range(1 + i % 3)), f"Video {i}") for i in range(VIDEOS)
    ]
    with (tmp_path / "transcripts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "transcript", "title"])
        writer.writerows(rows)
    # A user's own modules named like tubesum's folders or its dependencies must not shadow them in
    # any process: the console script and its workers (-P) never import from the working directory.
    for shadow in ("models.py", "producer.py", "migrations.py", "workers/__init__.py", "tubesum.py", "celery.py"):
        (tmp_path / shadow).parent.mkdir(exist_ok=True)
        (tmp_path / shadow).write_text("raise ImportError('the user's own module was imported')\n")
    run_env = {
        k: v for k, v in env.items() if k not in ("TUBESUM_BROKER_URL", "TUBESUM_DATABASE_URL", "TUBESUM_EMBEDDED_DIR")
    }
    # A generous chunk wait: the first two chunks fill up on a slow machine too.
    run_env.update(TUBESUM_MAX_NEW_TOKENS="24", TUBESUM_DEVICE_MAP="cpu", TUBESUM_CHUNK_WAIT_S="4")
    export = tmp_path / "out.csv"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "tubesum"),
            "run",
            "--transcripts",
            "transcripts.csv",
            "--model",
            str(tiny_model_dir),
            "--chunk-size",
            str(CHUNK),
            "-o",
            str(export),
            "--timeout",
            str(RUN_TIMEOUT_S - 60),
        ],
        env=run_env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / ".tubesum" / "logs").glob("*.log"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    assert f"{VIDEOS} summarised" in result.stdout

    engine = create_engine(f"sqlite:///{tmp_path / 'tubesum.db'}")
    with Session(engine) as session:
        summaries = session.scalars(select(Summary)).all()
        batches = session.scalars(select(Batch).order_by(Batch.started_at)).all()
        videos = session.scalars(select(Video)).all()
    engine.dispose()
    assert len(summaries) == VIDEOS and all(v.status == "done" for v in videos)
    assert [b.batch_size for b in batches] == [CHUNK, CHUNK, VIDEOS - 2 * CHUNK], logs
    for b in batches:
        assert all(getattr(b, c) is not None for c in TIMING_COLUMNS), b.__dict__
        assert b.status == "ok" and b.engine == "fast" and b.chunk_size == CHUNK
    assert all(s.queue_wait_s is not None and s.latency_s is not None for s in summaries)

    with export.open() as f:
        exported = list(csv.DictReader(f))
    assert [r["video_id"] for r in exported] == [r[0] for r in rows]
    for r in exported:
        assert all(r[c] != "" for c in EXPORT_SUMMARY_COLUMNS if c != "summary"), r
        assert r["model"] == str(tiny_model_dir) and int(r["batch_size"]) in (CHUNK, VIDEOS - 2 * CHUNK)
        assert float(r["batch_seconds"]) > 0 and float(r["latency_s"]) >= float(r["queue_wait_s"]) >= 0

    # The report of the same job, from the same SQLite file.
    report = subprocess.run(
        [str(Path(sys.executable).parent / "tubesum"), "report", "1", "-o", "report"],
        env=run_env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    with (tmp_path / "report" / "batches.csv").open() as f:
        assert [int(r["batch_size"]) for r in csv.DictReader(f)] == [CHUNK, CHUNK, VIDEOS - 2 * CHUNK]
    assert (tmp_path / "report" / "tokens_per_s_by_batch_size.png").stat().st_size > 0
    assert (tmp_path / "report" / "latency_histogram.png").stat().st_size > 0
