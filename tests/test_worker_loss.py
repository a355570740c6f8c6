"""A lost worker costs a minute, not hours (issue 10): one bounded database pool per process,
leases on claimed videos renewed by the worker's heartbeat and returned by the reconcile pass that
runs inside the workers, hand-back of held messages on SIGTERM, and `tubesum retry`.

Real processes throughout: GPU workers on the tiny CPU model (``tests.slow_gpu_worker`` makes each
chunk slow enough to kill it mid-chunk), fetch workers answered by recorded YouTube responses,
the machine's PostgreSQL, Redis (a database number of this session) and, where parametrized,
RabbitMQ.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import kombu
import pytest
import redis
from kombu.exceptions import ChannelError
from sqlalchemy import create_engine, func, select, text

from tests.own_redis import OwnRedis
from tests.slow_gpu_worker import SLOW_CHUNK_ENV, STARTED
from tests.test_faults import (
    REPO,
    assert_nothing_lost,
    fetch_worker_argv,
    gpu_worker_argv,
    in_state,
    submit_ids,
    wait_statuses,
)
from tests.test_playlist import task_args
from tests.youtube_replay import REPLAY_ENV
from tubesum.celery_app import SUMMARISE_QUEUE, TRANSCRIPTS_QUEUE
from tubesum.db import POOL_MAX_OVERFLOW, POOL_SIZE
from tubesum.models import Batch, Job, Summary, Transcript, Video
from tubesum.models.base import utcnow

TERMINAL = ("done", "failed")
# Sampling interval of pg_stat_activity while a worker runs, seconds.
SAMPLE_INTERVAL_S = 0.1
# The targets: a job finishes this long after its GPU worker was SIGKILLed (defaults), and
# SIGTERM puts held-but-unstarted messages back on the queue this fast, seconds.
RECOVERY_TARGET_S = 120.0
HANDBACK_TARGET_S = 5.0


@pytest.fixture
def db(db_url: str):
    engine = create_engine(db_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def connections_of(db, pid: int) -> int:
    """PostgreSQL connections opened by the process ``pid`` (tubesum names them after it)."""
    with db.connect() as conn:
        return conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"), {"name": f"tubesum pid {pid}"}
        )


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


# --- helpers -------------------------------------------------------------------------------------------


def start_gpu(
    start_worker, env: dict[str, str], name: str, model_dir: Path, *, slow_s: float, chunk_size: int = 4, **extra: str
):
    """A GPU worker whose chunks take ``slow_s`` longer; its batch rows name it (TUBESUM_WORKER_HOST)."""
    return start_worker(
        env={**env, SLOW_CHUNK_ENV: str(slow_s), "TUBESUM_WORKER_HOST": name, **extra},
        cwd=REPO,
        name=name,
        argv=gpu_worker_argv(name, model_dir, chunk_size=chunk_size),
    )


def chunk_started(worker, prompts: int) -> bool:
    """The slow worker has put at least `prompts` prompts on its "GPU" (its log line, written as
    generate() begins): the videos' `summarising` state is set a moment before the batcher holds
    them, so a signal sent on that state alone could land before any chunk runs."""
    return sum(int(n) for n in re.findall(rf"{re.escape(STARTED)} (\d+) prompts", worker.log())) >= prompts


# Celery's log line of a task that ended (it returned, or raised).
TASK_ENDED = re.compile(r"Task \S+\[[0-9a-f-]+\] (succeeded in|raised)")


def tasks_ended(worker) -> int:
    """Tasks the worker has finished so far, from its log."""
    return len(TASK_ENDED.findall(worker.log()))


def queue_depth(broker_url: str, queue: str = SUMMARISE_QUEUE) -> int:
    """Messages ready in ``queue`` (not those a worker holds)."""
    if broker_url.startswith("redis"):
        client = redis.Redis.from_url(broker_url)
        try:
            return client.llen(queue)
        finally:
            client.close()
    with kombu.Connection(broker_url) as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:  # not declared yet
            return 0


def purge_rabbitmq(broker_url: str) -> None:
    """Empty this session's RabbitMQ queues: unlike a Redis database, a virtual host is not flushed per test."""
    with kombu.Connection(broker_url) as conn:
        for queue in (TRANSCRIPTS_QUEUE, SUMMARISE_QUEUE):
            channel = conn.channel()
            try:
                channel.queue_purge(queue)
            except ChannelError:  # not declared yet
                pass
            finally:
                channel.close()


