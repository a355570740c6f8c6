"""Nothing dies of one bad entry, and a worker that does die says so (issue 18, items 2 and 3).

Real worker processes on the machine's Redis (a database number of this session) and PostgreSQL:
a raw entry that is not a Celery message on the ``transcripts`` or ``summarise`` queue is logged,
set aside in ``<queue>.malformed`` and the worker goes on; a worker stopped by an error exits
non-zero; a GPU worker that abandons its running chunk exits with EXIT_CHUNK_ABANDONED, no SIGABRT.
"""

from __future__ import annotations

import json
import signal

import pytest
import redis

from tests.test_faults import REPO, assert_nothing_lost, in_state, submit_ids, wait_statuses
from tests.test_worker_loss import TERMINAL, chunk_started, start_gpu
from tests.youtube_replay import fetch_worker_argv
from tubesum.broker_redis import MALFORMED_SUFFIX
from tubesum.celery_app import SUMMARISE_QUEUE, TRANSCRIPTS_QUEUE
from tubesum.workers.exit_codes import EXIT_CHUNK_ABANDONED, EXIT_FAILURE, EXIT_OK

pytestmark = pytest.mark.slow

# Entries a person or a broken script could push onto a queue by hand.
MALFORMED = ["not json", "[1, 2]", json.dumps({"body": "x"}), json.dumps({"properties": {}})]
SIGABRT_LINE = "terminate called"


@pytest.fixture
def db(db_url: str):
    from sqlalchemy import create_engine

    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def push_raw(redis_url: str, queue: str, entries: list[str]) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for entry in entries:
            client.lpush(queue, entry)
    finally:
        client.close()


def set_aside(redis_url: str, queue: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return sorted(v.decode() for v in client.lrange(queue + MALFORMED_SUFFIX, 0, -1))
    finally:
        client.close()


def test_malformed_entries_on_the_transcripts_queue_are_set_aside_and_the_fetch_worker_goes_on(
    fault_env, db, redis_url, start_worker, wait_until
):
    worker = start_worker(env=fault_env, cwd=REPO, name="fetch-a", argv=fetch_worker_argv("fetch-a"))
    push_raw(redis_url, TRANSCRIPTS_QUEUE, MALFORMED)
    wait_until(lambda: len(set_aside(redis_url, TRANSCRIPTS_QUEUE)) == len(MALFORMED), message="entries set aside")
    job_id = submit_ids([f"malf{i:07d}" for i in range(3)], fault_env)
    wait_statuses(wait_until, db, job_id, ("fetched", "failed"))
    assert worker.is_running()
    assert set_aside(redis_url, TRANSCRIPTS_QUEUE) == sorted(MALFORMED)
    assert worker.log().count("not a Celery message") == len(MALFORMED)
    assert "Unrecoverable error" not in worker.log()


def test_a_malformed_entry_on_the_summarise_queue_is_set_aside_and_the_gpu_worker_goes_on(
    fault_env, db, redis_url, start_worker, wait_until, tiny_model_dir
):
    worker = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=0)
    push_raw(redis_url, SUMMARISE_QUEUE, ["not json"])
    wait_until(lambda: set_aside(redis_url, SUMMARISE_QUEUE) == ["not json"], message="entry set aside")
    job_id = submit_ids([f"malg{i:07d}" for i in range(4)], fault_env, transcripts=True)
    wait_statuses(wait_until, db, job_id, TERMINAL)
    assert_nothing_lost(db, job_id, done=4)
    assert worker.is_running()


def test_a_worker_stopped_by_an_error_exits_non_zero(fault_env, redis_url, start_worker, tiny_model_dir):
    """A queue key of the wrong type makes every BRPOP fail: Celery stops the worker ("Unrecoverable
    error"), and `tubesum worker summarise` must not exit 0 (restart policies would read a clean
    stop)."""
    worker = start_gpu(start_worker, fault_env, "gpu-b", tiny_model_dir, slow_s=0)
    client = redis.Redis.from_url(redis_url)
    client.set(SUMMARISE_QUEUE, "a string, not a list")
    client.close()
    worker.proc.wait(timeout=60)
    assert "Unrecoverable error" in worker.log()
    assert worker.proc.returncode == EXIT_FAILURE


@pytest.mark.parametrize("how", ["second-sigterm", "grace-over"])
def test_abandoning_the_running_chunk_exits_with_its_code_and_no_sigabrt(
    how, fault_env, db, redis_url, start_worker, wait_until, tiny_model_dir
):
    grace = {"TUBESUM_HANDBACK_GRACE_S": "2" if how == "grace-over" else "25"}
    worker = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=40, **grace)
    job_id = submit_ids([f"abnd{i:07d}" for i in range(4)], fault_env, transcripts=True)
    wait_until(
        lambda: len(in_state(db, job_id, "summarising")) == 4 and chunk_started(worker, 4), message="a chunk running"
    )
    worker.proc.send_signal(signal.SIGTERM)
    if how == "second-sigterm":
        wait_until(lambda: "handing back" in worker.log(), message="first SIGTERM seen")
        worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(timeout=30)
    assert SIGABRT_LINE not in worker.log()
    assert worker.proc.returncode == EXIT_CHUNK_ABANDONED, worker.log()[-2000:]
    assert sorted(in_state(db, job_id, "fetched")) == sorted(f"abnd{i:07d}" for i in range(4))


def test_a_gpu_worker_that_finishes_its_chunk_after_sigterm_exits_zero(
    fault_env, db, start_worker, wait_until, tiny_model_dir
):
    worker = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=3)
    job_id = submit_ids([f"fin{i:08d}" for i in range(4)], fault_env, transcripts=True)
    wait_until(
        lambda: len(in_state(db, job_id, "summarising")) == 4 and chunk_started(worker, 4), message="a chunk running"
    )
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(timeout=60)
    assert worker.proc.returncode == EXIT_OK
    assert_nothing_lost(db, job_id, done=4)
