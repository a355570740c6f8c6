"""The `tubesum` command. Each command is thin: parse options, call a plain function, print."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import typer
from typer.core import TyperCommand, TyperGroup

from tubesum.display import clean
from tubesum.settings import DEFAULT_MODEL

# Exit codes: the work ran and some of it failed; bad input or configuration; Ctrl-C; SIGTERM.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

# `tubesum --help` lists commands in the order a user meets them, grouped in panels.
COMMAND_ORDER = ("run", "status", "export", "report", "retry", "submit", "worker", "flower", "reconcile", "db", "bench")
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

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: rank.get(name, len(rank)))


def _typer(help_text: str) -> typer.Typer:
    # Markdown: docstrings are wrapped by the terminal, not at their source line breaks.
    return typer.Typer(help=help_text, no_args_is_help=True, cls=Group, rich_markup_mode="markdown")


app = _typer("Summarise every video of a YouTube playlist on your GPUs.")
worker_app = _typer("Start a worker: `fetch` (transcripts) or `summarise` (the GPU).")
db_app = _typer("Database schema.")
app.add_typer(worker_app, name="worker", rich_help_panel=PANEL_DISTRIBUTED)
app.add_typer(db_app, name="db", rich_help_panel=PANEL_DISTRIBUTED)


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


def _error(exc: BaseException, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """One line on stderr, data in it printed as plain text; the exit to raise."""
    text = "\n".join(clean(line) for line in str(exc).splitlines())  # a dead worker's log tail: lines
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(code)


@contextmanager
def exit_codes() -> Iterator[None]:
    """The one place errors become exit codes: bad input or configuration (a named BadInput, a
    model that cannot load, a setting that fails validation) exits 2 with its message; any other
    named tubesum error (a worker died) exits 1; a bug keeps its traceback."""
    from pydantic import ValidationError

    from tubesum.errors import BadInput, ModelLoadError, TubesumError

    try:
        yield
    except (BadInput, ModelLoadError, ValidationError) as exc:
        raise _error(exc, EXIT_BAD_INPUT) from None
    except TubesumError as exc:
        raise _error(exc, EXIT_FAILED) from None


@db_app.command("upgrade", cls=Command)
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply the Alembic migrations to TUBESUM_DATABASE_URL."""
    from tubesum.db import upgrade

    upgrade(revision=revision)
    typer.echo("database is at " + revision)


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
) -> None:
    """Record a job and enqueue its videos; prints the job id (before the messages are sent)."""
    from tubesum.celery_app import app as celery_app
    from tubesum.producer.progress import missing_worker_hint, submit_progress, wait_for_job
    from tubesum.producer.submit import submit
    from tubesum.settings import get_settings

    recorded: list[int] = []

    def on_job(job: int) -> None:  # the id first, before any message is sent
        recorded.append(job)
        typer.echo(job)

    try:
        with exit_codes(), submit_progress() as progress:
            job_id = submit(
                sources or [],
                from_file=from_file,
                transcripts_csv=transcripts,
                encoding=encoding,
                reuse=reuse,
                on_job=on_job,
                progress=progress,
            )
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