def on_broker(request: pytest.FixtureRequest, env: dict[str, str]) -> dict[str, str]:
    if request.param == "redis":
        return env
    url = request.getfixturevalue("rabbitmq_url")
    purge_rabbitmq(url)
    return {**env, "TUBESUM_BROKER_URL": url}


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_env(request: pytest.FixtureRequest, fault_env: dict[str, str]) -> dict[str, str]:
    """``fault_env`` on Redis, and again on RabbitMQ (quorum queues, a virtual host of the session)."""
    return on_broker(request, fault_env)


@pytest.fixture(params=["redis", "rabbitmq"])
def default_broker_env(request: pytest.FixtureRequest, env: dict[str, str]) -> dict[str, str]:
    """``env`` (every delivery setting at its default) on Redis, and again on RabbitMQ."""
    return on_broker(request, env)


def video_rows(db, job_id: int) -> dict[str, Video]:
    with db.connect() as conn:
        return {r.video_id: r for r in conn.execute(select(Video).where(Video.job_id == job_id))}


def summaries_by_host(db, job_id: int) -> dict[str, str]:
    """video_id → worker_host of the batch that stored its summary."""
    with db.connect() as conn:
        return dict(
            conn.execute(
                select(Video.video_id, Batch.worker_host)
                .join(Summary, Summary.video_pk == Video.id)
                .join(Batch, Batch.id == Summary.batch_id)
                .where(Video.job_id == job_id)
            ).all()
        )


