"""`tubesum run`: the whole job on one machine with real worker processes it starts and stops.

Embedded (no TUBESUM_BROKER_URL / TUBESUM_DATABASE_URL): a SQLite file and the filesystem broker in
the working directory. Distributed: the same command against the test Redis and PostgreSQL.
The full summarise path (tiny model, 20 videos) is the GPU worker's end-to-end test; here
``--fetch-only`` stops once every video has a transcript, leaving its summarise message queued.
"""

from __future__ import annotations

import base64
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.youtube_replay import REPLAY_ENV
from tubesum import embedded
from tubesum.embedded import LocalWorker, WorkerDied, run_job, run_settings

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 120


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "transcript", "title"])
        writer.writerows(rows)
    return path


def tubesum(args: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tubesum.cli", *args],
        env=env,
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )


def summarise_messages(workdir: Path) -> list[int]:
    """Video pks of the summarise messages waiting in the embedded broker's queue folder."""
    pks = []
    for path in sorted((workdir / ".tubesum" / "broker" / "queue").glob("*.summarise.msg")):
        message = json.loads(path.read_text())
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        pks.append(json.loads(body)[0][0])  # Celery protocol 2: [args, kwargs, embed]
    return sorted(pks)


def test_embedded_run_fetches_and_queues_every_video_for_summary(embedded_env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    csv_path = write_csv(
        tmp_path / "t.csv", [("csvVideo001", "a transcript", "From CSV"), ("csvEmpty001", "", "Empty")]
    )
    result = tubesum(
        [
            "run",
            "okVideo0001",
            "okVideo0002",
            "noCaptions1",
            "--transcripts",
            str(csv_path),
            "--fetch-only",
            "-o",
            "out.jsonl",
        ],
        env=embedded_env,
        cwd=work,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # 1: some videos failed
    assert "3 awaiting summary, 2 failed of 5" in result.stdout

    # Everything lives in the working directory: the SQLite file and the broker's folders.
    assert (work / "tubesum.db").is_file()
    rows = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
    by_id = {r["video_id"]: r for r in rows}
    assert {v: r["status"] for v, r in by_id.items()} == {
        "okVideo0001": "fetched",
        "okVideo0002": "fetched",
        "noCaptions1": "failed",
        "csvVideo001": "fetched",
        "csvEmpty001": "failed",
    }
    assert by_id["okVideo0001"]["transcript_chars"] > 0 and by_id["okVideo0001"]["language_code"] == "en"
    assert "disabled" in by_id["noCaptions1"]["error"].lower()

    engine = create_engine(f"sqlite:///{work / 'tubesum.db'}")
    with engine.connect() as conn:
        fetched_pks = sorted(pk for (pk,) in conn.execute(text("SELECT id FROM videos WHERE status = 'fetched'")))
    engine.dispose()
    assert summarise_messages(work) == fetched_pks  # every fetched video waits on the summarise queue

    # The fetch worker ran the task and was stopped with a warm shutdown.
    log = (work / ".tubesum" / "logs" / "fetch.log").read_text()
    assert "succeeded" in log and "Warm shutdown" in log


def test_run_uses_redis_and_postgresql_when_configured(env: dict[str, str], db_url: str, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "t.csv", [(f"csvVideo{i:03d}", f"transcript {i}", "") for i in range(4)])
    result = tubesum(["run", "--transcripts", str(csv_path), "--fetch-only"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "tubesum.db").exists()
    assert redis.Redis.from_url(env["TUBESUM_BROKER_URL"]).llen("summarise") == 4
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM videos WHERE status = 'fetched'")).scalar() == 4
    engine.dispose()
    export = next(tmp_path.glob("tubesum-job-*.csv"))  # the default export name
    assert len(export.read_text().splitlines()) == 5


def test_bad_export_suffix_fails_before_any_work(embedded_env: dict[str, str], tmp_path: Path) -> None:
    result = tubesum(["run", "okVideo0001", "-o", "out.xlsx"], env=embedded_env, cwd=tmp_path)
    assert result.returncode == 2
    assert ".csv or .jsonl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / ".tubesum" / "logs").exists()


def test_ctrl_c_stops_the_workers(embedded_env: dict[str, str], tmp_path: Path) -> None:
    # YouTube keeps answering 429 and the retry waits a minute: the job cannot end by itself.
    replay = Path(embedded_env[REPLAY_ENV])
    replay.write_text(json.dumps({"videos": {}, "default": "http_429"}))
    embedded_env["TUBESUM_FETCH_BACKOFF_BASE_S"] = "60"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tubesum.cli", "run", "blocked0001", "--fetch-only"],
        env=embedded_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fetch_log = tmp_path / ".tubesum" / "logs" / "fetch.log"
    deadline = time.monotonic() + 60
    while "retrying in" not in (fetch_log.read_text() if fetch_log.exists() else ""):
        assert proc.poll() is None, "run ended on its own: " + proc.communicate()[1]
        assert time.monotonic() < deadline, "the fetch never failed once"
        time.sleep(0.2)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: workers stopped" in stderr and "Traceback" not in stderr
    assert "Warm shutdown" in fetch_log.read_text()
    assert time.monotonic() - started < embedded.WORKER_STOP_TIMEOUT_S  # stopped, not killed


def test_a_dying_worker_stops_the_run_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clear_settings_cache: None
) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("TUBESUM_BROKER_URL", "TUBESUM_DATABASE_URL", "TUBESUM_EMBEDDED_DIR"):
        monkeypatch.delenv(key, raising=False)
    dying = [
        sys.executable,
        "-c",
        "import sys, time; print('loading model... out of luck'); time.sleep(1); sys.exit(3)",
    ]
    monkeypatch.setattr(
        embedded,
        "local_workers",
        lambda settings, **_: [LocalWorker("summarise", dying, tmp_path / "logs" / "summarise.log")],
    )
    csv_path = write_csv(tmp_path / "t.csv", [("csvVideo001", "text", "")])
    with pytest.raises(WorkerDied, match=r"(?s)summarise worker exited with code 3.*out of luck"):
        run_job(
            [], transcripts_csv=csv_path, settings=run_settings(model="dummy:tiny"), show_progress=False, timeout_s=30
        )


def test_run_settings_overrides_are_validated(
    monkeypatch: pytest.MonkeyPatch, clear_settings_cache: None, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUBESUM_DATABASE_URL", raising=False)
    settings = run_settings(model="m/x", chunk_size="auto", max_new_tokens=50)
    assert (settings.model, settings.chunk_size, settings.max_new_tokens) == ("m/x", "auto", 50)
    assert settings.database_url == f"sqlite:///{tmp_path / 'tubesum.db'}"  # absolute for every worker
    with pytest.raises(ValueError):
        run_settings(chunk_size="0")


def test_filesystem_broker_carries_control_traffic_between_processes(
    env: dict[str, str], tmp_path: Path, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remote control (ping, inspect) reaches a worker in another process through the embedded
    broker's control folder; its task events with no listener leave no files behind."""
    from tubesum.celery_app import create_app
    from tubesum.settings import Settings

    fs_env = {k: v for k, v in env.items() if k != "TUBESUM_BROKER_URL"}
    worker = start_worker(env=fs_env, queue="transcripts", pool="solo", concurrency=1, name="fs-control")
    monkeypatch.delenv("TUBESUM_BROKER_URL", raising=False)
    app = create_app(Settings(embedded_dir=Path(fs_env["TUBESUM_EMBEDDED_DIR"])))
    assert app.conf.broker_url == "filesystem://"
    replies = app.control.ping(destination=[worker.name], timeout=5)
    assert replies == [{worker.name: {"ok": "pong"}}]
    queues = app.control.inspect(destination=[worker.name], timeout=5).active_queues()
    assert [q["name"] for q in queues[worker.name]] == ["transcripts"]
    worker.stop()
    leftovers = list((Path(fs_env["TUBESUM_EMBEDDED_DIR"]) / "broker" / "queue").iterdir())
    assert not [p for p in leftovers if "celeryev" in p.name], leftovers
