"""Flower, for real: a fetch worker runs a small job; Flower's REST API shows every task of the job,
its state and the worker that ran it, and refuses requests without credentials.

What a user sees there (issue 11 items 12-14): each task's arguments are ``job=N video=ID``, so
Flower's search (``args:"job=N "``) filters one job; its result says what happened (characters
fetched; summary length, batch, generate seconds); a video that failed is a FAILURE task with its
reason. Flower is started the way the README says, with `tubesum flower`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests

from tests.tiny_model import summarise_worker_argv
from tests.youtube_replay import REPLAY_ENV, fetch_worker_argv
from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK
from tubesum.producer.submit import submit

pytestmark = pytest.mark.slow

AUTH = ("flower", "s3cret-test")
# Flower's start-up (imports, broker connection), seconds.
FLOWER_READY_TIMEOUT_S = 60.0
OK_IDS = ["okVideo0001", "okVideo0002"]
DISABLED_ID = "noCaptions1"
OTHER_ID = "otherJob001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower(env: dict[str, str], tmp_path: Path, wait_until):  # type: ignore[no-untyped-def]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tubesum.cli", "flower", "--port", str(port), "--address", "127.0.0.1"],
            env={**env, "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"},
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def healthy() -> bool:
            assert proc.poll() is None, "flower exited:\n" + log_path.read_text()
            try:
                return requests.get(f"{base}/healthcheck", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        try:
            wait_until(healthy, timeout=FLOWER_READY_TIMEOUT_S, message=lambda: "flower:\n" + log_path.read_text())
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print("\n===== flower log =====\n" + log_path.read_text(errors="replace"))


def tasks_of(flower: str, **params: str) -> list[dict]:
    return list(requests.get(f"{flower}/api/tasks", params=params, auth=AUTH, timeout=5).json().values())


def by_name_and_video(tasks: list[dict]) -> dict[tuple[str, str], dict]:
    """Tasks keyed by (task name, YouTube id), read from the shown arguments ``job=N video=ID``."""
    out = {}
    for task in tasks:
        match = re.fullmatch(r"job=\d+ video=(\S+)", task.get("args") or "")
        if match:
            out[(task["name"], match.group(1))] = task
    return out


def test_flower_shows_every_task_with_state_and_worker(
    flower: str, env: dict[str, str], settings, start_worker, tmp_path: Path, wait_until
) -> None:
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"videos": {DISABLED_ID: "transcripts_disabled"}, "default": "ok"}))
    env[REPLAY_ENV] = str(replay)
    worker = start_worker(
        env=env,
        name="fetch-flower",
        argv=fetch_worker_argv("fetch-flower", concurrency=2),
    )

    # Flower's event consumer is live once it has seen the worker's heartbeat.
    def worker_online() -> bool:
        metrics = requests.get(f"{flower}/metrics", timeout=2).text
        return f'flower_worker_online{{worker="{worker.name}"}} 1.0' in metrics

    wait_until(worker_online, timeout=30, message="flower to see the worker's events")

    job_id = submit([*OK_IDS, DISABLED_ID], settings=settings)
    other_job = submit([OTHER_ID], settings=settings)  # another job, which the search must leave out

    def all_seen() -> dict | None:
        seen = by_name_and_video(tasks_of(flower))
        fetches_done = all(
            seen.get((FETCH_TASK, v), {}).get("state") in ("SUCCESS", "FAILURE")
            for v in [*OK_IDS, DISABLED_ID, OTHER_ID]
        )
        summarises_sent = all((SUMMARISE_TASK, v) in seen for v in OK_IDS)
        return seen if fetches_done and summarises_sent else None

    seen = wait_until(all_seen, timeout=60, message=lambda: f"every task in flower: {tasks_of(flower)}")

    for video_id in [*OK_IDS, DISABLED_ID]:
        fetch = seen[(FETCH_TASK, video_id)]
        assert fetch["args"] == f"job={job_id} video={video_id}"
        assert fetch["worker"] == worker.name
        assert fetch["received"] and fetch["started"]
        info = requests.get(f"{flower}/api/task/info/{fetch['uuid']}", auth=AUTH, timeout=5).json()
        assert info["worker"] == worker.name
        if video_id == DISABLED_ID:
            # A permanent failure is a FAILURE with its reason, not a SUCCESS that says "failed".
            assert fetch["state"] == info["state"] == "FAILURE" and fetch["failed"]
            assert f"VideoFailed('job={job_id} video={DISABLED_ID}: TranscriptsDisabled" in fetch["exception"]
            assert fetch["retries"] == 0  # no retry of what cannot change
        else:
            assert fetch["state"] == info["state"] == "SUCCESS" and fetch["succeeded"]
            assert re.fullmatch(r"'fetched [\d,]+ chars \(en\); sent to summarise'", fetch["result"]), fetch["result"]
    for video_id in OK_IDS:
        # No summarise worker runs here: the summarise task was sent (by the fetch worker) and waits.
        summarise = seen[(SUMMARISE_TASK, video_id)]
        assert summarise["state"] == "PENDING" and summarise.get("worker") is None
        assert summarise["args"] == f"job={job_id} video={video_id}"
        assert summarise["parent_id"] == seen[(FETCH_TASK, video_id)]["uuid"]
    assert (SUMMARISE_TASK, DISABLED_ID) not in seen

    # Flower's search filters one job: exactly its tasks, none of the other job's.
    found = tasks_of(flower, search=f'args:"job={job_id} "')
    assert sorted((t["name"], t["args"]) for t in found) == sorted(
        [(FETCH_TASK, f"job={job_id} video={v}") for v in [*OK_IDS, DISABLED_ID]]
        + [(SUMMARISE_TASK, f"job={job_id} video={v}") for v in OK_IDS]
    )
    failed = tasks_of(flower, search=f'args:"job={job_id} " state:FAILURE')
    assert [t["args"] for t in failed] == [f"job={job_id} video={DISABLED_ID}"]
    assert {t["args"] for t in tasks_of(flower, search=f'args:"job={other_job} "')} == {
        f"job={other_job} video={OTHER_ID}"
    }

    # /api/workers asks the workers over the broker (remote control); refresh past Flower's cache.
    # Its broadcast waits only about a second for replies, so ask again until the worker answers.
    workers = wait_until(
        lambda: (
            requests.get(f"{flower}/api/workers?refresh=1", auth=AUTH, timeout=10).json().get(worker.name)
            and requests.get(f"{flower}/api/workers", auth=AUTH, timeout=10).json()
        ),
        timeout=30,
        message="the worker in /api/workers",
    )
    assert workers[worker.name]["active_queues"][0]["name"] == "transcripts"

    queues = requests.get(f"{flower}/api/queues/length", auth=AUTH, timeout=10).json()
    assert {"name": "transcripts", "messages": 0} in queues["active_queues"]
    # Flower only measures queues some worker consumes; the waiting summarise messages are in Redis.
    assert redis.Redis.from_url(env["TUBESUM_BROKER_URL"]).llen("summarise") == len(OK_IDS) + 1


def test_flower_tasks_page_shows_job_and_outcome_columns(flower: str) -> None:
    """`tubesum flower` puts args (job=N video=ID), result and exception on the Tasks page."""
    page = requests.get(f"{flower}/tasks", auth=AUTH, timeout=5).text
    columns = re.findall(r'<th data-column="(\w+)"', page)
    assert columns == ["name", "args", "state", "result", "exception", "received", "runtime", "worker"]


def test_flower_api_refuses_requests_without_auth(flower: str) -> None:
    for path in ("/api/tasks", "/api/workers", "/api/task/info/x", "/api/queues/length", "/"):
        assert requests.get(flower + path, timeout=5).status_code == 401, path
        assert requests.get(flower + path, auth=("flower", "wrong"), timeout=5).status_code == 401, path
    assert requests.get(flower + "/api/tasks", auth=AUTH, timeout=5).status_code == 200


def test_flower_shows_each_summarise_task_of_a_chunk_on_the_gpu_worker(
    flower: str, env: dict[str, str], settings, start_worker, tmp_path: Path, wait_until, tiny_model_dir
) -> None:
    """One batched generation serves several videos, yet each video's task has its own state,
    result and worker in Flower."""
    env = {**env, "TUBESUM_MAX_NEW_TOKENS": "8", "TUBESUM_CHUNK_WAIT_S": "1"}
    worker = start_worker(
        env=env,
        name="gpu-flower",
        argv=summarise_worker_argv(tiny_model_dir, "gpu-flower@%h"),
    )
    wait_until(
        lambda: (
            f'flower_worker_online{{worker="{worker.name}"}} 1.0' in requests.get(f"{flower}/metrics", timeout=2).text
        ),
        timeout=30,
        message="flower to see the GPU worker's events",
    )

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("video_id,transcript\n" + "".join(f"vid{i},Owls and bees number {i}.\n" for i in range(4)))
    job_id = submit([], transcripts_csv=str(csv_path), settings=settings)

    from tubesum.celery_app import app as celery_app
    from tubesum.db import session_scope
    from tubesum.models import Batch, Job, Summary, Transcript, Video

    with session_scope(settings.database_url) as s:
        pks = [v.id for v in s.query(Video).filter(Video.job_id == job_id)]

    def summarise_tasks() -> list[dict] | None:
        found = [
            t
            for t in requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json().values()
            if t["name"] == SUMMARISE_TASK and t.get("state") == "SUCCESS"
        ]
        return found if len(found) == len(pks) else None

    found = wait_until(summarise_tasks, timeout=120, message="every summarise task SUCCESS in Flower")
    with session_scope(settings.database_url) as s:
        videos = {v.id: v.video_id for v in s.query(Video).filter(Video.job_id == job_id)}
        summaries = {row.video_pk: row for row in s.query(Summary).filter(Summary.video_pk.in_(pks))}
        walls = {b.id: b for b in s.query(Batch).filter(Batch.id.in_({x.batch_id for x in summaries.values()}))}
    assert sorted(t["args"] for t in found) == sorted(f"job={job_id} video={v}" for v in videos.values())
    assert {t["worker"] for t in found} == {worker.name}
    by_video = {t["args"].split("video=")[1]: t for t in found}
    for pk, video_id in videos.items():
        summary = summaries[pk]
        batch = walls[summary.batch_id]
        # The result says what happened: summary length, which batch, how long it generated.
        assert by_video[video_id]["result"] == repr(
            f"summary {len(summary.text):,} chars, batch {summary.batch_id[:8]} of {batch.batch_size}, "
            f"generate {batch.wall_s:.2f} s"
        )
    assert len(walls) < len(pks)  # shared a chunk

    # A video the GPU worker fails (nothing readable in its transcript) is a FAILURE with the reason.
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        blank = Video(job=job, video_id="zeroWidth01", position=99, status="fetched")
        s.add_all([blank, Transcript(video=blank, text="\u200b" * 20, source="youtube")])
        s.flush()
        blank_pk = blank.id
    celery_app.send_task(SUMMARISE_TASK, args=[blank_pk], argsrepr=f"job={job_id} video=zeroWidth01")
    failed = wait_until(
        lambda: tasks_of(flower, search=f'args:"job={job_id} " state:FAILURE'),
        timeout=60,
        message="the failed summarise task in Flower",
    )
    assert [t["args"] for t in failed] == [f"job={job_id} video=zeroWidth01"]
    assert f"VideoFailed('job={job_id} video=zeroWidth01: empty transcript')" == failed[0]["exception"]


def test_flower_marks_a_killed_worker_offline_when_its_heartbeats_stop(
    flower: str, env: dict[str, str], start_worker, wait_until
) -> None:
    """Workers send heartbeats (every 2 s) with their task events: a worker SIGKILLed (no
    worker-offline event) shows as offline in Flower within seconds."""
    import os
    import signal

    worker = start_worker(env=env, queue="transcripts", name="fetch-hb")

    def alive() -> bool | None:
        return (
            requests.get(f"{flower}/api/workers", params={"status": "true"}, auth=AUTH, timeout=5)
            .json()
            .get(worker.name)
        )

    wait_until(lambda: alive() is True, timeout=30, message="flower to see the worker's heartbeats")
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    wait_until(lambda: alive() is False, timeout=30, message="flower to mark the killed worker offline")