def wait_quick(predicate, *, limit_s: float, message: str) -> float:
    """Seconds until ``predicate()`` holds; fails past ``limit_s``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > limit_s:
            pytest.fail(f"not within {limit_s:.0f}s: {message}")
        time.sleep(0.05)
    return time.monotonic() - t0


# --- SIGKILL, SIGSTOP: leases ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_gpu_worker_killed_mid_chunk_is_replaced_within_two_minutes_with_default_settings(
    default_broker_env, db, start_worker, wait_until, tiny_model_dir
):
    """Default delivery settings (lease 60 s, a reconcile pass every 10 s inside each worker, Redis'
    visibility timeout 4 h). Redis: the killed worker's leases run out and the second worker's own
    pass sends its six videos back at once. RabbitMQ: the broker redelivers the dead consumer's
    messages as soon as its connection drops, and the second worker takes the videos over at once.
    Either way the job ends within 2 minutes of the kill."""
    env = default_broker_env
    on_redis = env["TUBESUM_BROKER_URL"].startswith("redis")
    first = start_gpu(start_worker, env, "gpu-a", tiny_model_dir, slow_s=60)
    job_id = submit_ids([f"dflt{i:07d}" for i in range(6)], env, transcripts=True)
    wait_until(lambda: len(in_state(db, job_id, "summarising")) == 6, message="six videos held by gpu-a")
    os.killpg(first.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.proc.wait(timeout=10)
    second = start_gpu(start_worker, env, "gpu-b", tiny_model_dir, slow_s=0)
    wait_statuses(wait_until, db, job_id, TERMINAL, timeout=RECOVERY_TARGET_S)
    recovered_s = time.monotonic() - killed_at
    assert recovered_s <= RECOVERY_TARGET_S
    assert_nothing_lost(db, job_id, done=6)
    rows = video_rows(db, job_id)
    assert [r.lease_expiries for r in rows.values()] == [1 if on_redis else 0] * 6
    assert all(r.lease_owner is None for r in rows.values())
    assert set(summaries_by_host(db, job_id).values()) == {"gpu-b"}
    assert ("lease of gpu-a@" in second.log()) is on_redis
    print(f"job finished {recovered_s:.0f}s after its GPU worker was SIGKILLed")


@pytest.mark.slow
def test_a_fetch_worker_killed_mid_job_is_replaced_within_two_minutes_with_default_settings(
    default_broker_env, db, start_worker, wait_until, tmp_path
):
    """A whole fetch worker SIGKILLed with two fetches in flight, default settings. Redis: their
    leases (75 s: the longest fetch) run out and the second worker's pass returns them. RabbitMQ:
    redelivered at once and taken over. The job's transcripts are all in within 2 minutes."""
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"default": "slow", "slow_s": 3.0}))
    env = {**default_broker_env, REPLAY_ENV: str(replay)}
    on_redis = env["TUBESUM_BROKER_URL"].startswith("redis")
    first = start_worker(env=env, cwd=REPO, name="fetch-a", argv=fetch_worker_argv("fetch-a"))
    job_id = submit_ids([f"fkill{i:06d}" for i in range(6)], env)
    wait_until(lambda: len(in_state(db, job_id, "fetching")) == 2, message="two fetches in flight")
    os.killpg(first.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.proc.wait(timeout=10)
    start_worker(env=env, cwd=REPO, name="fetch-b", argv=fetch_worker_argv("fetch-b"))
    wait_statuses(wait_until, db, job_id, ("fetched", "failed"), timeout=RECOVERY_TARGET_S)
    recovered_s = time.monotonic() - killed_at
    assert recovered_s <= RECOVERY_TARGET_S
    assert_nothing_lost(db, job_id, done=6, summarised=False)
    assert sorted(r.lease_expiries for r in video_rows(db, job_id).values()) == [0] * 4 + (
        [1] * 2 if on_redis else [0] * 2
    )
    print(f"transcripts all in {recovered_s:.0f}s after the fetch worker was SIGKILLed")


@pytest.mark.slow
def test_a_worker_stalled_past_its_lease_stores_no_second_summary(
    broker_env, db, start_worker, wait_until, tiny_model_dir
):
    """SIGSTOP the GPU worker mid-chunk (its heartbeat stops with it): its leases run out, another
    worker summarises the videos; SIGCONT: the stalled worker finishes its chunk, finds them done,
    and stores its batch row but no second summary."""
    fault_env = broker_env
    stalled = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=5)
    job_id = submit_ids([f"stop{i:07d}" for i in range(4)], fault_env, transcripts=True)
    wait_until(lambda: len(in_state(db, job_id, "summarising")) == 4, message="a chunk of four running on gpu-a")
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        start_gpu(start_worker, fault_env, "gpu-b", tiny_model_dir, slow_s=0)
        wait_statuses(wait_until, db, job_id, TERMINAL)
    finally:
        stalled.proc.send_signal(signal.SIGCONT)

    def late_batch() -> bool:
        with db.connect() as conn:
            return bool(conn.scalar(select(func.count()).select_from(Batch).where(Batch.worker_host == "gpu-a")))

    wait_until(late_batch, message="the stalled worker's late chunk")
    # Its batch row and any summary are one transaction; its four tasks ending is the last it does.
    wait_until(
        lambda: tasks_ended(stalled) >= 4, message=lambda: f"the stalled worker's four tasks to end:\n{stalled.log()}"
    )
    assert_nothing_lost(db, job_id, done=4)
    assert set(summaries_by_host(db, job_id).values()) == {"gpu-b"}
    # Returned by gpu-b's reconcile pass (1), or claimed straight from a redelivered message once
    # the lease had run out (0): either way once.
    assert {r.lease_expiries for r in video_rows(db, job_id).values()} <= {0, 1}


@pytest.mark.slow
def test_a_redelivery_while_its_holder_lives_does_not_run_the_video_twice(
    fault_env, db, start_worker, wait_until, tiny_model_dir
):
    """A chunk longer than Redis' visibility timeout (6 s here; 40 s in the issue's report): Redis
    hands its messages to a second worker, which drops them because the first worker's lease, renewed
    by its heartbeat, still runs. Only the first worker generates those videos."""
    holder = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=15)
    job_id = submit_ids([f"vis{i:08d}" for i in range(4)], fault_env, transcripts=True)
    wait_until(lambda: len(in_state(db, job_id, "summarising")) == 4, message="a chunk of four on gpu-a")
    other = start_gpu(start_worker, fault_env, "gpu-b", tiny_model_dir, slow_s=0)
    wait_statuses(wait_until, db, job_id, TERMINAL)
    assert_nothing_lost(db, job_id, done=4)
    assert set(summaries_by_host(db, job_id).values()) == {"gpu-a"}
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Batch).where(Batch.worker_host == "gpu-b")) == 0
    assert "is held by gpu-a@" in other.log()
    assert [r.summarise_attempts for r in video_rows(db, job_id).values()] == [1] * 4
    holder.stop()


