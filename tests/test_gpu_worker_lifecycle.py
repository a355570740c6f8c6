"""Issue 11, the GPU worker as a user sees it: its log (item 11: the node name expanded, the queue
banner true, one line per chunk) and its shutdown (item 9: Ctrl-C of `tubesum run` is fast). The warm
shutdown used to wait for every message in hand to be summarised (videos waiting for a full chunk
included), so the run killed it after 30 s; now the Batcher drains: the chunk on the GPU finishes,
the others go back at once."""

from __future__ import annotations

import csv
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.test_summarise_worker import add_videos, transcript
from tests.tiny_model import summarise_worker_argv
from tubesum.errors import WorkerStopping
from tubesum.models import Video
from tubesum.workers.summarise.store import VideoInput

# A partial chunk waits this long for more videos, seconds: far longer than any stop may take.
LONG_CHUNK_WAIT_S = 300
# Ctrl-C to exit of `tubesum run`, at most, seconds (the run kills a worker after 30).
FAST_STOP_S = 20


def test_drain_sends_waiting_videos_back_at_once(make_batcher) -> None:
    batcher, sink = make_batcher(chunk_size=4, chunk_wait_s=LONG_CHUNK_WAIT_S)
    futures = [batcher.submit(VideoInput(pk, "Bees dance to show where the flowers are.")) for pk in (1, 2)]
    time.sleep(0.5)
    started = time.monotonic()
    batcher.drain()
    for future in futures:
        assert isinstance(future.exception(timeout=5), WorkerStopping)
    assert time.monotonic() - started < 5 and not sink.batches
    with pytest.raises(WorkerStopping):
        batcher.submit(VideoInput(3, "late"))


@pytest.mark.slow
def test_ctrl_c_of_a_run_with_videos_in_hand_is_fast(embedded_env, tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(
            [("video_id", "transcript"), *((f"csvVideo{i:03d}", "Owls hunt at night.") for i in range(3))]
        )
    env = {**embedded_env, "TUBESUM_CHUNK_WAIT_S": str(LONG_CHUNK_WAIT_S)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tubesum.cli",
            "run",
            "--transcripts",
            str(csv_path),
            "--model",
            "dummy:tiny",
            "--device-map",
            "cpu",
            "--chunk-size",
            "4",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / ".tubesum" / "logs" / "summarise.log"
    deadline = time.monotonic() + 120
    while (log.read_text() if log.exists() else "").count("received") < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < FAST_STOP_S, stderr
    assert proc.returncode == 130 and "workers killed" not in stderr
    text = log.read_text()
    # Every video in hand went back to the queue (whether its task was still claiming or waiting
    # for a chunk when the signal came), then Celery's warm shutdown ran.
    assert sorted(re.findall(r"video (\d+) handed back", text)) == ["1", "2", "3"], text
    assert "warm shutdown" in text.lower()


@pytest.mark.slow
def test_the_worker_log_names_itself_tells_its_queue_and_logs_each_chunk(
    env, settings, db_session, start_worker, wait_until, tiny_model_dir
) -> None:
    from tubesum.celery_app import SUMMARISE_TASK, app

    pks = add_videos(db_session, [transcript(i) for i in range(3)])
    env.update(TUBESUM_MAX_NEW_TOKENS="8", TUBESUM_CHUNK_WAIT_S="1.0")
    worker = start_worker(
        argv=summarise_worker_argv(tiny_model_dir, "gpu-log@%h"),
        name="gpu-log",
        env=env,
    )
    for pk in pks:
        app.send_task(SUMMARISE_TASK, args=[pk])

    def statuses() -> list[str]:
        db_session.expire_all()
        return [s for (s,) in db_session.execute(select(Video.status).where(Video.id.in_(pks)))]

    wait_until(lambda: statuses() == ["done"] * 3, timeout=90, message=lambda: f"videos done: {statuses()}")
    log = worker.log()
    assert f"summarise worker gpu-log@{socket.gethostname()}: chunks of up to 4" in log and "%h:" not in log
    assert re.search(r"\.> summarise\s+exchange=summarise\(direct\) key=summarise", log), log
    assert "exchange=transcripts" not in log
    assert re.search(
        r"chunk 1: 3 videos, [\d.]+k? prompt tok, prefill \d+\.\d s, decode \d+\.\d s, [\d,]+ gen tok/s", log
    ), log
