"""`tubesum submit --wait` as a user runs it: a live progress bar until every video is terminal,
exit 0 when all were summarised, 1 when any failed. Real summarise worker, Redis, PostgreSQL."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_model import summarise_worker_argv

WAIT_TIMEOUT_S = 240


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "transcript"])
        w.writerows(rows)
    return path


def submit_wait(csv_path: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "submit", "--transcripts", str(csv_path), "--wait"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=WAIT_TIMEOUT_S,
    )


@pytest.mark.slow
def test_submit_wait_exits_0_when_all_done_and_1_when_any_failed(env, tmp_path, start_worker, tiny_model_dir):
    env = {**env, "TUBESUM_MAX_NEW_TOKENS": "8", "TUBESUM_CHUNK_WAIT_S": "0.5"}
    start_worker(
        argv=summarise_worker_argv(tiny_model_dir, "gpu-wait@%h"),
        name="gpu-wait",
        env=env,
    )

    good = write_csv(
        tmp_path / "good.csv",
        [
            ("owls0000001", "Owls can turn their heads very far."),
            ("bees0000001", "Bees dance to show where flowers are."),
        ],
    )
    done = submit_wait(good, env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.match(r"job \d+: 2 videos queued$", done.stdout.splitlines()[0])  # the job first
    assert "summarised 2" in done.stdout and "failed 0" in done.stdout

    mixed = write_csv(
        tmp_path / "mixed.csv", [("fox00000001", "Foxes hear a watch ticking forty metres away."), ("empty000001", "")]
    )
    failed = submit_wait(mixed, env, tmp_path)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "summarised 1" in failed.stdout and "failed 1" in failed.stdout
    assert "Traceback" not in failed.stdout + failed.stderr