# --- fetch retries under a lease ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_fetch_retry_releases_its_lease_for_whichever_worker_gets_it(broker_env, db, start_worker, wait_until):
    """A transient error (HTTP 429, then fine) retries with a countdown: the lease loses its owner
    but keeps an expiry past the countdown, so the retry may run on any worker and nobody resends
    the video meanwhile. On RabbitMQ the countdown goes through quorum queues (Celery's native
    delayed delivery)."""
    env = broker_env
    Path(env[REPLAY_ENV]).write_text(json.dumps({"default": "flaky_429"}))
    start_worker(env=env, cwd=REPO, name="fetch", argv=fetch_worker_argv("fetch"))
    job_id = submit_ids([f"flaky{i:06d}" for i in range(3)], env)
    wait_statuses(wait_until, db, job_id, ("fetched", "failed"))
    assert_nothing_lost(db, job_id, done=3, summarised=False)
    rows = video_rows(db, job_id).values()
    assert [(r.attempts, r.lease_owner, r.lease_expires_at, r.lease_expiries) for r in rows] == [(2, None, None, 0)] * 3
    assert queue_depth(env["TUBESUM_BROKER_URL"]) == 3  # one summarise message each


# --- outages: nothing fails, lost messages come back ---------------------------------------------------


@pytest.mark.slow
def test_a_fleet_outage_fails_no_video(fault_env, db, start_worker, wait_until, tiny_model_dir, tmp_path):
    """The GPU worker dies holding six videos and no GPU worker exists for ten lease lengths (the
    issue's 3-hour spot-capacity gap, scaled down) while a reconcile pass runs every half second:
    each video goes back to its queue once and then waits, counted once; nothing fails, and the
    next worker finishes the job."""
    lease_s = float(fault_env["TUBESUM_LEASE_S"])
    first = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=60)
    job_id = submit_ids([f"gap{i:08d}" for i in range(6)], fault_env, transcripts=True)
    wait_until(lambda: len(in_state(db, job_id, "summarising")) == 6, message="six videos held by gpu-a")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    reconciler = subprocess.Popen(
        [sys.executable, "-m", "tubesum.cli", "reconcile", "--every", "0.5"],
        env=fault_env,
        cwd=tmp_path,
        stdout=(tmp_path / "reconcile.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(10 * lease_s)  # (max_reconciles + 1) leases and more
        assert sorted(r.status for r in video_rows(db, job_id).values()) == ["fetched"] * 6
        start_gpu(start_worker, fault_env, "gpu-b", tiny_model_dir, slow_s=0)
        wait_statuses(wait_until, db, job_id, TERMINAL)
    finally:
        reconciler.send_signal(signal.SIGTERM)
        reconciler.wait(timeout=20)
    assert_nothing_lost(db, job_id, done=6)
    assert [r.lease_expiries for r in video_rows(db, job_id).values()] == [1] * 6


@pytest.mark.slow
def test_messages_lost_with_a_redis_restart_are_resent_from_the_database(
    fault_env, db, start_worker, wait_until, tiny_model_dir, tmp_path
):
    """Redis without persistence (how many run it) restarted with six summarise messages queued:
    they are gone. A worker's reconcile pass notices the `fetched` videos with no lease and an
    empty queue once they are TUBESUM_STUCK_AFTER_S old (60 s by default; 3 s here) and sends them
    again; nothing counts against them."""
    own = OwnRedis(tmp_path / "redis", appendonly=False)
    own.start()
    try:
        env = {**fault_env, "TUBESUM_BROKER_URL": own.url}
        job_id = submit_ids([f"lost{i:07d}" for i in range(6)], env, transcripts=True)
        assert queue_depth(own.url) == 6
        own.stop()
        own.start()
        assert queue_depth(own.url) == 0
        worker = start_gpu(start_worker, env, "gpu", tiny_model_dir, slow_s=0)
        wait_statuses(wait_until, db, job_id, TERMINAL)
        assert_nothing_lost(db, job_id, done=6)
        rows = video_rows(db, job_id).values()
        assert [(r.reconciles, r.lease_expiries, r.summarise_attempts) for r in rows] == [(1, 0, 1)] * 6
        assert "re-enqueued 6 (6 fetched); 0 expired leases" in worker.log()
    finally:
        own.stop()


# --- SIGTERM: hand-back ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_hands_back_held_messages_within_seconds(broker_env, db, start_worker, wait_until, tiny_model_dir):
    """SIGTERM while a chunk of 4 runs and 4 more videos wait in the worker: those 4 are back on
    the queue (and `fetched`, with no lease) within seconds; the running chunk finishes within the
    grace period and is stored; the worker exits; a second worker does the rest. On Redis and on
    RabbitMQ."""
    env = broker_env
    url = env["TUBESUM_BROKER_URL"]
    first = start_gpu(start_worker, env, "gpu-a", tiny_model_dir, slow_s=6)
    job_id = submit_ids([f"term{i:07d}" for i in range(8)], env, transcripts=True)
    wait_until(
        lambda: len(in_state(db, job_id, "summarising")) == 8 and chunk_started(first, 4),
        message="a chunk running, four waiting",
    )
    assert queue_depth(url) == 0
    first.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    back_s = wait_quick(lambda: queue_depth(url) == 4, limit_s=HANDBACK_TARGET_S, message="four messages handed back")
    rows = video_rows(db, job_id)
    assert sorted(r.status for r in rows.values()) == ["fetched"] * 4 + ["summarising"] * 4
    assert all(r.lease_owner is None and r.summarise_attempts == 0 for r in rows.values() if r.status == "fetched")
    first.proc.wait(timeout=30)
    exit_s = time.monotonic() - t0
    assert exit_s < 25.0, "the running chunk should finish well within the grace period"
    assert queue_depth(url) == 4  # nothing taken by the stopping worker
    second = start_gpu(start_worker, env, "gpu-b", tiny_model_dir, slow_s=0)
    wait_statuses(wait_until, db, job_id, TERMINAL)
    assert_nothing_lost(db, job_id, done=8)
    hosts = summaries_by_host(db, job_id)
    assert sorted(hosts.values()) == ["gpu-a"] * 4 + ["gpu-b"] * 4
    assert [r.summarise_attempts for r in video_rows(db, job_id).values()] == [1] * 8
    assert "handed back" in first.log()
    second.stop()
    print(f"handed back in {back_s:.1f}s; worker exited {exit_s:.1f}s after SIGTERM")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["second-sigterm", "grace-over"])
def test_the_running_chunk_is_handed_back_on_a_second_sigterm_or_when_the_grace_ends(
    how, fault_env, db, redis_url, start_worker, wait_until, tiny_model_dir
):
    """A chunk that cannot finish in time: a second SIGTERM, or the end of the grace period
    (TUBESUM_HANDBACK_GRACE_S), hands its messages back too; the worker exits without storing it."""
    grace = {"TUBESUM_HANDBACK_GRACE_S": "2" if how == "grace-over" else "25"}
    first = start_gpu(start_worker, fault_env, "gpu-a", tiny_model_dir, slow_s=40, **grace)
    job_id = submit_ids([f"grace{i:06d}" for i in range(8)], fault_env, transcripts=True)
    wait_until(
        lambda: len(in_state(db, job_id, "summarising")) == 8 and chunk_started(first, 4),
        message="a chunk running, four waiting",
    )
    first.proc.send_signal(signal.SIGTERM)
    wait_quick(lambda: queue_depth(redis_url) == 4, limit_s=HANDBACK_TARGET_S, message="four waiting messages back")
    if how == "second-sigterm":
        first.proc.send_signal(signal.SIGTERM)
    all_back_s = wait_quick(
        lambda: queue_depth(redis_url) == 8, limit_s=HANDBACK_TARGET_S, message="the running chunk's messages back too"
    )
    first.proc.wait(timeout=20)
    assert sorted(r.status for r in video_rows(db, job_id).values()) == ["fetched"] * 8
    start_gpu(start_worker, fault_env, "gpu-b", tiny_model_dir, slow_s=0)
    wait_statuses(wait_until, db, job_id, TERMINAL)
    assert_nothing_lost(db, job_id, done=8)
    assert set(summaries_by_host(db, job_id).values()) == {"gpu-b"}
    print(f"{how}: every message back {all_back_s:.1f}s after the first SIGTERM")


# --- operators: retry, status --------------------------------------------------------------------------


def add_job(db, videos: list[dict]) -> tuple[int, dict[str, int]]:
    """A job with the given video rows (keys of ``videos``' dicts override the defaults)."""
    old = utcnow() - timedelta(minutes=5)
    pks: dict[str, int] = {}
    with db.begin() as conn:
        job_id = conn.execute(
            Job.__table__.insert().values(sources=["t"], options={}, created_at=old)
        ).inserted_primary_key[0]
        for i, values in enumerate(videos):
            row = (
                dict(
                    job_id=job_id,
                    video_id=f"vid{i:08d}",
                    status="failed",
                    position=i,
                    attempts=7,
                    summarise_attempts=9,
                    reconciles=2,
                    lease_expiries=3,
                    queued_at=old,
                    updated_at=old,
                )
                | values
            )
            transcript = row.pop("transcript", None)
            pks[row["video_id"]] = pk = conn.execute(Video.__table__.insert().values(**row)).inserted_primary_key[0]
            if transcript:
                conn.execute(
                    Transcript.__table__.insert().values(video_pk=pk, text=transcript, source="csv", created_at=old)
                )
    return job_id, pks


def tubesum_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tubesum.cli", *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def queued_messages(redis_url: str) -> dict[str, list[int]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return {
            queue: sorted(task_args(json.loads(m))[0] for m in client.lrange(queue, 0, -1))
            for queue in (TRANSCRIPTS_QUEUE, SUMMARISE_QUEUE)
        }
    finally:
        client.close()


