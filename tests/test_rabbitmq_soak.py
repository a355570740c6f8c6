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
import time

import pytest
from sqlalchemy import create_engine, func, select

from tests.test_faults import assert_nothing_lost, submit_ids, wait_statuses
from tests.test_worker_loss import TERMINAL, on_broker, start_gpu
from tubesum.models import Batch

pytestmark = pytest.mark.slow

SOAK_ROUNDS = 20
STALL_LIMIT_S = 10.0
VIDEOS = 1500  # enough work for every round
SAMPLE_S = 0.2  # how often the batch rows are looked at, seconds


@pytest.fixture
def db(db_url: str):
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def rabbit_env(request: pytest.FixtureRequest, env: dict[str, str]) -> dict[str, str]:
    request.param = "rabbitmq"
    return on_broker(request, env)


def batches_stored(db) -> int:
    with db.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Batch))


def test_killing_and_replacing_a_gpu_worker_twenty_times_on_rabbitmq_never_stalls(
    rabbit_env, db, start_worker, wait_until, tiny_model_dir
):
    env = rabbit_env
    live = [start_gpu(start_worker, env, "soak-0", tiny_model_dir, slow_s=0, chunk_size=8)]
    job_id = submit_ids([f"soak{i:07d}" for i in range(VIDEOS)], env, transcripts=True)
    last_count, last_change, longest = batches_stored(db), time.monotonic(), 0.0

    def watch(until: float) -> None:
        nonlocal last_count, last_change, longest
        while time.monotonic() < until:
            count, now = batches_stored(db), time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            longest = max(longest, now - last_change)
            assert now - last_change < STALL_LIMIT_S, f"no chunk stored for {now - last_change:.1f}s"
            time.sleep(SAMPLE_S)

    for round_ in range(1, SOAK_ROUNDS + 1):
        live.append(start_gpu(start_worker, env, f"soak-{round_}", tiny_model_dir, slow_s=0, chunk_size=8))
        oldest = live.pop(0)
        os.killpg(oldest.proc.pid, signal.SIGKILL)
        oldest.proc.wait(timeout=10)
        watch(time.monotonic() + 2.0)
    killed_done = wait_statuses  # the rest of the job on the last worker
    killed_done(wait_until, db, job_id, TERMINAL, timeout=600)
    assert_nothing_lost(db, job_id, done=VIDEOS)
    print(f"{SOAK_ROUNDS} kills on RabbitMQ: longest time without a stored chunk {longest:.1f}s")
