"""A PostgreSQL outage delays summarising and fetching, it does not fail them (issue 18, item 4).

A real GPU worker (tiny model, CPU), or a real fetch worker (`tubesum worker fetch`, prefork,
YouTube replayed), reaches PostgreSQL through a TCP proxy that the test takes down for OUTAGE_S
while the worker's messages wait: every video is done (fetched) once the database is back, none
failed, and the worker says once that the database is unreachable. Before, summarise claims
retried five times two seconds apart and then failed the task, acknowledging its message; fetch
tasks logged and resent a retry per message and database error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url

from tests.conftest import HOSTNAME
from tests.pg_proxy import PgProxy
from tests.test_faults import REPO, assert_nothing_lost, in_state, submit_ids, wait_statuses
from tests.test_worker_loss import TERMINAL, start_gpu
from tests.worker_fixtures import REPLAY_SITECUSTOMIZE
from tests.youtube_replay import REPLAY_ENV
from tubesum.models import Video

pytestmark = pytest.mark.slow

OUTAGE_S = 20.0  # longer than the old claim retries (5 x 2 s)
VIDEOS = 8
# A recorded fetch's watch page comes this late, seconds: the outage starts with fetches in flight.
SLOW_FETCH_S = 3.0


@pytest.fixture
def db(db_url: str):
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def proxied_env(env, db_url: str, proxy):  # type: ignore[no-untyped-def]
    """``env`` for a worker that reaches PostgreSQL through ``proxy``; no reconcile pass resends a
    video within the test, so the messages themselves must survive."""
    proxied = make_url(db_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    return {**env, "TUBESUM_DATABASE_URL": proxied, "TUBESUM_STUCK_AFTER_S": "600"}


@pytest.fixture
def proxy(db_url: str):
    url = make_url(db_url)
    proxy = PgProxy(target_host=url.host or "127.0.0.1", target_port=url.port or 5432)
    yield proxy
    proxy.close()


def test_queued_summarise_messages_wait_out_a_database_outage(
    env, proxied_env, db, proxy, start_worker, wait_until, tiny_model_dir
):
    worker = start_gpu(start_worker, proxied_env, "gpu-a", tiny_model_dir, slow_s=0)
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


def replayed(env: dict[str, str], tmp_path: Path, *, slow_s: float) -> dict[str, str]:
    """``env`` in which every Python process answers YouTube from recordings, each watch page
    ``slow_s`` late: `tubesum worker fetch` itself, not a test app, runs the fetches."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(REPLAY_SITECUSTOMIZE)
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"default": "slow", "slow_s": slow_s}))
    return {**env, "PYTHONPATH": f"{site}:{env['PYTHONPATH']}", REPLAY_ENV: str(replay)}


def test_fetch_messages_wait_out_a_database_outage(env, proxied_env, db, proxy, start_worker, wait_until, tmp_path):
    """Two fetches in flight when the database goes away (their transcripts are stored once it is
    back, not thrown away) and the rest queued behind them: all fetched, none failed, one outage
    line for the worker's two prefork children and its reconcile pass together."""
    worker = start_worker(
        env=replayed(proxied_env, tmp_path, slow_s=SLOW_FETCH_S),
        cwd=REPO,
        name="fetch-a",
        argv=["tubesum", "worker", "fetch", "--concurrency", "2", "--name", "fetch-a@%h"],
    )
    ids = [f"fgout{i:06d}" for i in range(VIDEOS)]
    job_id = submit_ids(ids, env)
    wait_until(lambda: len(in_state(db, job_id, "fetching")) == 2, message="two fetches in flight")
    with db.connect() as conn:  # the leases name the worker as started (--name), not just its host
        owners = set(conn.scalars(select(Video.lease_owner).where(Video.status == "fetching")))
    assert owners == {f"fetch-a@{HOSTNAME}"}
    proxy.down()
    time.sleep(OUTAGE_S)
    assert len(in_state(db, job_id, "queued")) == VIDEOS - 2 and not in_state(db, job_id, "failed")
    proxy.up()
    back = time.monotonic()
    wait_statuses(wait_until, db, job_id, ("fetched", "failed"), timeout=60)
    done_s = time.monotonic() - back
    assert_nothing_lost(db, job_id, done=VIDEOS, summarised=False)
    log = worker.log()
    assert log.count("database unreachable (") == 1, log[-3000:]
    assert "database reachable again" in log
    assert "retrying in" not in log and "handed back" not in log and "Traceback" not in log, log[-3000:]
    print(f"{VIDEOS} videos fetched {done_s:.1f}s after a {OUTAGE_S:.0f}s outage; one outage line")
