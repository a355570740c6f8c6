"""Nothing lost: real worker processes killed, Redis restarted and PostgreSQL connections dropped
while a job runs, and every video still ends in exactly one terminal state with no duplicate rows.

Workers are real Celery processes (fetches answered by recorded YouTube responses, the GPU worker
on the tiny CPU model); Redis and PostgreSQL are the machine's, except the Redis-restart test, which
starts its own append-only redis-server so that restarting it disturbs nobody else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import kombu.pools
import psutil
import pytest
import redis
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from tests.own_redis import OwnRedis
from tests.slow_gpu_worker import SLOW_CHUNK_ENV
from tests.test_playlist import task_args
from tests.youtube_replay import REPLAY_ENV, fetch_worker_argv
from tubesum.celery_app import SUMMARISE_QUEUE, create_app
from tubesum.models import Job, Summary, Transcript, Video
from tubesum.models.base import utcnow
from tubesum.settings import Settings

# Every test here drives real worker processes and kills or restarts things.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("done", "failed")
# Pause between two rounds of pg_terminate_backend in the PostgreSQL test, seconds.
KILL_INTERVAL_S = 0.05
JOB_TIMEOUT_S = 60


# --- helpers ----------------------------------------------------------------------------------------


def gpu_worker_argv(name: str, model_dir: Path, *, chunk_size: int = 4) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.slow_gpu_worker",
        "--model",
        str(model_dir),
        "--chunk-size",
        str(chunk_size),
        "--chunk-wait",
        "0.3",
        "--max-new-tokens",
        "8",
        "--device-map",
        "cpu",
        "--name",
        f"{name}@%h",
    ]


@pytest.fixture
def db(db_url: str):
    """An engine that survives dropped connections (the PostgreSQL test kills them)."""
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def submit_ids(video_ids: list[str], env: dict[str, str], *, transcripts: bool = False) -> int:
    """``producer.submit`` in this process against ``env``'s broker and database."""
    from tubesum.producer.submit import submit

    settings = Settings(
        **{k[len("TUBESUM_") :].lower(): v for k, v in env.items() if k.startswith("TUBESUM_") and k != REPLAY_ENV}
    )
    kombu.pools.reset()
    if not transcripts:
        return submit(video_ids, settings=settings, celery_app=create_app(settings))
    csv = Path(env["TUBESUM_EMBEDDED_DIR"]).parent / "transcripts.csv"
    sentences = [
        "Octopuses have three hearts and blue blood.",
        "Bees dance to show where flowers are.",
        "The blue whale is the largest animal that ever lived.",
    ]
    csv.write_text(
        "video_id,transcript\n"
        + "".join(f"{vid},{sentences[i % 3]} {sentences[(i + 1) % 3]}\n" for i, vid in enumerate(video_ids))
    )
    return submit([], transcripts_csv=csv, settings=settings, celery_app=create_app(settings))


def statuses(db, job_id: int) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute(select(Video.video_id, Video.status).where(Video.job_id == job_id)).all())


def wait_statuses(wait_until, db, job_id: int, wanted: tuple[str, ...], timeout: float = JOB_TIMEOUT_S):
    def ready():
        try:
            now = statuses(db, job_id)
        except OperationalError:  # the PostgreSQL test drops this connection too
            return None
        return now if now and all(s in wanted for s in now.values()) else None

    return wait_until(ready, timeout=timeout, message=lambda: f"every video in {wanted}: {statuses(db, job_id)}")


def assert_nothing_lost(db, job_id: int, *, done: int, failed: int = 0, summarised: bool = True) -> None:
    """Exactly one terminal state per video, one transcript and at most one summary each."""
    with db.connect() as conn:
        rows = conn.execute(select(Video.id, Video.status, Video.error).where(Video.job_id == job_id)).all()
        pks = [r.id for r in rows]

        def per_video(table):  # rows of `table` per video of the job
            query = select(table.video_pk, func.count()).where(table.video_pk.in_(pks)).group_by(table.video_pk)
            return dict(conn.execute(query).all())

        transcripts, summaries = per_video(Transcript), per_video(Summary)
    final = "done" if summarised else "fetched"
    assert sorted(r.status for r in rows) == sorted([final] * done + ["failed"] * failed), rows
    assert all(r.error for r in rows if r.status == "failed"), rows
    assert set(transcripts.values()) <= {1} and set(summaries.values()) <= {1}
    ended = {r.id for r in rows if r.status == final}
    assert ended <= set(transcripts)
    if summarised:
        assert set(summaries) == ended
    else:
        assert not summaries


