"""Numbers, drivers and folders a user sets: each mistake is one line naming the option (or the
TUBESUM_ variable) that was set, exit 2, before anything is recorded or created -- through the
real ``tubesum`` entry point, against the test session's PostgreSQL (and Redis where named)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.test_one_line_errors import assert_one_line, jobs_in, tubesum, write_csv

RUN = ["run", "--model", "dummy:tiny", "--transcripts"]


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    """A CSV that `run` accepts: what is refused is only the option under test."""
    return write_csv(tmp_path / "t.csv", [("csvVideo001", "Bees dance.")])


def embedded_broker(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the filesystem broker under TUBESUM_EMBEDDED_DIR (in tmp_path), PostgreSQL kept:
    the broker check makes that folder, so a refusal after it would leave it behind."""
    return {k: v for k, v in env.items() if k != "TUBESUM_BROKER_URL"}


def missing(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is not None, reason=f"{module} is installed here")


# --- the numbers of `run`, `worker`, `reconcile`, `flower` -----------------------------------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--fetch-concurrency", "-5"], ["'--fetch-concurrency'", "greater than or equal to 1"]),
        (["--fetch-concurrency", "0"], ["'--fetch-concurrency'", "greater than or equal to 1"]),
        (["--gpu-workers", "0"], ["'--gpu-workers'", "greater than or equal to 1"]),
        (["--timeout", "0"], ["'--timeout'", "0 is not more than 0 seconds"]),
        (["--timeout", "-1"], ["'--timeout'", "-1 is not more than 0 seconds"]),
        (["--quantize", "int4"], ["--quantize='int4'", "'fp8'"]),
        (["--kv-cache-dtype", "fp16"], ["--kv-cache-dtype='fp16'", "'fp8'"]),
    ],
)
def test_run_refuses_a_bad_option_naming_it_and_creates_nothing(env, db_url, tmp_path, csv_file, options, fragments):
    result = tubesum([*RUN, str(csv_file), *options], env=embedded_broker(env), cwd=tmp_path)
    assert_one_line(result, *fragments)
    assert "TUBESUM_" not in result.stderr  # the option was set, not the variable
    assert jobs_in(db_url) == 0
    assert not (tmp_path / ".tubesum").exists()


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        (["worker", "fetch", "--concurrency", "-5"], ["'--concurrency'", "greater than or equal to 1"]),
        (["worker", "summarise", "--model", "dummy:tiny", "--chunk-wait", "-1"], ["--chunk-wait=-1.0", "0"]),
        (["reconcile", "--stuck-after", "-1"], ["'--stuck-after'", "not more than 0 seconds"]),
        (["flower", "--port", "0"], ["'--port'", "greater than or equal to 1"]),
    ],
)
def test_a_bad_number_of_the_other_commands_is_one_line(env, tmp_path, command, fragments) -> None:
    assert_one_line(tubesum(command, env=env, cwd=tmp_path), *fragments)


# --- delivery settings: the variables, not the fields --------------------------------------------


@pytest.mark.parametrize(
    ("extra_env", "fragments"),
    [
        ({"TUBESUM_RECONCILE_EVERY_S": "-5"}, ["TUBESUM_RECONCILE_EVERY_S='-5'", "greater than or equal to 0"]),
        ({"TUBESUM_STUCK_AFTER_S": "0"}, ["TUBESUM_STUCK_AFTER_S='0'", "greater than 0"]),
        ({"TUBESUM_HANDBACK_GRACE_S": "-1"}, ["TUBESUM_HANDBACK_GRACE_S='-1'", "greater than or equal to 0"]),
        ({"TUBESUM_HEARTBEAT_S": "100"}, ["TUBESUM_LEASE_S (60)", "3 heartbeats of TUBESUM_HEARTBEAT_S (100)"]),
        ({"TUBESUM_VISIBILITY_TIMEOUT_S": "10"}, ["TUBESUM_VISIBILITY_TIMEOUT_S (10)", "TUBESUM_FETCH_BACKOFF_MAX_S"]),
    ],
)
def test_a_bad_delivery_setting_names_its_variable(env, db_url, tmp_path, csv_file, extra_env, fragments) -> None:
    result = tubesum([*RUN, str(csv_file)], env={**embedded_broker(env), **extra_env}, cwd=tmp_path)
    assert_one_line(result, *fragments)
    assert "_s " not in result.stderr and "_s=" not in result.stderr  # no internal field name
    assert jobs_in(db_url) == 0
    assert not (tmp_path / ".tubesum").exists()


