"""Issue 11, what a new user hits in the first hour, through ``python -m tubesum.cli`` as they run it:
no database yet, a model that is not there, output paths, help and version, status at 80 columns,
the model that actually ran, untrusted text on the terminal, report plots, the chunk log line and
the bench without CUDA. (Runs with worker processes are in tests/test_run_lifecycle.py.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.factories import batch_row
from tubesum.cli import COMMAND_ORDER
from tubesum.models import Batch, Job, Summary, Video
from tubesum.models.base import utcnow
from tubesum.settings import DEFAULT_MODEL

CLI_TIMEOUT_S = 120
# A check of the model must answer in seconds, not after a minute of download retries.
MODEL_CHECK_MAX_S = 20


def tubesum(args: list[str], *, env: dict[str, str], cwd: Path, columns: int = 200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tubesum.cli", *args],
        env={**env, "COLUMNS": str(columns)},
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
    )


@pytest.fixture
def sqlite_env(env: dict[str, str]) -> dict[str, str]:
    """Embedded mode: no service URLs, everything in the working directory."""
    return {
        k: v for k, v in env.items() if k not in ("TUBESUM_BROKER_URL", "TUBESUM_DATABASE_URL", "TUBESUM_EMBEDDED_DIR")
    }


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "transcript"])
        writer.writerows(rows)
    return path


def add_job(
    session,
    *,
    requested: str = DEFAULT_MODEL,
    ran: str | None = None,
    failures: list[tuple[str, str, str]] = (),
    videos: int = 0,
) -> int:
    """A job with ``videos`` summarised by a batch of model ``ran``, plus failed (id, title, reason)."""
    t0 = utcnow()
    job = Job(sources=["x"], model=requested, created_at=t0)
    session.add(job)
    if ran is not None:
        session.add(
            batch_row(
                id=f"b{time.monotonic_ns()}",
                devices="cuda:0:NVIDIA H100",
                model=ran,
                batch_size=max(1, videos),
                started_at=t0,
            )
        )
        session.flush()
    batch_id = session.query(Batch.id).filter(Batch.model == ran).order_by(Batch.started_at.desc()).first()
    for i in range(videos):
        video = Video(job=job, video_id=f"ok{i:09d}", position=i, status="done", queued_at=t0)
        session.add(video)
        session.add(
            Summary(
                video=video,
                batch_id=batch_id[0],
                text="s",
                model=ran,
                prompt_tokens=100,
                generated_tokens=50,
                finish_reason="stop",
                pieces=1,
                queue_wait_s=1.0,
                latency_s=2.0 + i,
            )
        )
    for i, (video_id, title, reason) in enumerate(failures, start=videos):
        session.add(
            Video(job=job, video_id=video_id, title=title, position=i, status="failed", error=reason, queued_at=t0)
        )
    session.commit()
    return job.id


# --- 6: no database yet -------------------------------------------------------------------------


def test_no_database_yet_says_so_and_creates_nothing(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    for args in (["status"], ["status", "--all"]):
        result = tubesum(args, env=sqlite_env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("no jobs yet") and "Traceback" not in result.stderr
    for args in (["export", "1", "-o", "out.csv"], ["report", "1", "-o", "report"]):
        result = tubesum(args, env=sqlite_env, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("error: no jobs yet"), result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no empty tubesum.db, no report folder, no .part


def test_a_missing_postgresql_database_is_named(env: dict[str, str], tmp_path: Path) -> None:
    url = make_url(env["TUBESUM_DATABASE_URL"]).set(database="tubesum_never_created")
    result = tubesum(
        ["status"], env={**env, "TUBESUM_DATABASE_URL": url.render_as_string(hide_password=False)}, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: database 'tubesum_never_created' does not exist on 127.0.0.1: "
        "create it (createdb tubesum_never_created) and run `tubesum db upgrade`"
    )


def test_a_wrong_postgresql_user_is_named_not_a_missing_database(env: dict[str, str], tmp_path: Path) -> None:
    url = make_url(env["TUBESUM_DATABASE_URL"]).set(username="tubesum_no_such_user")
    result = tubesum(
        ["status"], env={**env, "TUBESUM_DATABASE_URL": url.render_as_string(hide_password=False)}, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: PostgreSQL has no user 'tubesum_no_such_user' on 127.0.0.1"), result.stderr
    assert "database" not in result.stderr.split(":")[1]


# --- 5: the model is checked before the job is accepted ------------------------------------------


@pytest.mark.parametrize(
    ("model", "extra_env", "expected"),
    [
        ("/nonexistent/model", {}, "model directory '/nonexistent/model' does not exist"),
        ("tubesum-test/not-in-any-cache", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        (
            "tubesum-test/not-in-any-cache",
            {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "cannot reach the Hugging Face hub",
        ),
    ],
)
def test_run_checks_the_model_before_accepting_the_job(sqlite_env, tmp_path, model, extra_env, expected) -> None:
    csv_path = write_csv(tmp_path / "t.csv", [("csvVideo001", "a transcript")])
    work = tmp_path / "work"
    work.mkdir()
    env = {**sqlite_env, **extra_env, "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = tubesum(["run", "--transcripts", str(csv_path), "--model", model], env=env, cwd=work)
    assert time.monotonic() - started < MODEL_CHECK_MAX_S
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "--model dummy:tiny" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (work / "tubesum.db").exists()  # no job accepted


@pytest.mark.slow
def test_the_summarise_worker_checks_its_model_in_seconds(env: dict[str, str], tmp_path: Path) -> None:
    started = time.monotonic()
    result = tubesum(["worker", "summarise", "--model", "tubesum-test/not-in-any-cache"], env=env, cwd=tmp_path)
    assert time.monotonic() - started < MODEL_CHECK_MAX_S
    assert result.returncode == 2 and "HF_HUB_OFFLINE is set" in result.stderr and "dummy:tiny" in result.stderr


# --- 23 and 9: output paths -----------------------------------------------------------------------


def test_run_refuses_an_unwritable_output_before_any_work(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "t.csv", [("csvVideo001", "a transcript")])
    (tmp_path / "a-file").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    for output, reason in (
        ("/sys/out.csv", "cannot write '/sys/out.csv'"),
        (str(tmp_path / "a-file" / "out.csv"), "is a file, not a directory"),
    ):
        result = tubesum(
            ["run", "--transcripts", str(csv_path), "--model", "dummy:tiny", "-o", output], env=sqlite_env, cwd=work
        )
        assert result.returncode == 2 and reason in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert not (work / "tubesum.db").exists() and not (work / ".tubesum" / "logs").exists()


@pytest.mark.slow
def test_export_to_a_directory_or_an_unwritable_path(env, db_session, tmp_path: Path) -> None:
    job_id = add_job(db_session, ran="m", videos=2)
    (tmp_path / "out").mkdir()
    for output in ("out/", "out"):
        result = tubesum(["export", str(job_id), "-o", output], env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"wrote 2 rows to out/tubesum-job-{job_id}.csv"
        assert len((tmp_path / "out" / f"tubesum-job-{job_id}.csv").read_text().splitlines()) == 3
    result = tubesum(["export", str(job_id), "-o", "/sys/x.csv"], env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write '/sys/x.csv'")
    result = tubesum(["report", str(job_id), "-o", "/sys/report"], env=env, cwd=tmp_path)
    assert result.returncode == 2 and "cannot write" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.part"))


# --- 9: help, version ----------------------------------------------------------------------------


@pytest.mark.slow
def test_help_lists_commands_in_order_without_bool_and_version(env: dict[str, str], tmp_path: Path) -> None:
    top = tubesum(["--help"], env=env, cwd=tmp_path)
    assert top.returncode == 0
    listed = [
        line.split()[1]
        for line in top.stdout.splitlines()
        if line.startswith("│ ") and len(line.split()) > 1 and line.split()[1] in COMMAND_ORDER
    ]
    assert listed == list(COMMAND_ORDER)
    summaries = {line.split()[1]: line for line in top.stdout.splitlines() if line.startswith("│ ")}
    assert "fail those whose leases ran out too often" in summaries["reconcile"]  # one line, not broken mid-phrase
    for command in ([], ["run"], ["status"], ["submit"], ["export"], ["worker", "summarise"], ["bench"]):
        page = tubesum([*command, "--help"], env=env, cwd=tmp_path)
        assert page.returncode == 0 and "<bool>" not in page.stdout, page.stdout
    # Markdown help drops <words> as HTML: placeholders are written in capitals.
    assert "dummy:ARCH" in tubesum(["worker", "summarise", "--help"], env=env, cwd=tmp_path).stdout
    run_help = tubesum(["run", "--help"], env=env, cwd=tmp_path).stdout
    for option in ("--device-map", "--dtype", "--attn", DEFAULT_MODEL, "dummy:tiny"):
        assert option in run_help
    version = tubesum(["--version"], env=env, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("tubesum ") and version.stdout.split()[1][0].isdigit()


# --- 4, 9, 18: status -----------------------------------------------------------------------------


def test_status_shows_the_model_that_ran_not_the_requested_one(env, db_session, tmp_path: Path) -> None:
    job_id = add_job(db_session, requested=DEFAULT_MODEL, ran="/models/tiny-llama", videos=3)
    result = tubesum(["status", str(job_id)], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model /models/tiny-llama" in result.stdout and DEFAULT_MODEL not in result.stdout
    waiting = add_job(db_session, requested="org/wanted")
    result = tubesum(["status", str(waiting)], env=env, cwd=tmp_path)
    assert "org/wanted (requested; nothing summarised yet)" in result.stdout


def test_status_all_is_readable_at_80_columns(env, db_session, tmp_path: Path) -> None:
    for _ in range(3):
        add_job(db_session, ran="meta-llama/Meta-Llama-3.1-70B-Instruct-with-a-very-long-name", videos=2)
    result = tubesum(["status", "--all"], env=env, cwd=tmp_path, columns=80)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "job" in line and "created" in line)
    for column in ("queued", "fetched", "done", "failed", "total", "model"):
        assert column in header
    assert any("meta-llama/Meta" in line for line in lines)  # the model, cut with an ellipsis


def test_titles_and_ids_print_as_plain_text(env, db_session, tmp_path: Path) -> None:
    job_id = add_job(
        db_session,
        failures=[
            ("bees0000001", "Bees [/live] x", "TranscriptsDisabled: [bold]no[/bold]"),
            ("link0000001", "[link=https://evil.example]click[/link]", "x"),
            ("\x1b[2Jclear", "\x1b]8;;https://evil.example\x1b\\title", "y"),
        ],
    )
    result = tubesum(["status", str(job_id)], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Bees [/live] x" in out and "[link=https://evil.example]click[/link]" in out
    assert "[bold]no[/bold]" in out
    assert "\x1b" not in out and "\\x1b[2Jclear" in out


# Bidirectional controls: shown raw, U+202E makes the rest of the line read right to left.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_bidi_controls_in_titles_are_escaped_in_status(env, db_session, tmp_path: Path) -> None:
    job_id = add_job(db_session, failures=[("bidi0000001", "harmless\u202eexe.txt", "reason\u2066x")])
    result = tubesum(["status", str(job_id)], env=env, cwd=tmp_path, columns=200)
    assert result.returncode == 0, result.stderr
    assert not set(BIDI_CONTROLS) & set(result.stdout)
    assert "harmless\\u202eexe.txt" in result.stdout and "reason\\u2066x" in result.stdout


# --- 10: report plots -------------------------------------------------------------------------------


def test_report_of_a_one_batch_job(env, db_session, tmp_path: Path) -> None:
    from tubesum.read.queries import job_batches
    from tubesum.read.report import latency_figure, stats_by_size, tokens_figure

    job_id = add_job(db_session, ran="org/model-x", videos=20)
    result = tubesum(["report", str(job_id), "-o", "r"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"job {job_id}: 1 batch (0 out of memory) · org/model-x on cuda:0:NVIDIA H100" in result.stdout
    assert "over 20 videos" in result.stdout
    rows = job_batches(db_session, job_id)
    tokens = tokens_figure(rows, stats_by_size(rows), job_id=job_id).axes[0]
    assert list(tokens.get_xticks()) == [20] and tokens.get_xlim() == (19, 21)
    assert f"job {job_id}" in tokens.get_title() and "org/model-x" in tokens.get_title()
    latency = latency_figure([2.0 + i for i in range(20)], job_id=job_id, rows=rows).axes[0]
    assert all(float(t).is_integer() for t in latency.get_yticks())
    assert "cuda:0" in latency.get_title()


# --- 11: one log line per chunk ----------------------------------------------------------------------


def test_chunk_line_reads_like_vllms() -> None:
    from tubesum.workers.gpu.records import chunk_line

    assert chunk_line(
        12,
        videos=256,
        prompt_tokens=310_400,
        generated_tokens=38_520,
        prefill_s=6.6,
        decode_s=4.1,
        wall_s=10.7,
        peak_memory_bytes=72 * 10**9,
    ) == ("chunk 12: 256 videos, 310k prompt tok, prefill 6.6 s, decode 4.1 s, 3,600 gen tok/s, peak 72 GB")
    assert (
        chunk_line(
            1,
            videos=1,
            prompt_tokens=812,
            generated_tokens=8,
            prefill_s=None,
            decode_s=None,
            wall_s=0.5,
            peak_memory_bytes=None,
        )
        == "chunk 1: 1 video, 812 prompt tok, wall 0.5 s, 16 gen tok/s"
    )


def test_queues_are_bound_to_their_own_exchanges() -> None:
    from tubesum.celery_app import app

    assert {(q.name, q.exchange.name, q.routing_key) for q in app.amqp.queues.values()} == {
        ("transcripts", "transcripts", "transcripts"),
        ("summarise", "summarise", "summarise"),
    }


# --- 7: bench without CUDA -----------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_without_cuda_picks_the_cpu_or_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    explicit = tubesum(["bench", "--model", "dummy:tiny", "--device", "cuda"], env=env, cwd=tmp_path)
    assert explicit.returncode == 2 and len(explicit.stderr.splitlines()) == 1
    assert "no CUDA device here" in explicit.stderr and "--device cpu" in explicit.stderr
    result = tubesum(
        [
            "bench",
            "--model",
            "dummy:tiny",
            "--chunk-sizes",
            "1,2",
            "--prompts",
            "2",
            "--new-tokens",
            "4",
            "--max-chunks",
            "1",
            "--repeats",
            "1",
            "--no-extend",
            "-o",
            "out",
        ],
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "benchmarking on the CPU" in result.stdout
    assert json.loads((tmp_path / "out" / "bench.json").read_text())


# --- 9: the progress bar's loading phase, rate and ETA ------------------------------------------------


def test_progress_shows_the_loading_phase_rate_and_eta(settings, db_session) -> None:
    from rich.console import Console

    from tubesum.read.progress import wait_for_job

    job_id = add_job(db_session, ran="m", videos=2, failures=[("fail0000001", "t", "r")])
    waiting = Video(job_id=job_id, video_id="wait0000001", position=9, status="queued", queued_at=utcnow())
    db_session.add(waiting)
    db_session.commit()
    console = Console(record=True, width=100, force_terminal=False)
    counts = wait_for_job(
        job_id,
        database_url=settings.database_url,
        poll_s=0.05,
        timeout_s=0.3,
        console=console,
        phase=lambda: "loading model org/big",
    )
    assert (counts.summarised, counts.failed, counts.queued) == (2, 1, 1)
    bar, detail = console.export_text().splitlines()[:2]
    assert bar.startswith(f"job {job_id} · loading model org/big") and "3/4" in bar
    assert "ETA" in bar and "elapsed" in bar and "videos/s" in bar
    assert detail == "queued 1 · fetched 0 · summarised 2 · failed 1"


def test_warnings_about_csv_ids_print_escapes_as_text(env: dict[str, str], tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "t.csv", [("\x1b[2Jclear", "one"), ("\x1b[2Jclear", "two")])
    result = tubesum(["submit", "--transcripts", str(csv_path)], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "given more than once" in result.stderr and "\\x1b[2Jclear" in result.stderr
    assert "\x1b" not in result.stderr + result.stdout