def summarise_messages(redis_url: str) -> list[int]:
    client = redis.Redis.from_url(redis_url)
    try:
        return sorted(task_args(json.loads(m))[0] for m in client.lrange(SUMMARISE_QUEUE, 0, -1))
    finally:
        client.close()


def fetched_pks(db, job_id: int) -> list[int]:
    with db.connect() as conn:
        return sorted(conn.scalars(select(Video.id).where(Video.job_id == job_id, Video.status == "fetched")))


def in_state(db, job_id: int, state: str) -> list[str]:
    return [vid for vid, s in statuses(db, job_id).items() if s == state]


# --- fetch workers ------------------------------------------------------------------------------------


def test_a_killed_fetch_child_is_retried_then_its_video_fails(fault_env, db, start_worker, wait_until, redis_url):
    """Prefork child SIGKILLed mid-fetch: Celery's worker-lost retry runs it again (same worker);
    a video whose child dies on every attempt fails after max_worker_lost_retries."""
    env = {**fault_env, "TUBESUM_FETCH_MAX_RETRIES": "0", "TUBESUM_MAX_WORKER_LOST_RETRIES": "1"}
    (json_path := Path(env[REPLAY_ENV])).write_text(json.dumps({"default": "slow", "slow_s": 2.0}))
    worker = start_worker(
        env=env, cwd=REPO, name="fetch", argv=fetch_worker_argv("fetch", pool="prefork", concurrency=1)
    )

    def kill_child_mid_fetch(job_id: int, attempt: int) -> None:
        """SIGKILL the pool child once it claimed the video for the ``attempt``-th time (its watch
        page takes 2 s to answer)."""

        def claimed():
            with db.connect() as conn:
                return conn.scalar(select(Video.attempts).where(Video.job_id == job_id)) == attempt

        wait_until(claimed, message=f"fetch attempt {attempt}")
        for child in psutil.Process(worker.proc.pid).children():
            child.send_signal(signal.SIGKILL)

    survivor = submit_ids(["survivor001"], env)
    kill_child_mid_fetch(survivor, 1)
    wait_statuses(wait_until, db, survivor, ("fetched",))
    doomed = submit_ids(["doomed00001"], env)
    kill_child_mid_fetch(doomed, 1)

    def held_for_retry():  # the dead child's lease gave up its owner: any worker may take the retry
        with db.connect() as conn:
            owner, until = conn.execute(
                select(Video.lease_owner, Video.lease_expires_at).where(Video.job_id == doomed)
            ).one()
        return owner is None and until is not None

    wait_until(held_for_retry, message="the lease released for the worker-lost retry")
    kill_child_mid_fetch(doomed, 2)  # the worker-lost retry dies too: retries exhausted
    wait_statuses(wait_until, db, doomed, ("failed",))

    assert_nothing_lost(db, survivor, done=1, summarised=False)
    assert_nothing_lost(db, doomed, done=0, failed=1, summarised=False)
    with db.connect() as conn:
        attempts = dict(conn.execute(select(Video.video_id, Video.attempts)).all())
        (error,) = conn.scalars(select(Video.error).where(Video.job_id == doomed))
    assert attempts == {"survivor001": 2, "doomed00001": 2}
    assert "worker process died" in error and "WorkerLostError" in error
    assert set(summarise_messages(redis_url)) == set(fetched_pks(db, survivor))
    assert "retry" in worker.log().lower()
    json_path.unlink()


def test_a_killed_fetch_worker_is_covered_by_the_reconciler(
    fault_env, db, start_worker, wait_until, redis_url, tmp_path
):
    """The whole fetch worker SIGKILLed mid-job (no WorkerLostError: the messages it held stay
    unacknowledged in Redis). Visibility timeout made long here so that the leases are what brings
    them back: the second worker's own reconcile pass returns the two videos whose leases ran out."""
    env = {**fault_env, "TUBESUM_VISIBILITY_TIMEOUT_S": "600"}
    first = start_worker(env=env, cwd=REPO, name="fetch-a", argv=fetch_worker_argv("fetch-a"))
    ids = [f"killfetch{i:02d}" for i in range(6)]
    job_id = submit_ids(ids, env)
    wait_until(lambda: len(in_state(db, job_id, "fetching")) == 2, message="two fetches in progress")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    second = start_worker(env=env, cwd=REPO, name="fetch-b", argv=fetch_worker_argv("fetch-b"))
    wait_statuses(wait_until, db, job_id, ("fetched", "failed"))
    assert_nothing_lost(db, job_id, done=6, summarised=False)
    with db.connect() as conn:
        expiries = dict(conn.execute(select(Video.video_id, Video.lease_expiries).where(Video.job_id == job_id)).all())
    assert sorted(expiries.values()) == [0] * 4 + [1] * 2, expiries  # the two the dead worker held
    assert "ran out in 'fetching'" in second.log()
    assert set(summarise_messages(redis_url)) == set(fetched_pks(db, job_id))