def test_retry_requeues_failed_videos_with_fresh_counters(env, db, redis_url):
    """`tubesum retry JOB --failed-reason TEXT`: only the failed videos whose reason matches, to
    summarise if their transcript is stored, else to fetch, with their counters back at zero."""
    outage = "stuck in 'summarising' after 3 expired leases (its worker died each time); giving up"
    job_id, pks = add_job(
        db,
        [
            dict(video_id="outage00001", error=outage, transcript="Bees dance."),
            dict(video_id="outage00002", error=outage.replace("summarising", "fetching")),
            dict(video_id="nocaptions1", error="TranscriptsDisabled: subtitles are disabled"),
            dict(video_id="finished001", status="done", error=None, transcript="Owls."),
        ],
    )
    out = tubesum_cli(env, "retry", str(job_id), "--failed-reason", "EXPIRED LEASES")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"job {job_id}: re-queued 2 failed videos (1 to fetch, 1 to summarise)"
    rows = video_rows(db, job_id)
    assert {v: r.status for v, r in rows.items()} == {
        "outage00001": "fetched",
        "outage00002": "queued",
        "nocaptions1": "failed",
        "finished001": "done",
    }
    for vid in ("outage00001", "outage00002"):
        r = rows[vid]
        assert (r.error, r.failed_at, r.attempts, r.summarise_attempts, r.lease_expiries) == (None, None, 0, 0, 0)
    assert queued_messages(redis_url) == {
        TRANSCRIPTS_QUEUE: [pks["outage00002"]],
        SUMMARISE_QUEUE: [pks["outage00001"]],
    }
    # Everything failed, then: the transcript failure too.
    again = tubesum_cli(env, "retry", str(job_id))
    assert again.stdout.strip() == f"job {job_id}: re-queued 1 failed videos (1 to fetch, 0 to summarise)"
    assert tubesum_cli(env, "retry", str(job_id)).stdout.strip() == f"job {job_id}: no failed videos to retry"
    missing = tubesum_cli(env, "retry", "999999")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: there is no job 999999"