@worker_app.command("fetch", cls=Command)
def worker_fetch(
    concurrency: int = typer.Option(4, "--concurrency", "-c", help="parallel fetches (processes)"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Fetch transcripts: a Celery worker on the transcripts queue only."""
    from tubesum.celery_app import TRANSCRIPTS_QUEUE
    from tubesum.celery_app import app as celery_app

    # No mingle/gossip: workers share nothing through them (state is in the database), and on the
    # filesystem broker each start would leave a stale broadcast file. Flower uses events only.
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            TRANSCRIPTS_QUEUE,
            "-n",
            "fetch@%h",
            "-E",
            "--without-mingle",
            "--without-gossip",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
        ]
    )


@app.command("reconcile", cls=Command, rich_help_panel=PANEL_DISTRIBUTED)
def reconcile_cmd(
    stuck_after: float = typer.Option(
        None,
        "--stuck-after",
        help="seconds without progress before a video counts as stuck (default TUBESUM_STUCK_AFTER_S)",
    ),
    every: float = typer.Option(None, "--every", help="run a pass every this many seconds, until stopped"),
) -> None:
    """Re-enqueue videos stuck in queued/fetching/fetched/summarising (a dead worker or producer);
    fail those whose leases ran out too often. Every worker runs such a pass every
    TUBESUM_RECONCILE_EVERY_S itself; this command is for a pass by hand."""
    import logging
    import signal
    import threading

    from tubesum.celery_app import app as celery_app
    from tubesum.settings import get_settings
    from tubesum.workers.reconcile import reconcile, run_periodically

    settings = get_settings()
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
    port: int = typer.Option(5555, "--port", help="port of Flower's pages and REST API"),
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
    from tubesum.producer.retry import retry_failed
    from tubesum.settings import get_settings

    with exit_codes():
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
    backend: str = typer.Option("auto", "--backend", help="generation backend: auto, fast or hf"),
    name: str = typer.Option("gpu@%h", "--name", "-n", help="Celery node name"),
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
        ).items()
        if value is not None
    }
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    with exit_codes():
        settings = Settings(**overrides)
        run_summarise_worker(settings, name=name, loglevel=loglevel, backend=backend)


@app.command("report", cls=Command, rich_help_panel=PANEL_RESULTS)
def report_cmd(
    job: int = typer.Argument(..., help="job id"),
    output: str = typer.Option(..., "--output", "-o", help="directory for batches.csv and the plots"),
) -> None:
    """Per-batch timings of a job: batches.csv, throughput and latency plots, and a table."""
    from pathlib import Path

    from tubesum.db import require_database, session_scope
    from tubesum.jobs import check_writable
    from tubesum.report import print_report, write_report

    with exit_codes():
        check_writable(Path(output), what="directory")
        require_database()
        with session_scope() as session:
            report = write_report(session, job, Path(output))
    print_report(report)


# --- job status, export and embedded run ---------------------------------------------------------


@app.command("status", cls=Command, rich_help_panel=PANEL_RESULTS)
def status_cmd(
    job: int = typer.Argument(None, help="job id (default: the latest job)"),
    all_jobs: bool = typer.Option(False, "--all", help="one line per recent job instead"),
) -> None:
    """Counts of a job's videos by state, the model that ran, and every failed video with its reason."""
    from rich.console import Console

    from tubesum.db import NoJobsYet, require_database, session_scope
    from tubesum.jobs import NoJobs, all_job_statuses, all_jobs_table, job_status, status_tables

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
    from tubesum.jobs import check_export_path, export_job

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
    output: str = typer.Option(
        None, "--output", "-o", help="export file (.csv or .jsonl) or directory; default ./tubesum-job-N.csv for job N"
    ),
    fetch_concurrency: int = typer.Option(2, "--fetch-concurrency", help="parallel transcript fetches"),
    fetch_only: bool = typer.Option(
        False, "--fetch-only", help="start no summarise worker; stop once transcripts are in"
    ),
    timeout: float = typer.Option(None, "--timeout", help="give up waiting after this many seconds"),
) -> None:
    """Do a whole job on this machine: start local workers, submit, show progress, export, stop.

    Needs no service by default (SQLite file and a filesystem broker in the working directory);
    with TUBESUM_BROKER_URL / TUBESUM_DATABASE_URL set it uses those instead. The model and the
    output path are checked before anything starts.

    Ctrl-C (or SIGTERM) stops the workers; a second Ctrl-C kills them at once."""
    from tubesum.embedded import Terminated, run_job, run_settings

    def say(text: str) -> None:
        typer.echo(clean(text), err=True)

    try:
        with exit_codes():
            settings = run_settings(
                model=model,
                chunk_size=chunk_size,
                max_new_tokens=max_new_tokens,
                device_map=device_map,
                dtype=dtype,
                attn=attn,
                quantize=quantize,
            )
            if settings.quantize != "none" and not fetch_only:
                # Before anything is submitted: only then is torch imported here (to ask the card).
                from tubesum.workers.gpu.engine import check_quantize

                check_quantize(settings.quantize, device_map=settings.device_map)
            result = run_job(
                sources or [],
                from_file=from_file,
                transcripts_csv=transcripts,
                encoding=encoding,
                settings=settings,
                export_to=output,
                fetch_only=fetch_only,
                fetch_concurrency=fetch_concurrency,
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
    raise typer.Exit(EXIT_FAILED if c.failed or not (c.finished or fetch_only) else 0)


# --- benchmark ----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    """Comma-separated positive integers; 'auto' becomes 0 (resolved once the model is loaded)."""
    try:
        values = [0 if x.strip() == "auto" else int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise typer.BadParameter("chunk sizes must be positive integers or 'auto'")
    return values


@app.command("bench", cls=Command, rich_help_panel=PANEL_BENCH)
def bench_cmd(
    model: str = typer.Option(..., "--model", help="hub id, local path, or dummy:ARCH (dummy:tiny, dummy:llama-3-8b)"),
    chunk_sizes: str = typer.Option(
        "1,2,4,8,16,32,64",
        "--chunk-sizes",
        help="comma-separated sizes to sweep; 'auto' adds the size --chunk-size auto picks",
    ),
    prompts: int = typer.Option(64, "--prompts", help="prompts per chunk size (reused for larger chunks)"),
    new_tokens: int = typer.Option(150, "--new-tokens", help="tokens generated per prompt (EOS suppressed)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of real transcripts to build prompts from"),
    job: int = typer.Option(None, "--job", help="build prompts from this job's stored transcripts"),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA if there is one, else the CPU), cuda, cpu or cuda:N"
    ),
    tensor_parallel: int = typer.Option(
        1,
        "--tensor-parallel",
        help="run the model over N GPUs with tensor parallelism; --baseline then times device_map over the same GPUs",
    ),
    dtype: str = typer.Option("auto", "--dtype"),
    quantize: str = typer.Option(
        "none",
        "--quantize",
        help="comma-separated: none, fp8, or none,fp8 (a bf16 and an FP8 sweep in one call, compared)",
    ),
    baseline: bool = typer.Option(False, "--baseline", help="also time plain model.generate() on the same prompts"),
    baseline_sizes: str = typer.Option("1,64", "--baseline-chunk-sizes", help="chunk sizes for the baseline"),
    max_chunks: int = typer.Option(3, "--max-chunks", help="timed chunks per size at most"),
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
    """The batching study: throughput and speedup against chunk size, on the worker's engine."""
    if lengths not in ("fixed", "varied", "both"):
        raise typer.BadParameter(f"--lengths must be fixed, varied or both, not {lengths!r}")
    from pathlib import Path

    from rich.console import Console

    from tubesum.workers.gpu.bench import resolve_bench_device
    from tubesum.workers.gpu.bench_table import quantize_comparison

    console = Console()
    try:
        device, note = resolve_bench_device(device)
    except ValueError as exc:
        raise _error(exc) from None
    if note:
        console.print(note, markup=False, highlight=False)
    modes = [q.strip() for q in quantize.split(",") if q.strip()]
    device_map = "cpu" if device == "cpu" else ("cuda:0" if device == "cuda" else device)
    with exit_codes():  # every mode is checked before anything is loaded or written
        from tubesum.workers.gpu.engine import check_quantize

        if not modes:
            raise typer.BadParameter("--quantize needs at least one of none, fp8")
        for mode in modes:
            check_quantize(mode, device_map=device_map)
    reports = []
    for mode in modes:
        out_dir = Path(output) / mode if len(modes) > 1 else Path(output)
        reports.append(_bench_one(console, mode, out_dir, **locals_for_bench(locals())))
    if len(reports) > 1:
        for line in quantize_comparison(reports):
            console.print(line, markup=False, highlight=False)


def locals_for_bench(scope: dict) -> dict:
    keys = (
        "model chunk_sizes prompts new_tokens transcripts job device baseline baseline_sizes max_chunks extend "
        "dtype lengths tensor_parallel varied_sizes"
    ).split()
    return {k: scope[k] for k in keys}


def _bench_one(console, quantize: str, out_dir, **opts):
    """One `tubesum bench` sweep with projections in `quantize`; prints its table, returns its report."""
    from rich.progress import Progress

    from tubesum.workers.gpu.bench import run_bench
    from tubesum.workers.gpu.bench_table import print_report

    model, varied_sizes = opts["model"], opts["varied_sizes"]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"loading model ({quantize})", total=None)
        report = run_bench(
            model=model,
            chunk_sizes=_int_list(opts["chunk_sizes"]),
            prompts=opts["prompts"],
            new_tokens=opts["new_tokens"],
            transcripts=opts["transcripts"],
            job=opts["job"],
            device=opts["device"],
            baseline=opts["baseline"],
            baseline_sizes=_int_list(opts["baseline_sizes"]),
            max_chunks=opts["max_chunks"],
            extend=opts["extend"],
            out_dir=out_dir,
            dtype=opts["dtype"],
            lengths=opts["lengths"],
            tensor_parallel=opts["tensor_parallel"],
            varied_sizes=_int_list(varied_sizes) if varied_sizes else None,
            quantize=quantize,
            progress=lambda text: bar.update(task, description=text),
        )
    print_report(report, console)
    console.print(f"wrote {clean(out_dir / 'bench.json')}, throughput.png, speedup.png", markup=False)
    return report


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