def test_reconcile_resends_lost_messages_and_gives_up_on_loops(
    fault_env, db, start_worker, wait_until, redis_url, tmp_path
):
    """Messages never sent (producer died mid-enqueue; fetch worker died between commit and send),
    a video whose worker died too often, and an in-flight video under a live lease, left alone.
    `tubesum reconcile` by hand: the worker's own pass is off here."""
    env = {**fault_env, "TUBESUM_RECONCILE_EVERY_S": "0"}
    old = utcnow() - timedelta(seconds=60)
    with db.begin() as conn:
        job_id = conn.execute(
            Job.__table__.insert().values(sources=["t"], options={}, created_at=old)
        ).inserted_primary_key[0]

        def add(vid: str, status: str, *, updated=old, expiries: int = 0, lease_until=None) -> int:  # noqa: E306
            return conn.execute(
                Video.__table__.insert().values(
                    job_id=job_id,
                    video_id=vid,
                    status=status,
                    position=0,
                    attempts=0,
                    summarise_attempts=0,
                    reconciles=0,
                    lease_expiries=expiries,
                    queued_at=old,
                    updated_at=updated,
                    lease_owner="gpu@elsewhere" if lease_until else None,
                    lease_expires_at=lease_until,
                )
            ).inserted_primary_key[0]

        unsent = [add(f"unsent{i:05d}", "queued") for i in range(3)]
        fetched = add("fetchedNoMsg", "fetched")
        conn.execute(
            Transcript.__table__.insert().values(video_pk=fetched, text="Bees dance.", source="csv", created_at=old)
        )
        looping = add("looping0001", "fetching", expiries=int(Settings().max_reconciles), lease_until=old)
        # A live GPU worker's lease, though its row was not written for a minute.
        in_flight = add("inflight001", "summarising", lease_until=utcnow() + timedelta(seconds=60))
    start_worker(env=env, cwd=REPO, name="fetch", argv=fetch_worker_argv("fetch"))
    out = subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "reconcile", "--stuck-after", "30"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "re-enqueued 4 (1 fetched, 3 queued); 0 expired leases; failed 1; left waiting 0"
    wait_until(
        lambda: (
            sorted(in_state(db, job_id, "fetched")) == sorted(["fetchedNoMsg", *[f"unsent{i:05d}" for i in range(3)]])
        ),
        message="the unsent videos fetched",
    )
    with db.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Video).where(Video.job_id == job_id))}
    assert rows[looping].status == "failed" and "after 3 expired leases" in rows[looping].error
    assert rows[in_flight].status == "summarising" and rows[in_flight].reconciles == 0
    assert all(rows[pk].reconciles == 1 and rows[pk].lease_expiries == 0 for pk in [*unsent, fetched])
    assert summarise_messages(redis_url) == sorted([*unsent, fetched])
    # A second pass right away finds nothing stuck: the re-enqueued videos were touched.
    again = subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "reconcile", "--stuck-after", "30"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout.strip() == "re-enqueued 0 (none); 0 expired leases; failed 0; left waiting 0"


# --- the GPU worker -----------------------------------------------------------------------------------


def test_a_killed_gpu_worker_mid_chunk_loses_nothing(fault_env, db, start_worker, wait_until, tiny_model_dir):
    """SIGKILL the GPU worker while a (slow) chunk runs: its leases run out and the new worker's
    reconcile pass (or Redis' visibility timeout) brings its videos back; one summary per video, no
    video twice. Before the kill, the heartbeat renews the leases, so a reconcile pass leaves them alone."""
    from tubesum.celery_app import create_app
    from tubesum.workers.reconcile import reconcile

    env = {**fault_env, SLOW_CHUNK_ENV: "7"}
    first = start_worker(env=env, cwd=REPO, name="gpu-a", argv=gpu_worker_argv("gpu-a", tiny_model_dir))
    ids = [f"gpukill{i:04d}" for i in range(6)]
    job_id = submit_ids(ids, env, transcripts=True)
    # The worker holds two chunks of messages (CHUNKS_IN_HAND): a chunk of 4 runs, the other 2 wait.
    wait_until(lambda: len(in_state(db, job_id, "summarising")) == 6, message="a chunk of 4 running, 2 waiting")
    # Past the lease and stuck_after_s since the last claim, by the claims' own stamps (a late
    # claim moves the wait with it): only the heartbeat keeps them fresh now.
    stale_after = timedelta(seconds=max(float(env["TUBESUM_STUCK_AFTER_S"]), float(env["TUBESUM_LEASE_S"])))

    def past_every_claim() -> bool:
        with db.connect() as conn:
            last = conn.scalar(select(func.max(Video.leased_at)).where(Video.job_id == job_id))
        return last is not None and utcnow() - last > stale_after

    wait_until(past_every_claim, message="every claim older than the lease and stuck_after_s")
    settings = Settings(
        **{k[len("TUBESUM_") :].lower(): v for k, v in env.items() if k.startswith("TUBESUM_") and k != REPLAY_ENV}
    )
    kombu.pools.reset()
    assert reconcile(settings=settings, celery_app=create_app(settings)).resent_count == 0
    assert len(in_state(db, job_id, "summarising")) == 6  # still mid-chunk
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)

    start_worker(
        env={**env, SLOW_CHUNK_ENV: "0"}, cwd=REPO, name="gpu-b", argv=gpu_worker_argv("gpu-b", tiny_model_dir)
    )
    wait_statuses(wait_until, db, job_id, TERMINAL)
    assert_nothing_lost(db, job_id, done=6)
    with db.connect() as conn:
        attempts = dict(
            conn.execute(select(Video.video_id, Video.summarise_attempts).where(Video.job_id == job_id)).all()
        )
    assert sorted(attempts.values()) == [2] * 6  # all six the killed worker held were claimed again


