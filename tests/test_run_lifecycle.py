"""Issue 11, ``tubesum run`` and ``submit --wait`` with real worker processes: a dying worker ends a
run started in the background, SIGTERM and a second Ctrl-C leave no process behind, a run says what
leftover work it takes, YouTube offline fails fast with its cause in the progress line, and
``submit --wait`` says when no worker consumes the queue it waits on."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.youtube_replay import REPLAY_ENV
from tubesum.models import Job, Video

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 150
# A run whose worker died must end this soon (the worker imports torch, then fails to load).
DEAD_WORKER_END_S = 90
# After the second Ctrl-C the run must be gone this soon, seconds (workers killed, not waited for).
FORCED_STOP_S = 8
# YouTube offline: the job must end this soon, not after 73 s of retries.
OFFLINE_JOB_S = 60
# `submit --wait` must name the missing worker within this, seconds (hint every HINT_EVERY_S).
HINT_WITHIN_S = 40


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "transcript"])
        writer.writerows(rows)
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tubesum.cli", *args]


def replay(env: dict[str, str], default: str, **extra: object) -> None:
    Path(env[REPLAY_ENV]).write_text(json.dumps({"videos": {}, "default": default, **extra}))


def wait_for_text(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in (path.read_text(errors="replace") if path.exists() else ""):
        assert proc.poll() is None, f"run ended before {needle!r}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never saw {needle!r} in {path}"
        time.sleep(0.2)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def assert_all_gone(procs: list[psutil.Process], timeout: float = 5) -> None:
    """Every process gone (a zombie counts as gone); any left is killed so no test leaks one."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.cmdline())
                p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, left


# --- 1: a dying worker ends the run, however it was started ---------------------------------------------


