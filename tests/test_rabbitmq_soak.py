"""Soak (issue 18, item 1): on RabbitMQ, a GPU worker is killed and replaced SOAK_ROUNDS times
while a job runs; no worker hangs and the job never stalls. Real GPU worker processes (tiny model,
CPU), RabbitMQ (quorum queues, a virtual host of the session) and PostgreSQL.

Each round starts a replacement, waits until it is ready, then SIGKILLs the oldest worker: the
broker hands the dead worker's messages to the live ones at once. The longest time between two
stored chunks must stay under STALL_LIMIT_S (a hung worker held 64 messages for 73 s before).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import create_engine, func, select

from tests.test_faults import assert_nothing_lost, submit_ids, wait_statuses
from tests.test_worker_loss import TERMINAL, purge_rabbitmq, start_gpu
from tubesum.models import Batch, Video

pytestmark = pytest.mark.slow

SOAK_ROUNDS = 20
STALL_LIMIT_S = 10.0
BATCH_VIDEOS = 300  # videos a job; another job is sent whenever fewer than LOW_WATER remain
LOW_WATER = 150
SAMPLE_S = 0.2  # how often the batch rows are looked at, seconds


@pytest.fixture
def db(db_url: str):
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def rabbit_env(rabbitmq_url: str, env: dict[str, str]) -> dict[str, str]:
    purge_rabbitmq(rabbitmq_url)
    return {**env, "TUBESUM_BROKER_URL": rabbitmq_url}


def batches_stored(db) -> int:
    with db.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Batch))


def unfinished(db) -> int:
    with db.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Video).where(Video.status.not_in(TERMINAL)))


def test_killing_and_replacing_a_gpu_worker_twenty_times_on_rabbitmq_never_stalls(
    rabbit_env, db, start_worker, wait_until, tiny_model_dir
):
    env = rabbit_env
    live = [start_gpu(start_worker, env, "soak-0", tiny_model_dir, slow_s=0, chunk_size=8)]
    jobs: list[int] = []

    def keep_busy() -> None:
        if unfinished(db) < LOW_WATER:
            n = len(jobs)
            jobs.append(submit_ids([f"soak{n:02d}{i:05d}" for i in range(BATCH_VIDEOS)], env, transcripts=True))

    keep_busy()
    longest = [0.0]  # seconds without a stored chunk while videos waited, the longest seen
    stop = threading.Event()

    def sample() -> None:
        last_count, last_change = batches_stored(db), time.monotonic()
        while not stop.wait(SAMPLE_S):
            count, now = batches_stored(db), time.monotonic()
            if count != last_count or unfinished(db) == 0:
                last_count, last_change = count, now
            longest[0] = max(longest[0], now - last_change)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for round_ in range(1, SOAK_ROUNDS + 1):
            keep_busy()
            live.append(start_gpu(start_worker, env, f"soak-{round_}", tiny_model_dir, slow_s=0, chunk_size=8))
            oldest = live.pop(0)
            os.killpg(oldest.proc.pid, signal.SIGKILL)
            oldest.proc.wait(timeout=10)
            assert longest[0] < STALL_LIMIT_S, f"round {round_}: no chunk stored for {longest[0]:.1f}s"
    finally:
        stop.set()
        sampler.join()
    assert longest[0] < STALL_LIMIT_S
    for job_id in jobs:
        wait_statuses(wait_until, db, job_id, TERMINAL, timeout=600)  # the rest, on the last worker
        assert_nothing_lost(db, job_id, done=BATCH_VIDEOS)
    print(f"{SOAK_ROUNDS} kills on RabbitMQ, {len(jobs)} jobs: longest time without a stored chunk {longest[0]:.1f}s")