# --- Redis and PostgreSQL ----------------------------------------------------------------------------


def test_workers_reconnect_after_a_redis_restart(fault_env, db, start_worker, wait_until, tmp_path):
    """Restart (our own, append-only) Redis while messages are queued: the queued messages survive,
    the running workers reconnect by themselves, and the job completes."""
    own = OwnRedis(tmp_path / "redis", appendonly=True)
    own.start()
    try:
        env = {**fault_env, "TUBESUM_BROKER_URL": own.url}
        start_worker(env=env, cwd=REPO, name="fetch", argv=fetch_worker_argv("fetch"))
        ids = [f"redisgone{i:02d}" for i in range(8)]
        job_id = submit_ids(ids, env)
        wait_until(lambda: in_state(db, job_id, "fetching"), message="fetching started")
        queued_before = redis.Redis(port=own.port).llen("transcripts")
        assert queued_before > 0
        own.stop()
        time.sleep(2.0)  # workers see the broker gone
        own.start()
        wait_statuses(wait_until, db, job_id, ("fetched", "failed"))
        assert_nothing_lost(db, job_id, done=8, summarised=False)
        client = redis.Redis(port=own.port)
        messages = sorted(task_args(json.loads(m))[0] for m in client.lrange(SUMMARISE_QUEUE, 0, -1))
        client.close()
        assert sorted(set(messages)) == fetched_pks(db, job_id)
    finally:
        own.stop()


def test_dropped_postgres_connections_mid_write(fault_env, db, db_url, start_worker, wait_until, tiny_model_dir):
    """pg_terminate_backend on every tubesum connection, repeatedly, while fetch and GPU workers
    run a job: the writes retry (pool_pre_ping, task retries, the batcher's store retries) and no
    video fails because of it. (Leases long enough that missed heartbeats do not return videos.)"""
    env = {**fault_env, "TUBESUM_LEASE_S": "60"}
    (Path(env[REPLAY_ENV])).write_text(json.dumps({"default": "slow", "slow_s": 0.3}))
    start_worker(env=env, cwd=REPO, name="fetch", argv=fetch_worker_argv("fetch"))
    start_worker(env=env, cwd=REPO, name="gpu", argv=gpu_worker_argv("gpu", tiny_model_dir))
    dbname = db.url.database
    killed: list[int] = []
    stop = threading.Event()

    def terminate_connections() -> None:
        admin = create_engine(db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        try:
            while not stop.wait(KILL_INTERVAL_S):
                try:
                    with admin.connect() as conn:
                        # The function in the select list, not the WHERE clause: PostgreSQL may
                        # evaluate WHERE conditions in any order, and this must never touch
                        # another database's sessions.
                        killed.extend(
                            pid
                            for pid, ok in conn.execute(
                                text(
                                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                                ),
                                {"db": dbname},
                            )
                            if ok
                        )
                except OperationalError:  # our own connection dropped (a server-wide kill): go on
                    pass
        finally:
            admin.dispose()

    ids = [f"pgdrop{i:05d}" for i in range(8)]
    job_id = submit_ids(ids, env)
    killer = threading.Thread(target=terminate_connections, daemon=True)
    killer.start()
    try:
        wait_statuses(wait_until, db, job_id, TERMINAL, timeout=90)  # the whole job runs under fire
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no connection was terminated"
    assert_nothing_lost(db, job_id, done=8)
