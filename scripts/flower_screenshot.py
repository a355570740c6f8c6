"""A headless Chromium screenshot of Flower's tasks page during a small real job (docs/flower-*.png).

What it shows a person (issue 11 items 12-14): every task's arguments as ``job=N video=ID``, the
result of each (characters fetched; summary length, batch, generate seconds), and a video whose
transcripts are disabled as a FAILURE with its reason. Everything runs on this machine: a scratch
PostgreSQL database, an empty Redis database number, `tubesum flower`, a fetch worker answering
from recorded YouTube responses (tests/youtube_replay.py: no network), and a summarise worker on
``dummy:tiny`` (CPU, random weights). Needs PostgreSQL, Redis and Debian's ``chromium``.

    python scripts/flower_screenshot.py            # writes docs/flower-tasks.png and docs/flower-failed.png
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from psycopg import sql
from sqlalchemy import create_engine, func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.big_submit import PG_ADMIN_URL, REDIS_SERVER_URL, admin_sql, claim_redis  # noqa: E402
from tests.youtube_replay import REPLAY_ENV  # noqa: E402
from tubesum.models import Video  # noqa: E402

JOBS = [["okVideo0001", "okVideo0002", "okVideo0003", "noCaptions1"], ["otherJob001"]]
DISABLED = "noCaptions1"
# How long the workers and the job may take on a busy CPU, seconds.
READY_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
# Browser window, pixels; and how long the page may run its scripts (the task table loads by XHR), ms.
WINDOW = "2200,760"
PAGE_BUDGET_MS = 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def screenshot(url: str, out: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium: apt-get install chromium")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={WINDOW}",
            f"--virtual-time-budget={PAGE_BUDGET_MS}",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tubesum-flower-shot-"))
    db_name = f"tubesum_shot_{secrets.token_hex(4)}"
    admin_sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
    redis_db = claim_redis()
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}"
    (work / "replay.json").write_text(json.dumps({"videos": {DISABLED: "transcripts_disabled"}, "default": "ok"}))
    user, password = "admin", secrets.token_hex(8)
    port = free_port()
    env = {
        **os.environ,
        "TUBESUM_DATABASE_URL": db_url,
        "TUBESUM_BROKER_URL": f"{REDIS_SERVER_URL}/{redis_db}",
        "PYTHONPATH": str(ROOT),
        REPLAY_ENV: str(work / "replay.json"),
        "FLOWER_BASIC_AUTH": f"{user}:{password}",
        "TUBESUM_MAX_NEW_TOKENS": "24",
        "TUBESUM_CHUNK_WAIT_S": "1",
    }
    tubesum = [sys.executable, "-m", "tubesum.cli"]
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], name: str) -> None:
        log = (work / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(argv, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    try:
        subprocess.run([*tubesum, "db", "upgrade"], env=env, check=True, capture_output=True)
        start([*tubesum, "flower", "--port", str(port)], "flower")
        start(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.youtube_replay:worker_app",
                "worker",
                "-Q",
                "transcripts",
                "-P",
                "threads",
                "-c",
                "2",
                "-n",
                "fetch@%h",
                "-E",
                "--without-mingle",
                "--without-gossip",
            ],
            "fetch",
        )
        start(
            [*tubesum, "worker", "summarise", "--model", "dummy:tiny", "--device-map", "cpu", "--chunk-size", "4"],
            "gpu",
        )
        base = f"http://127.0.0.1:{port}"

        def online() -> bool:
            try:
                metrics = requests.get(f"{base}/metrics", timeout=2).text
            except requests.ConnectionError:
                return False
            return metrics.count("flower_worker_online{") >= 2 and " 0.0" not in "".join(
                line for line in metrics.splitlines() if line.startswith("flower_worker_online{")
            )

        wait(online, READY_TIMEOUT_S, "Flower to see both workers")
        for ids in JOBS:
            subprocess.run([*tubesum, "submit", *ids], env=env, check=True, capture_output=True)
        engine = create_engine(db_url)

        def finished() -> bool:
            with engine.connect() as c:
                open_videos = c.execute(
                    select(func.count()).select_from(Video).where(Video.status.not_in(["done", "failed"]))
                ).scalar_one()
            return open_videos == 0

        wait(finished, JOB_TIMEOUT_S, "the jobs to finish")
        time.sleep(2)  # the last task events reach Flower
        docs = ROOT / "docs"
        screenshot(f"http://{user}:{password}@127.0.0.1:{port}/tasks", docs / "flower-tasks.png")
        screenshot(f"http://{user}:{password}@127.0.0.1:{port}/tasks?state=FAILURE", docs / "flower-failed.png")
        print(f"wrote {docs / 'flower-tasks.png'} and {docs / 'flower-failed.png'}")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        import redis

        redis.Redis.from_url(f"{REDIS_SERVER_URL}/{redis_db}").flushdb()
        admin_sql(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db_name)))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