def test_status_shows_who_holds_the_videos_and_expired_leases(env, db):
    """`tubesum status JOB`: per worker, how many videos it holds, since when and until when its
    lease runs; and how many went back to their queue after a lease ran out."""
    now = utcnow()
    held = dict(
        status="summarising",
        error=None,
        lease_expiries=0,
        leased_at=now - timedelta(seconds=30),
        lease_expires_at=now + timedelta(seconds=40),
    )
    job_id, _ = add_job(
        db,
        [
            held | dict(lease_owner="gpu@host-a"),
            held | dict(lease_owner="gpu@host-a"),
            held | dict(lease_owner="gpu@host-b", lease_expiries=1),
            dict(
                status="fetching",
                error=None,
                lease_owner="fetch@host-c",
                leased_at=now,
                lease_expiries=0,
                lease_expires_at=now + timedelta(seconds=60),
            ),
            dict(status="done", error=None, lease_expiries=2),
        ],
    )
    out = tubesum_cli({**env, "COLUMNS": "200"}, "status", str(job_id))
    assert out.returncode == 0, out.stderr
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if "@host-" in line}
    assert lines.keys() == {"gpu@host-a", "gpu@host-b", "fetch@host-c"}
    assert lines["gpu@host-a"].split()[3] == "2" and lines["gpu@host-b"].split()[3] == "1"
    assert f"{now - timedelta(seconds=30):%H:%M:%S}" in lines["gpu@host-a"]
    assert "3 returned to the queue after a lease ran out" in out.stdout