# --- service URLs whose driver is not installed, an embedded folder that cannot be made ----------


@pytest.mark.parametrize(
    ("command", "variable", "value", "fragments"),
    [
        pytest.param(
            ["status"],
            "TUBESUM_DATABASE_URL",
            "mysql://u@h/db",
            ["TUBESUM_DATABASE_URL='mysql://u@h/db'", "driver 'mysqldb', which is not installed", "postgresql+psycopg"],
            marks=missing("MySQLdb"),
        ),
        pytest.param(
            ["status"],
            "TUBESUM_DATABASE_URL",
            "postgresql+asyncpg://u:s3cret@h/db",
            ["TUBESUM_DATABASE_URL='postgresql+asyncpg://u:***@h/db'", "'asyncpg'", "SQLite"],
            marks=missing("asyncpg"),
        ),
        pytest.param(
            [*RUN, "CSV"],
            "TUBESUM_BROKER_URL",
            "sqs://x",
            ["TUBESUM_BROKER_URL='sqs://x'", "'sqs' transport", "botocore", "redis://"],
            marks=missing("botocore"),
        ),
    ],
)
def test_a_url_whose_driver_is_not_installed_is_one_line(
    env, db_url, tmp_path, csv_file, command, variable, value, fragments
) -> None:
    args = [str(csv_file) if arg == "CSV" else arg for arg in command]
    result = tubesum(args, env={**env, variable: value}, cwd=tmp_path)
    assert_one_line(result, *fragments)
    assert "s3cret" not in result.stderr
    assert jobs_in(db_url) == 0


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_an_embedded_dir_that_cannot_be_made_is_named_before_any_job(env, db_url, tmp_path, csv_file, broker) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    where = blocker / "embedded"  # under a file: no user, root included, can make it
    base = embedded_broker(env) if broker == "embedded" else env
    result = tubesum([*RUN, str(csv_file)], env={**base, "TUBESUM_EMBEDDED_DIR": str(where)}, cwd=tmp_path)
    assert_one_line(result, f"cannot create TUBESUM_EMBEDDED_DIR {str(where)!r}", "Not a directory")
    assert jobs_in(db_url) == 0


# --- bench ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--new-tokens", "0"], ["'--new-tokens'", "greater than or equal to 1"]),
        (["--prompts", "0"], ["'--prompts'", "greater than or equal to 1"]),
        (["--device", "gpu"], ["--device='gpu'", "cuda:N"]),
        (["--chunk-sizes", "0"], ["--chunk-sizes='0'", ">= 1 or 'auto'"]),
        (["--chunk-sizes", "1,-2"], ["--chunk-sizes='1,-2'", ">= 1 or 'auto'"]),
        (["--baseline", "--baseline-chunk-sizes", "0"], ["--baseline-chunk-sizes='0'", ">= 1 or 'auto'"]),
        (["--lengths", "all"], ["--lengths='all'", "fixed, varied or both"]),
    ],
)
def test_bench_refuses_a_bad_option_naming_it_before_writing(env, tmp_path: Path, options, fragments) -> None:
    out = tmp_path / "bench-out"
    args = ["bench", "--model", "dummy:tiny", "--device", "cpu", "--output", str(out), *options]
    assert_one_line(tubesum(args, env=env, cwd=tmp_path), *fragments)
    assert not out.exists()
