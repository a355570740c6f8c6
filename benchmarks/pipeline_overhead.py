"""Per-video overhead of the queue and the database, next to GPU time.

Runs a real job on the configured Redis and PostgreSQL (TUBESUM_BROKER_URL, TUBESUM_DATABASE_URL):
a real `tubesum worker summarise` process with a model (default: the tiny dummy model on CPU, a
few new tokens), and N short transcripts submitted from a CSV the way `tubesum submit` does. Then:

- submit: recording the job and its videos (one transaction) and enqueueing one message per
  video, per video;
- pipeline: (wall time from the first message to the last summary committed) minus (the sum of the
  batches' generate() wall time), per video. That is everything that is not model time: Celery
  delivering and acknowledging the messages, the claims (one transaction per video), storing each
  chunk (one transaction), the Batcher's hand-offs, and any time the model sat idle waiting for
  work. It is the overhead a GPU would see, measured end to end.

    TUBESUM_BROKER_URL=redis://127.0.0.1:6379/9 \\
    TUBESUM_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/tubesum_bench \\
    python benchmarks/pipeline_overhead.py --videos 2000 --chunk-size 64

The database must exist (it is migrated here); the Redis database should be empty.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from sqlalchemy import func, select

from tubesum.celery_app import create_app
from tubesum.db import session_scope, upgrade
from tubesum.models import Batch, Summary, Video
from tubesum.producer.sources import inspect_transcripts_csv
from tubesum.producer.submit import record_job, send_job
from tubesum.settings import get_settings

# How long the worker may take to load its model and log "ready", seconds.
READY_TIMEOUT_S = 120
# How often the job's progress is polled, seconds.
POLL_S = 0.2
WORDS = ["owls", "bees", "whales", "ferns", "moss", "rivers", "stars", "seeds", "fungi", "foxes"]


def write_csv(path: Path, videos: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "transcript"])
        for i in range(videos):
            w.writerow([f"bench{i:06d}", f"Video {i} is about {WORDS[i % 10]} and {WORDS[(i // 10) % 10]}."])


def start_worker(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "tubesum.cli",
        "worker",
        "summarise",
        "--model",
        args.model,
        "--chunk-size",
        str(args.chunk_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--chunk-wait",
        str(args.chunk_wait),
        "--device-map",
        args.device_map,
        "--name",
        "bench@%h",
    ]
    proc = subprocess.Popen(argv, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while " ready." not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(POLL_S)
    return proc


def measure(args: argparse.Namespace) -> dict:
    settings = get_settings()
    upgrade(settings.database_url)
    work = Path(tempfile.mkdtemp(prefix="tubesum-overhead-"))
    write_csv(work / "t.csv", args.videos)
    worker = start_worker(args, work / "worker.log")
    try:
        csv_file = inspect_transcripts_csv(work / "t.csv")
        t0 = time.perf_counter()
        job_id = record_job([], csv_file, sources=[], settings=settings)
        t1 = time.perf_counter()
        send_job(job_id, settings=settings, celery_app=create_app(settings))
        t2 = time.perf_counter()
        while True:
            with session_scope(settings.database_url) as s:
                done = s.scalar(
                    select(func.count())
                    .select_from(Video)
                    .where(Video.job_id == job_id, Video.status.in_(("done", "failed")))
                )
            if done == args.videos:
                break
            time.sleep(POLL_S)
    finally:
        worker.terminate()
        worker.wait(60)
    with session_scope(settings.database_url) as s:
        last_done = s.scalar(select(func.max(Video.done_at)).where(Video.job_id == job_id))
        first_queued = s.scalar(select(func.min(Video.queued_at)).where(Video.job_id == job_id))
        batch_ids = select(Summary.batch_id).join(Video).where(Video.job_id == job_id)
        batches = s.execute(
            select(func.count(), func.sum(Batch.wall_s), func.sum(Batch.batch_size)).where(Batch.id.in_(batch_ids))
        ).one()
        summaries = s.scalar(select(func.count()).select_from(Summary).join(Video).where(Video.job_id == job_id))
    # From the moment the messages start going out (the rows are committed) to the last commit.
    enqueue_started = first_queued + dt.timedelta(seconds=t1 - t0)
    wall_s = (last_done - enqueue_started).total_seconds()
    gpu_s = float(batches[1])
    n = args.videos
    return {
        "videos": n,
        "summaries": summaries,
        "batches": batches[0],
        "chunk_size": args.chunk_size,
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "submit_record_ms_per_video": 1000 * (t1 - t0) / n,
        "submit_enqueue_ms_per_video": 1000 * (t2 - t1) / n,
        "job_wall_s": wall_s,
        "generate_wall_s": gpu_s,
        "pipeline_overhead_ms_per_video": 1000 * (wall_s - gpu_s) / n,
        "machine": f"{platform.processor() or platform.machine()}, {_cpus()} CPUs, {platform.system()} {platform.release()}",
        "versions": {p: version(p) for p in ("celery", "kombu", "redis", "sqlalchemy", "psycopg", "torch")},
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--model", default="dummy:tiny")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--chunk-wait", type=float, default=0.5)
    parser.add_argument("--device-map", default="cpu")
    result = measure(parser.parse_args())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
