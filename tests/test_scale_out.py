"""Several summarise workers on one queue: `tubesum run --gpu-workers N` (issue 20), and two
started by hand on one host (issue 18).

The GPU split is a pure function; the runs are two real CPU workers of the tiny model taking
chunks from one queue (embedded, or Redis and PostgreSQL), each writing batch rows under its own
node name (`gpu0@host`).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tests.conftest import HOSTNAME
from tests.slow_gpu_worker import SLOW_CHUNK_ENV
from tests.test_faults import REPO, submit_ids, wait_statuses
from tubesum.embedded import gpu_groups
from tubesum.errors import BadInput
from tubesum.models import Batch, Video

RUN_TIMEOUT_S = 300
VIDEOS = 24
CHUNK = 4
# Each chunk of the hand-started workers takes this much longer, seconds: neither drains the queue
# alone (each holds at most 2 x CHUNK messages), so both write batch rows.
SLOW_CHUNK_S = 1.0


def test_gpu_groups_split_the_visible_gpus_in_order() -> None:
    assert gpu_groups(workers=2, per_worker=1, visible=None) == ["0", "1"]
    assert gpu_groups(workers=2, per_worker=2, visible="4,5,6,7") == ["4,5", "6,7"]
    assert gpu_groups(workers=1, per_worker=1, visible="3, 5") == ["3"]
    with pytest.raises(BadInput, match="need 4 GPUs.*names 3"):
        gpu_groups(workers=2, per_worker=2, visible="0,1,2")


def tubesum(args: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "tubesum"), *args],
        env=env,
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )


def embedded(env: dict[str, str]) -> dict[str, str]:
    run_env = {
        k: v for k, v in env.items() if k not in ("TUBESUM_BROKER_URL", "TUBESUM_DATABASE_URL", "TUBESUM_EMBEDDED_DIR")
    }
    run_env.update(TUBESUM_MAX_NEW_TOKENS="16", TUBESUM_DEVICE_MAP="cpu", TUBESUM_CHUNK_WAIT_S="1")
    return run_env


def test_a_bad_gpu_worker_count_records_nothing(env, tmp_path) -> None:
    (tmp_path / "t.csv").write_text("video_id,transcript\nvideo000001,some words\n")
    result = tubesum(
        ["run", "--transcripts", "t.csv", "--model", "dummy:tiny", "--device-map", "cpu", "--gpu-workers", "0"],
        env=embedded(env),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'--gpu-workers': Input should be greater than or equal to 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "tubesum.db").exists()  # refused before anything was recorded


@pytest.mark.slow
def test_two_workers_share_one_queue(env, tmp_path, tiny_model_dir) -> None:
    with (tmp_path / "transcripts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "transcript", "title"])
        writer.writerows((f"video{i:06d}", f"Fact number {i}: owls turn their heads far.", "") for i in range(VIDEOS))
    args = ["run", "--transcripts", "transcripts.csv", "--model", str(tiny_model_dir), "--chunk-size", str(CHUNK)]
    result = tubesum([*args, "--gpu-workers", "2", "--timeout", "200"], env=embedded(env), cwd=tmp_path)
    logs = tmp_path / ".tubesum" / "logs"
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{VIDEOS} summarised" in result.stdout
    assert (logs / "summarise-0.log").is_file() and (logs / "summarise-1.log").is_file()

    engine = create_engine(f"sqlite:///{tmp_path / 'tubesum.db'}")
    with Session(engine) as session:
        hosts = session.scalars(select(Batch.worker_host)).all()
        leased_by = {v.status for v in session.scalars(select(Video))}
    engine.dispose()
    assert leased_by == {"done"}
    # Both workers took chunks, each under its own node name (as in leases, Flower and reports).
    assert set(hosts) == {f"gpu0@{HOSTNAME}", f"gpu1@{HOSTNAME}"}, hosts


@pytest.mark.slow
def test_hand_started_workers_of_one_host_name_their_own_batches(
    env, db_url, start_worker, wait_until, tiny_model_dir
) -> None:
    """`tubesum worker summarise --name gpu0` and `-n gpu1@%h` on one host, one Redis queue: each
    batch row names the worker that ran it (both rows read the host's name before)."""
    common = ["--model", str(tiny_model_dir), "--device-map", "cpu", "--chunk-size", str(CHUNK)]
    common += ["--chunk-wait", "0.3", "--max-new-tokens", "8"]
    worker_env = {**env, SLOW_CHUNK_ENV: str(SLOW_CHUNK_S)}
    for name, option in (("gpu0", ["--name", "gpu0"]), ("gpu1", ["-n", "gpu1@%h"])):
        argv = [sys.executable, "-m", "tests.slow_gpu_worker", *common, *option]
        start_worker(env=worker_env, cwd=REPO, name=name, argv=argv)
    engine = create_engine(db_url)
    try:
        job_id = submit_ids([f"hand{i:07d}" for i in range(VIDEOS)], env, transcripts=True)
        wait_statuses(wait_until, engine, job_id, ("done",), timeout=RUN_TIMEOUT_S)
        with Session(engine) as session:
            hosts = session.scalars(select(Batch.worker_host)).all()
    finally:
        engine.dispose()
    assert set(hosts) == {f"gpu0@{HOSTNAME}", f"gpu1@{HOSTNAME}"}, hosts
