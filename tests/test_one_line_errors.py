"""Issue 19 (and 18, item 6): every mistake is one line with what to do, exit 2, before anything
is recorded -- through the real ``tubesum`` entry point, as a user runs it, against the real
PostgreSQL and Redis of the test session."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from tubesum.celery_app import TRANSCRIPTS_QUEUE
from tubesum.models import Job, Video
from tubesum.preflight import DUMMY_ARCHS

# The console script pip made, next to this interpreter: the real entry point.
TUBESUM = str(Path(sys.executable).parent / "tubesum")
CLI_TIMEOUT_S = 120
UNREACHABLE_REDIS = "redis://:s3cret@127.0.0.1:1/10"


def tubesum(args: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TUBESUM, *args], env={**env, "COLUMNS": "80"}, cwd=cwd, text=True, capture_output=True, timeout=CLI_TIMEOUT_S
    )


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    detail = f"rc={result.returncode}\nstdout={result.stdout}\nstderr={result.stderr}"
    assert result.returncode == 2, detail
    assert "Traceback" not in result.stderr and "pydantic.dev" not in result.stderr, detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    for fragment in fragments:
        assert fragment in lines[0], detail


def jobs_in(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(Job))
    finally:
        engine.dispose()


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "transcript"])
        writer.writerows(rows)
    return path


@pytest.fixture
def good_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "t.csv", [("csvVideo001", "Bees dance."), ("csvVideo002", "Owls hoot.")])


# --- 1: configuration and connection errors -------------------------------------------------------


def test_a_garbage_database_url_is_one_line(env, tmp_path) -> None:
    result = tubesum(["status"], env={**env, "TUBESUM_DATABASE_URL": "garbage"}, cwd=tmp_path)
    assert_one_line(result, "TUBESUM_DATABASE_URL='garbage'", "not a database URL", "postgresql+psycopg://")


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "csvVideo001"],
        ["retry", "1"],
        ["reconcile"],
        ["worker", "fetch"],
        ["worker", "summarise", "--model", "dummy:tiny", "--device-map", "cpu"],  # before loading the model
    ],
)
def test_a_missing_postgresql_database_is_one_line(env, tmp_path, command) -> None:
    url = make_url(env["TUBESUM_DATABASE_URL"]).set(database="tubesum_never_created")
    bad = {**env, "TUBESUM_DATABASE_URL": url.render_as_string(hide_password=False)}
    assert_one_line(tubesum(command, env=bad, cwd=tmp_path), "does not exist", "createdb tubesum_never_created")


def test_run_against_a_missing_postgresql_database_records_nothing(env, tmp_path, good_csv) -> None:
    url = make_url(env["TUBESUM_DATABASE_URL"]).set(database="tubesum_never_created")
    bad = {**env, "TUBESUM_DATABASE_URL": url.render_as_string(hide_password=False)}
    result = tubesum(["run", "--transcripts", str(good_csv), "--model", "dummy:tiny"], env=bad, cwd=tmp_path)
    assert_one_line(result, "createdb tubesum_never_created", "tubesum db upgrade")


@pytest.mark.parametrize("command", ["submit", "run"])
def test_an_unreachable_broker_is_named_masked_before_any_job(env, db_url, tmp_path, good_csv, command) -> None:
    args = [command, "--transcripts", str(good_csv)] + (["--model", "dummy:tiny"] if command == "run" else [])
    result = tubesum(args, env={**env, "TUBESUM_BROKER_URL": UNREACHABLE_REDIS}, cwd=tmp_path)
    assert_one_line(result, "cannot reach the broker redis://:***@127.0.0.1:1/10", "TUBESUM_BROKER_URL")
    assert "s3cret" not in result.stderr + result.stdout
    assert jobs_in(db_url) == 0


def test_a_usage_error_is_one_line_and_help_names_the_exit_codes(env, tmp_path) -> None:
    assert_one_line(tubesum(["--bogus"], env=env, cwd=tmp_path), "No such option: --bogus", "tubesum --help")
    page = tubesum(["--help"], env=env, cwd=tmp_path).stdout
    assert "any video failed" in " ".join(page.split())


def test_an_unknown_broker_transport_is_one_line(env, tmp_path) -> None:
    result = tubesum(["status"], env={**env, "TUBESUM_BROKER_URL": "foo://user:pw@bar"}, cwd=tmp_path)
    assert_one_line(result, "TUBESUM_BROKER_URL='foo://user:***@bar'", "not a broker URL")


# --- 1 and 2: every option is checked before anything is recorded --------------------------------


@pytest.mark.parametrize(
    ("options", "extra_env", "fragments"),
    [
        (["--chunk-size", "abc"], {}, ["--chunk-size='abc'", "'auto'"]),
        (["--max-new-tokens", "abc"], {}, ["'--max-new-tokens'", "tubesum run --help"]),
        (["--max-new-tokens", "-5"], {}, ["--max-new-tokens=-5", "greater than or equal to 1"]),
        (["--dtype", "float8"], {}, ["--dtype='float8'", "'bfloat16'"]),
        (["--attn", "bogus"], {}, ["--attn='bogus'", "'sdpa'"]),
        (["--device-map", "gpu0"], {}, ["--device-map='gpu0'", "cuda:N"]),
        ([], {"TUBESUM_ROLLING": "maybe"}, ["TUBESUM_ROLLING='maybe'", "boolean"]),
        (["--model", "dummy:nope"], {}, ["dummy:nope", "tiny"]),
        # No CUDA device visible (on a GPU box too): refused before the job, not 16 s into a worker.
        (["--device-map", "cuda:0"], {"CUDA_VISIBLE_DEVICES": ""}, ["--device-map cuda:0 needs a CUDA GPU", "cpu"]),
    ],
)
def test_run_refuses_a_bad_option_before_recording(env, db_url, tmp_path, good_csv, options, extra_env, fragments):
    args = ["run", "--transcripts", str(good_csv), "--model", "dummy:tiny", *options]
    result = tubesum(args, env={**env, **extra_env}, cwd=tmp_path)
    assert_one_line(result, *fragments)
    assert jobs_in(db_url) == 0
    assert not (tmp_path / ".tubesum" / "logs").exists()  # no worker was started


def test_the_dummy_architectures_are_the_ones_the_worker_builds() -> None:
    from tubesum.workers.gpu.dummy import ARCHS

    assert set(DUMMY_ARCHS) == set(ARCHS)


# --- 6: an unterminated quote --------------------------------------------------------------------


def test_an_unterminated_quote_is_refused_naming_its_line(env, db_url, tmp_path) -> None:
    path = tmp_path / "quote.csv"
    path.write_text('video_id,transcript\ncsvVideo001,"never closed\ncsvVideo002,second\ncsvVideo003,third\n')
    result = tubesum(["submit", "--transcripts", str(path)], env=env, cwd=tmp_path)
    assert_one_line(result, "line 2", "never closed")
    assert jobs_in(db_url) == 0


# --- 7: submit's line, retry's answers ------------------------------------------------------------


def test_submit_says_how_many_videos_are_queued_and_quiet_prints_the_id(env, db_url, tmp_path) -> None:
    path = write_csv(
        tmp_path / "t.csv", [("csvVideo001", "Bees dance."), ("csvVideo002", ""), ("csvVideo003", "Owls.")]
    )
    said = tubesum(["submit", "--transcripts", str(path)], env=env, cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    assert re.fullmatch(r"job (\d+): 2 videos queued; 1 refused \(`tubesum status \1` says why\)\n", said.stdout)
    quiet = tubesum(["submit", "--quiet", "csvVideo009"], env=env, cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.strip().isdigit(), quiet.stderr


def test_retry_keeps_a_csv_videos_source_and_says_when_no_reason_matches(env, redis_url, tmp_path) -> None:
    path = write_csv(tmp_path / "t.csv", [("csvVideo001", "Bees dance."), ("csvVideo002", ""), ("csvVideo003", " ")])
    job = tubesum(["submit", "--quiet", "--transcripts", str(path)], env=env, cwd=tmp_path).stdout.strip()
    queue = redis.Redis.from_url(redis_url)
    before = queue.llen(TRANSCRIPTS_QUEUE)
    retried = tubesum(["retry", job], env=env, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 0 failed videos" in retried.stdout and "2 not retried" in retried.stdout, retried.stdout
    assert "comes from the CSV, not YouTube" in retried.stdout
    assert queue.llen(TRANSCRIPTS_QUEUE) == before  # nothing was sent to YouTube's fetchers
    engine = create_engine(env["TUBESUM_DATABASE_URL"])
    with engine.connect() as conn:
        reasons = conn.execute(select(Video.error).where(Video.job_id == int(job), Video.status == "failed")).all()
    engine.dispose()
    assert [r for (r,) in reasons] == ["empty transcript in CSV"] * 2
    unmatched = tubesum(["retry", job, "--failed-reason", "no such text"], env=env, cwd=tmp_path)
    assert "none of its 2 failed videos has a reason containing 'no such text'" in unmatched.stdout, unmatched.stdout


def test_the_fetch_worker_refuses_a_database_without_tables(env, tmp_path) -> None:
    sqlite = {**env, "TUBESUM_DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}"}
    assert_one_line(tubesum(["worker", "fetch"], env=sqlite, cwd=tmp_path), "tubesum db upgrade")
    assert not (tmp_path / "none.db").exists()


# --- 5: run --reuse (two real runs with worker processes) ------------------------------------------


@pytest.mark.slow
def test_run_reuse_takes_over_the_summaries_of_the_first_run(embedded_env, tmp_path, good_csv) -> None:
    args = ["run", "--transcripts", str(good_csv), "--model", "dummy:tiny", "--max-new-tokens", "8"]
    first = tubesum(args, env=embedded_env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = tubesum([*args, "--reuse"], env=embedded_env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 video(s) took over an existing summary" in again.stderr, again.stderr
    assert "job 2: 2 summarised, 0 awaiting summary, 0 failed of 2" in again.stdout


def test_flash_attention_without_its_package_is_said() -> None:
    import importlib.util

    from tubesum.preflight import attn_note

    note = attn_note("flash_attention_2")
    if importlib.util.find_spec("flash_attn") is None:  # the CPU box and the GPU box here: not installed
        assert note is not None and "SDPA" in note
    else:
        assert note is None
    assert attn_note("sdpa") is None and attn_note("auto") is None


def test_a_device_map_is_checked_against_the_devices_torch_sees() -> None:
    from tubesum.errors import BadInput
    from tubesum.preflight import check_device_map

    check_device_map("cpu", devices=0)
    check_device_map("cuda:1", devices=2)
    with pytest.raises(BadInput, match="needs 2 CUDA devices and torch sees 1"):
        check_device_map("cuda:1", devices=1)
    with pytest.raises(BadInput, match="--tensor-parallel 4 needs 4"):
        check_device_map("auto", tensor_parallel=4, devices=2)
