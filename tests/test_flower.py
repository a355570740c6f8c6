"""Flower, for real: a fetch worker runs a small job; Flower's REST API shows every task of the job,
its state and the worker that ran it, and refuses requests without credentials."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests

from tubesum.producer.submit import submit
from tests.youtube_replay import REPLAY_ENV
from tiny_model import tiny_model_dir  # noqa: F401
from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK

pytestmark = pytest.mark.slow

AUTH = ("flower", "s3cret-test")
# Flower's start-up (imports, broker connection), seconds.
FLOWER_READY_TIMEOUT_S = 60.0
OK_IDS = ["okVideo0001", "okVideo0002"]
DISABLED_ID = "noCaptions1"


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
            [sys.executable, "-m", "celery", "-A", "tubesum.celery_app", "flower", f"--port={port}",
             "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"],
            env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

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


def test_flower_shows_every_task_with_state_and_worker(
    flower: str, env: dict[str, str], settings, start_worker, tmp_path: Path, wait_until
) -> None:
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"videos": {DISABLED_ID: "transcripts_disabled"}, "default": "ok"}))
    env[REPLAY_ENV] = str(replay)
    worker = start_worker(
        env=env, name="fetch-flower",
        argv=[sys.executable, "-m", "celery", "-A", "tests.youtube_replay:worker_app", "worker",
              "-Q", "transcripts", "-P", "threads", "-c", "2", "-n", "fetch-flower@%h", "-E",
              "--without-mingle", "--without-gossip", "-l", "info"],
    )  # fmt: skip

    # Flower's event consumer is live once it has seen the worker's heartbeat.
    def worker_online() -> bool:
        metrics = requests.get(f"{flower}/metrics", timeout=2).text
        return f'flower_worker_online{{worker="{worker.name}"}} 1.0' in metrics

    wait_until(worker_online, timeout=30, message="flower to see the worker's events")

    job_id = submit([*OK_IDS, DISABLED_ID], settings=settings)

    from tubesum.models import Video
    from tubesum.db import session_scope

    with session_scope(settings.database_url) as s:
        pks = {v.video_id: v.id for v in s.query(Video).filter(Video.job_id == job_id)}

    def tasks() -> dict:
        return requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()

    def by_name_and_pk(all_tasks: dict) -> dict[tuple[str, int], dict]:
        out = {}
        for task in all_tasks.values():
            args = json.loads(task["args"].replace("(", "[").replace(")", "]").replace(",]", "]")) if task.get("args") else []
            if args:
                out[(task["name"], int(args[0]))] = task
        return out

    def all_seen() -> dict | None:
        seen = by_name_and_pk(tasks())
        fetches_done = all(seen.get((FETCH_TASK, pk), {}).get("state") == "SUCCESS" for pk in pks.values())
        summarises_sent = all((SUMMARISE_TASK, pks[v]) in seen for v in OK_IDS)
        return seen if fetches_done and summarises_sent else None

    seen = wait_until(all_seen, timeout=60, message=lambda: f"every task in flower: {tasks()}")

    for video_id, pk in pks.items():
        fetch = seen[(FETCH_TASK, pk)]
        assert fetch["worker"] == worker.name
        assert fetch["received"] and fetch["started"] and fetch["succeeded"]
        assert fetch["result"] == repr("failed" if video_id == DISABLED_ID else "fetched")
        info = requests.get(f"{flower}/api/task/info/{fetch['uuid']}", auth=AUTH, timeout=5).json()
        assert info["state"] == "SUCCESS" and info["worker"] == worker.name
    for video_id in OK_IDS:
        # No summarise worker runs here: the summarise task was sent (by the fetch worker) and waits.
        summarise = seen[(SUMMARISE_TASK, pks[video_id])]
        assert summarise["state"] == "PENDING" and summarise.get("worker") is None
        assert summarise["parent_id"] == seen[(FETCH_TASK, pks[video_id])]["uuid"]
    assert (SUMMARISE_TASK, pks[DISABLED_ID]) not in seen

    # /api/workers asks the workers over the broker (remote control); refresh past Flower's cache.
    # Its broadcast waits only about a second for replies, so ask again until the worker answers.
    workers = wait_until(
        lambda: requests.get(f"{flower}/api/workers?refresh=1", auth=AUTH, timeout=10).json().get(worker.name) and
        requests.get(f"{flower}/api/workers", auth=AUTH, timeout=10).json(),
        timeout=30, message="the worker in /api/workers",
    )
    assert workers[worker.name]["active_queues"][0]["name"] == "transcripts"

    queues = requests.get(f"{flower}/api/queues/length", auth=AUTH, timeout=10).json()
    assert {"name": "transcripts", "messages": 0} in queues["active_queues"]
    # Flower only measures queues some worker consumes; the waiting summarise messages are in Redis.
    assert redis.Redis.from_url(env["TUBESUM_BROKER_URL"]).llen("summarise") == len(OK_IDS)


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
        env=env, name="gpu-flower",
        argv=["tubesum", "worker", "summarise", "--model", str(tiny_model_dir), "--chunk-size", "4",
              "--device-map", "cpu", "--name", "gpu-flower@%h"],
    )  # fmt: skip
    wait_until(lambda: f'flower_worker_online{{worker="{worker.name}"}} 1.0'
               in requests.get(f"{flower}/metrics", timeout=2).text,
               timeout=30, message="flower to see the GPU worker's events")  # fmt: skip

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("video_id,transcript\n" + "".join(f"vid{i},Owls and bees number {i}.\n" for i in range(4)))
    job_id = submit([], transcripts_csv=str(csv_path), settings=settings)

    from tubesum.models import Batch, Summary, Video
    from tubesum.db import session_scope

    with session_scope(settings.database_url) as s:
        pks = [v.id for v in s.query(Video).filter(Video.job_id == job_id)]

    def summarise_tasks() -> list[dict] | None:
        found = [t for t in requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json().values()
                 if t["name"] == SUMMARISE_TASK and t.get("state") == "SUCCESS"]
        return found if len(found) == len(pks) else None

    found = wait_until(summarise_tasks, timeout=120, message="every summarise task SUCCESS in Flower")
    assert sorted(int(t["args"].strip("()[],")) for t in found) == sorted(pks)
    assert {t["worker"] for t in found} == {worker.name}
    assert {t["result"] for t in found} == {repr("done")}
    with session_scope(settings.database_url) as s:
        batches = {b for (b,) in s.query(Summary.batch_id).filter(Summary.video_pk.in_(pks))}
        assert s.query(Batch).filter(Batch.id.in_(batches)).count() < len(pks)  # shared a chunk


def test_flower_marks_a_killed_worker_offline_when_its_heartbeats_stop(
    flower: str, env: dict[str, str], start_worker, wait_until
) -> None:
    """Workers send heartbeats (every 2 s) with their task events: a worker SIGKILLed (no
    worker-offline event) shows as offline in Flower within seconds."""
    import os
    import signal

    worker = start_worker(env=env, queue="transcripts", name="fetch-hb")

    def alive() -> bool | None:
        return requests.get(f"{flower}/api/workers", params={"status": "true"}, auth=AUTH, timeout=5).json().get(worker.name)

    wait_until(lambda: alive() is True, timeout=30, message="flower to see the worker's heartbeats")
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    wait_until(lambda: alive() is False, timeout=30, message="flower to mark the killed worker offline")