def test_a_dead_worker_ends_a_run_started_in_the_background(embedded_env, tmp_path: Path) -> None:
    # A model that passes the quick check (config.json, a whole safetensors header, a tokenizer
    # file) but cannot be loaded: the weights hold no tensor and the tokenizer file is not JSON.
    model = tmp_path / "weights-missing"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    (model / "tokenizer.json").write_text("not a tokenizer")
    csv_path = write_csv(tmp_path / "t.csv", [("csvVideo001", "a transcript")])
    command = shlex.join(cli("run", "--transcripts", str(csv_path), "--model", str(model)))
    # `cmd &` in a non-interactive shell runs with SIGINT ignored: the old watchdog's
    # interrupt_main() never arrived and the run hung forever.
    script = f"{command} > out.txt 2>&1 & wait $!; echo $? > rc.txt"
    started = time.monotonic()
    subprocess.run(["bash", "-c", script], env=embedded_env, cwd=tmp_path, timeout=DEAD_WORKER_END_S + 30)
    assert time.monotonic() - started < DEAD_WORKER_END_S
    out = (tmp_path / "out.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1", out
    assert "error: the summarise worker exited with code 2" in out and "could not load model" in out, out
    assert "Traceback" not in out.split("last lines of")[0]


# --- 2 and 9: SIGTERM, and a second Ctrl-C ---------------------------------------------------------------


def test_sigterm_stops_every_child_of_the_run(embedded_env, tmp_path: Path) -> None:
    replay(embedded_env, "http_429")
    embedded_env["TUBESUM_FETCH_BACKOFF_BASE_S"] = "60"
    proc = subprocess.Popen(
        cli("run", "blocked0001", "--fetch-only"),
        env=embedded_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_text(tmp_path / ".tubesum" / "logs" / "fetch.log", "retrying in", proc)
    children = descendants(proc.pid)
    assert len(children) >= 2  # the fetch worker and its pool
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated: workers stopped" in stderr and "Traceback" not in stderr
    assert_all_gone(children)


def test_workers_end_even_when_the_run_is_killed(embedded_env, tmp_path: Path) -> None:
    replay(embedded_env, "http_429")
    embedded_env["TUBESUM_FETCH_BACKOFF_BASE_S"] = "60"
    proc = subprocess.Popen(
        cli("run", "blocked0001", "--fetch-only"),
        env=embedded_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_text(tmp_path / ".tubesum" / "logs" / "fetch.log", "retrying in", proc)
    children = descendants(proc.pid)
    proc.kill()  # SIGKILL: no handler runs; the kernel tells the workers (PR_SET_PDEATHSIG)
    proc.wait(timeout=10)
    assert_all_gone(children, timeout=40)
    assert "Warm shutdown" in (tmp_path / ".tubesum" / "logs" / "fetch.log").read_text()


def test_a_second_ctrl_c_kills_the_workers_at_once(embedded_env, tmp_path: Path) -> None:
    replay(embedded_env, "slow", slow_s=120)  # a fetch in progress: the warm shutdown would wait for it
    proc = subprocess.Popen(
        cli("run", "slowVideo01", "--fetch-only"),
        env=embedded_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_text(tmp_path / ".tubesum" / "logs" / "fetch.log", "received", proc)
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None  # still waiting for the warm shutdown
    proc.send_signal(signal.SIGINT)
    forced = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - forced < FORCED_STOP_S
    assert proc.returncode == 130, stderr
    assert "Ctrl-C again to kill them now" in stderr and "workers killed" in stderr
    assert "Traceback" not in stderr
    assert_all_gone(children)


# --- 3: leftovers of earlier jobs ----------------------------------------------------------------------


def test_a_run_says_what_leftover_work_it_picks_up(embedded_env, tmp_path: Path) -> None:
    assert subprocess.run(cli("db", "upgrade"), env=embedded_env, cwd=tmp_path).returncode == 0
    engine = create_engine(f"sqlite:///{tmp_path / 'tubesum.db'}")
    with Session(engine) as session:  # a job an earlier run left half done
        job = Job(id=7, sources=[], model="org/old")
        session.add(job)
        session.add_all(
            Video(job=job, video_id=f"old{i:08d}", position=i, status=status)
            for i, status in enumerate(("queued", "fetched", "done"))
        )
        session.commit()
    engine.dispose()
    csv_path = write_csv(tmp_path / "t.csv", [("csvVideo001", "a transcript")])
    result = subprocess.run(
        cli("run", "--transcripts", str(csv_path), "--fetch-only", "-o", "exports/"),
        env=embedded_env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("exported to exports/tubesum-job-8.csv")  # -o dir/: the default name in it
    assert (tmp_path / "exports" / "tubesum-job-8.csv").is_file()
    assert (
        "note: 2 unfinished videos of earlier job 7 are still queued; this run's workers take them first "
        "and fetch their transcripts (`tubesum status 7` shows them)"
    ) in result.stderr


# --- 8: YouTube offline -------------------------------------------------------------------------------


def test_youtube_offline_fails_fast_with_the_cause(embedded_env, tmp_path: Path) -> None:
    replay(embedded_env, "dns_failure")
    started = time.monotonic()
    result = subprocess.run(
        cli("run", "okVideo0001", "okVideo0002", "--fetch-only", "-o", "out.jsonl"),
        env=embedded_env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert time.monotonic() - started < OFFLINE_JOB_S
    assert result.returncode == 1 and "2 failed of 2" in result.stdout, result.stdout + result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(r["error"].startswith("cannot resolve YouTube's host name (offline, or no DNS)") for r in rows), rows
    # The run names each failed video's reason, and the way to a job without the network.
    assert "failed: okVideo0001: cannot resolve YouTube's host name" in result.stderr, result.stderr
    assert "--transcripts examples/nature_transcripts.csv" in result.stderr
    assert "retrying in" not in (tmp_path / ".tubesum" / "logs" / "fetch.log").read_text()


def test_the_progress_line_names_a_retried_fetchs_cause(embedded_env, tmp_path: Path) -> None:
    replay(embedded_env, "http_429")
    embedded_env["TUBESUM_FETCH_BACKOFF_BASE_S"] = "60"
    result = subprocess.run(
        cli("run", "blocked0001", "--model", "dummy:tiny", "--device-map", "cpu", "--timeout", "15"),
        env=embedded_env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 1, result.stderr
    bar = result.stdout
    first, second = bar.splitlines()[:2]  # the bar, then its counts and the latest problem
    assert first.startswith("job 1 ") and "0/1" in first and "ETA" in first and "elapsed 0:00:1" in first, bar
    assert second.startswith("queued 1 · fetched 0 · summarised 0 · failed 0 · retrying: IpBlocked"), bar


# --- 9: submit --wait with no worker --------------------------------------------------------------------


def test_submit_wait_says_when_no_worker_consumes_the_queue(env: dict[str, str], tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "t.csv", [("csvVideo001", "a transcript")])
    proc = subprocess.Popen(
        cli("submit", "--transcripts", str(csv_path), "--wait"),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + HINT_WITHIN_S
    while not any("no live worker consumes" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.5)
    hint = next(line for line in lines if "no live worker consumes" in line)
    assert "the summarise queue: start one with `tubesum worker summarise`" in hint
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped watching; job" in stderr and "Traceback" not in stderr
