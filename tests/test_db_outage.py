"""A PostgreSQL outage delays summarising, it does not fail it (issue 18, item 4).

A real GPU worker (tiny model, CPU) reaches PostgreSQL through a TCP proxy that the test takes
down for OUTAGE_S while the worker's messages wait: every video is done once the database is back,
none failed, and the worker says once that the database is unreachable. Before, claims retried
five times two seconds apart and then failed the task, acknowledging its message.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from tests.pg_proxy import PgProxy
from tests.test_faults import assert_nothing_lost, in_state, submit_ids, wait_statuses
from tests.test_worker_loss import TERMINAL, start_gpu

pytestmark = pytest.mark.slow

OUTAGE_S = 20.0  # longer than the old claim retries (5 x 2 s)
VIDEOS = 8


@pytest.fixture
def db(db_url: str):
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def proxy(db_url: str):
    url = make_url(db_url)
    proxy = PgProxy(target_host=url.host or "127.0.0.1", target_port=url.port or 5432)
    yield proxy
    proxy.close()


def test_queued_summarise_messages_wait_out_a_database_outage(
    env, db, db_url, proxy, start_worker, wait_until, tiny_model_dir
):
    proxied = make_url(db_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # No reconcile pass resends a video within the test: the messages themselves must survive.
    worker_env = {**env, "TUBESUM_DATABASE_URL": proxied, "TUBESUM_STUCK_AFTER_S": "600"}
    worker = start_gpu(start_worker, worker_env, "gpu-a", tiny_model_dir, slow_s=0)
    proxy.down()
    job_id = submit_ids([f"pgout{i:06d}" for i in range(VIDEOS)], env, transcripts=True)  # straight to PostgreSQL
    time.sleep(OUTAGE_S)
    assert sorted(in_state(db, job_id, "fetched")) == sorted(f"pgout{i:06d}" for i in range(VIDEOS))
    proxy.up()
    back = time.monotonic()
    wait_statuses(wait_until, db, job_id, TERMINAL, timeout=60)
    done_s = time.monotonic() - back
    assert_nothing_lost(db, job_id, done=VIDEOS)
    log = worker.log()
    assert log.count("database unreachable (") == 1, log[-3000:]
    assert "database reachable again" in log
    print(f"{VIDEOS} videos done {done_s:.1f}s after a {OUTAGE_S:.0f}s outage; one outage line")