def test_a_reconcile_pass_returns_expired_leases_once_and_passes_take_turns(settings, db, redis_url):
    """One pass: an expired lease goes back to its queue (counted), a live lease and a pending
    retry are left alone, a video whose worker died too often fails; while another pass holds the
    advisory lock, a pass does nothing."""
    from tubesum.celery_app import app
    from tubesum.workers.reconcile import RECONCILE_LOCK_KEY, reconcile

    now = utcnow()
    lease = dict(error=None, lease_expiries=0, leased_at=now - timedelta(minutes=2))
    job_id, pks = add_job(
        db,
        [
            lease
            | dict(
                video_id="expired0001",
                status="summarising",
                lease_owner="gpu@dead",
                lease_expires_at=now - timedelta(seconds=1),
                transcript="Bees dance.",
            ),
            lease
            | dict(
                video_id="live0000001",
                status="summarising",
                lease_owner="gpu@live",
                lease_expires_at=now + timedelta(seconds=60),
                transcript="Owls hoot.",
            ),
            lease
            | dict(
                video_id="retrying001",
                status="fetching",
                lease_owner=None,
                lease_expires_at=now + timedelta(seconds=60),
            ),
            lease
            | dict(
                video_id="dying000001",
                status="fetching",
                lease_owner="fetch@dead",
                lease_expiries=3,
                lease_expires_at=now - timedelta(seconds=1),
            ),
        ],
    )
    with db.connect() as conn, conn.begin():  # another pass is running
        conn.execute(select(func.pg_advisory_xact_lock(RECONCILE_LOCK_KEY)))
        assert reconcile(settings=settings, celery_app=app).skipped
    report = reconcile(settings=settings, celery_app=app)
    assert report.summary() == "re-enqueued 1 (1 summarising); 1 expired leases; failed 1; left waiting 0"
    rows = video_rows(db, job_id)
    assert (rows["expired0001"].status, rows["expired0001"].lease_owner, rows["expired0001"].lease_expiries) == (
        "fetched",
        None,
        1,
    )
    assert (rows["live0000001"].status, rows["live0000001"].lease_owner) == ("summarising", "gpu@live")
    assert rows["retrying001"].status == "fetching" and rows["retrying001"].lease_expiries == 0
    assert rows["dying000001"].status == "failed" and "after 3 expired leases" in rows["dying000001"].error
    assert queued_messages(redis_url) == {TRANSCRIPTS_QUEUE: [], SUMMARISE_QUEUE: [pks["expired0001"]]}
    assert reconcile(settings=settings, celery_app=app).resent_count == 0  # the next pass finds nothing new
