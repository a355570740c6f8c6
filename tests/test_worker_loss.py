"""A lost worker costs a minute, not hours (issue 10): one bounded database pool per process,
leases on claimed videos renewed by the worker's heartbeat and returned by the reconcile pass that
runs inside the workers, hand-back of held messages on SIGTERM, and `tubesum retry`.

Real processes throughout: GPU workers on the tiny CPU model (``tests.slow_gpu_worker`` makes each
chunk slow enough to kill it mid-chunk), fetch workers answered by recorded YouTube responses,
the machine's PostgreSQL, Redis (a database number of this session) and, where parametrized,
RabbitMQ.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from tests.slow_gpu_worker import SLOW_CHUNK_ENV
from tests.test_faults import REPO, assert_nothing_lost, fault_env, gpu_worker_argv, in_state, submit_ids, wait_statuses  # noqa: F401
from tiny_model import tiny_model_dir  # noqa: F401  (fixture)
from tubesum.db import POOL_MAX_OVERFLOW, POOL_SIZE

TERMINAL = ("done", "failed")
# Sampling interval of pg_stat_activity while a worker runs, seconds.
SAMPLE_INTERVAL_S = 0.1


@pytest.fixture
def db(db_url: str):
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def connections_of(db, pid: int) -> int:
    """PostgreSQL connections opened by the process ``pid`` (tubesum names them after it)."""
    with db.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                           {"name": f"tubesum pid {pid}"})


@pytest.mark.slow
def test_a_gpu_worker_with_a_backlog_holds_a_bounded_pool(fault_env, db, start_worker, wait_until, tiny_model_dir):
    """Chunks of 8 (16 task threads claiming at once) and a backlog of 40 videos: the worker never
    holds more than POOL_SIZE + POOL_MAX_OVERFLOW connections (it held 20-35 when every thread
    built its own engine)."""
    env = {**fault_env, SLOW_CHUNK_ENV: "0.5"}
    worker = start_worker(env=env, cwd=REPO, name="gpu", argv=gpu_worker_argv("gpu", tiny_model_dir, chunk_size=8))
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_INTERVAL_S):
            samples.append(connections_of(db, worker.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        job_id = submit_ids([f"pool{i:07d}" for i in range(40)], env, transcripts=True)
        wait_statuses(wait_until, db, job_id, TERMINAL, timeout=90)
    finally:
        stop.set()
        sampler.join(timeout=10)
    assert_nothing_lost(db, job_id, done=40)
    assert max(samples) >= 1, "the worker's connections were not seen (application_name?)"
    assert max(samples) <= POOL_SIZE + POOL_MAX_OVERFLOW, samples
