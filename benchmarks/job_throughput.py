"""Job-level throughput of one finished job, from the database the worker wrote.

    python benchmarks/job_throughput.py DATABASE_URL [JOB_ID]

Prints one JSON object: videos done / failed, out-of-memory batch rows, the job's summaries/s
from the first enqueue (the earliest `fetched_at`: with --transcripts a video is enqueued for the
GPU as it is recorded) to the last commit (the latest `done_at`), and the steady-state rate
(videos of every ok batch after the first, over the time from the first batch's end to the last
batch's end: start-up and the first chunk's wait left out). `steady_full_chunks_summaries_per_s`
also leaves out a last chunk smaller than the others (the job's remainder, e.g. 96 of a 1,024-video
job at chunks of ~310): what a long job runs at, chunk after chunk.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime

from sqlalchemy import create_engine, select

from tubesum.models import Batch, Video

# A last chunk below this share of the largest is the job's remainder, not a steady-state chunk.
FULL_CHUNK_SHARE = 0.9


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def job_throughput(url: str, job_id: int | None = None) -> dict:
    engine = create_engine(url)
    with engine.connect() as conn:
        if job_id is None:
            job_id = conn.execute(select(Video.job_id).order_by(Video.job_id.desc()).limit(1)).scalar_one()
        videos = conn.execute(select(Video.status, Video.fetched_at, Video.done_at).where(Video.job_id == job_id)).all()
        batches = conn.execute(
            select(Batch.batch_size, Batch.status, Batch.started_at, Batch.ended_at, Batch.worker_host).order_by(
                Batch.started_at
            )
        ).all()
    done = [v for v in videos if v.status == "done"]
    ok = [b for b in batches if b.status == "ok"]
    out = {
        "job": job_id,
        "videos": len(videos),
        "done": len(done),
        "failed": sum(1 for v in videos if v.status == "failed"),
        "oom_batches": sum(1 for b in batches if b.status == "oom"),
        "batch_sizes": [b.batch_size for b in ok],
    }
    if done:
        first = min(v.fetched_at for v in videos if v.fetched_at)
        last = max(v.done_at for v in done)
        out["job_s"] = round(_seconds(first, last), 2)
        out["job_summaries_per_s"] = round(len(done) / _seconds(first, last), 2)
    if len(ok) > 1:
        span = _seconds(ok[0].ended_at, ok[-1].ended_at)
        out["steady_summaries_per_s"] = round(sum(b.batch_size for b in ok[1:]) / span, 2)
        full = ok[:-1] if ok[-1].batch_size < FULL_CHUNK_SHARE * max(b.batch_size for b in ok) else ok
        if len(full) > 1:
            full_span = _seconds(full[0].ended_at, full[-1].ended_at)
            out["steady_full_chunks_summaries_per_s"] = round(sum(b.batch_size for b in full[1:]) / full_span, 2)
        out["mean_batch_wall_s"] = round(sum(_seconds(b.started_at, b.ended_at) for b in ok) / len(ok), 2)
    if ok and done:
        # Warm job-level rate: from the first chunk's start (every worker has loaded its model by
        # then, or is about to: the skew is part of this figure) to the last commit.
        warm = _seconds(ok[0].started_at, max(v.done_at for v in done))
        out["warm_job_summaries_per_s"] = round(len(done) / warm, 2) if warm > 0 else None
        out["workers"] = per_worker(ok)
    return out


def per_worker(ok: list) -> dict[str, dict]:
    """Each worker's chunks, its own steady rate (chunks after its first, over its own span), and
    when it started and finished relative to the first chunk of the job: start-up skew and the
    end-of-job tail are the gaps between workers' first starts and last ends."""
    t0 = ok[0].started_at
    out: dict[str, dict] = {}
    for host in sorted({b.worker_host for b in ok}):
        mine = [b for b in ok if b.worker_host == host]
        entry = {
            "chunks": len(mine),
            "videos": sum(b.batch_size for b in mine),
            "first_start_s": round(_seconds(t0, mine[0].started_at), 2),
            "last_end_s": round(_seconds(t0, mine[-1].ended_at), 2),
            "busy_s": round(sum(_seconds(b.started_at, b.ended_at) for b in mine), 2),
        }
        if len(mine) > 1:
            span = _seconds(mine[0].ended_at, mine[-1].ended_at)
            entry["steady_summaries_per_s"] = round(sum(b.batch_size for b in mine[1:]) / span, 2) if span > 0 else None
        out[host] = entry
    return out


if __name__ == "__main__":
    print(json.dumps(job_throughput(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)))
