"""The `tubesum` command. Each command is thin: parse options, call a plain function, print."""

from __future__ import annotations

import typer

app = typer.Typer(help="Summarise every video of a YouTube playlist on your GPUs.", no_args_is_help=True)
worker_app = typer.Typer(help="Start a worker.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply the Alembic migrations to TUBESUM_DATABASE_URL."""
    from tubesum.db import upgrade

    upgrade(revision=revision)
    typer.echo("database is at " + revision)


# Commands of the producer, fetch, summarise, embedded and bench areas are added below.


# --- producer ----------------------------------------------------------------------------------


@app.command("submit")
def submit_cmd(
    sources: list[str] = typer.Argument(None, help="playlist URLs, video URLs or 11-character video ids"),
    from_file: str = typer.Option(None, "--from-file", help="file with one source per line (# comments)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of video_id,transcript[,title]"),
    wait: bool = typer.Option(False, "--wait", help="show progress until every video is done or failed"),
) -> None:
    """Record a job and enqueue its videos; prints the job id."""
    from tubesum.producer.progress import wait_for_job
    from tubesum.producer.submit import submit
    from tubesum.errors import BadInput
    from tubesum.settings import get_settings

    try:
        job_id = submit(sources or [], from_file=from_file, transcripts_csv=transcripts)
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(job_id)
    if wait:
        counts = wait_for_job(job_id, database_url=get_settings().database_url)
        raise typer.Exit(1 if counts.failed else 0)


# --- fetch workers -------------------------------------------------------------------------------


@worker_app.command("fetch")
def worker_fetch(
    concurrency: int = typer.Option(4, "--concurrency", "-c", help="parallel fetches (processes)"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Fetch transcripts: a Celery worker on the transcripts queue only."""
    from tubesum.celery_app import TRANSCRIPTS_QUEUE
    from tubesum.celery_app import app as celery_app

    # No mingle/gossip: workers share nothing through them (state is in the database), and on the
    # filesystem broker each start would leave a stale broadcast file. Flower uses events only.
    celery_app.worker_main(["worker", "-Q", TRANSCRIPTS_QUEUE, "-n", "fetch@%h", "-E",
                            "--without-mingle", "--without-gossip",
                            f"--concurrency={concurrency}", f"--loglevel={loglevel}"])


@app.command("reconcile")
def reconcile_cmd(
    stuck_after: float = typer.Option(None, "--stuck-after", help="seconds without progress before a video counts as stuck (default TUBESUM_STUCK_AFTER_S)"),
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
        run_periodically(settings=settings, celery_app=celery_app, every_s=every, stop=stop,
                         stuck_after_s=stuck_after)
    except KeyboardInterrupt:
        pass


@app.command("retry")
def retry_cmd(
    job: int = typer.Argument(..., help="job id"),
    failed_reason: str = typer.Option(None, "--failed-reason", help="only videos whose failure reason contains this text (case-insensitive)"),
) -> None:
    """Send a job's failed videos through again (to summarise if their transcript is stored, else
    to fetch), with fresh attempt counters: for videos failed by an outage, say."""
    from tubesum.celery_app import app as celery_app
    from tubesum.errors import BadInput
    from tubesum.producer.retry import retry_failed
    from tubesum.settings import get_settings

    try:
        report = retry_failed(job, settings=get_settings(), celery_app=celery_app, failed_reason=failed_reason)
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(report.summary())


# --- GPU (summarise) worker and its report --------------------------------------------------------


@worker_app.command("summarise")
def worker_summarise(
    model: str = typer.Option(None, "--model", help="Hugging Face model id, local directory or dummy:<arch> (default TUBESUM_MODEL)"),
    chunk_size: str = typer.Option(None, "--chunk-size", help="prompts per batched generation, or 'auto' (default TUBESUM_CHUNK_SIZE)"),
    chunk_wait: float = typer.Option(None, "--chunk-wait", help="seconds a partial chunk waits for more videos"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="summary length limit in tokens"),
    device_map: str = typer.Option(None, "--device-map", help="auto, cpu, cuda:0, ..."),
    dtype: str = typer.Option(None, "--dtype", help="auto, bfloat16, float16, float32"),
    attn: str = typer.Option(None, "--attn", help="auto, flash_attention_2, sdpa, eager"),
    backend: str = typer.Option("auto", "--backend", help="generation backend: auto, fast or hf"),
    name: str = typer.Option("gpu@%h", "--name", "-n", help="Celery node name"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Summarise: load the model once, then a Celery worker on the summarise queue only (threads
    pool, one thread per chunk slot) that runs one batched generation per chunk."""
    import logging

    from tubesum.errors import ModelLoadError
    from tubesum.settings import Settings
    from tubesum.workers.gpu.worker import run_summarise_worker

    overrides = {key: value for key, value in dict(
        model=model, chunk_size=chunk_size, chunk_wait_s=chunk_wait, max_new_tokens=max_new_tokens,
        device_map=device_map, dtype=dtype, attn=attn).items() if value is not None}  # fmt: skip
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    try:
        settings = Settings(**overrides)
        run_summarise_worker(settings, name=name, loglevel=loglevel, backend=backend)
    except (ModelLoadError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("report")
def report_cmd(
    job: int = typer.Argument(..., help="job id"),
    output: str = typer.Option(..., "--output", "-o", help="directory for batches.csv and the plots"),
) -> None:
    """Per-batch timings of a job: batches.csv, tokens/s by batch size and latency plots, a table."""
    from pathlib import Path

    from tubesum.db import session_scope
    from tubesum.errors import BadInput
    from tubesum.report import print_report, write_report

    try:
        with session_scope() as session:
            report = write_report(session, job, Path(output))
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    print_report(report)


# --- job status, export and embedded run ---------------------------------------------------------


@app.command("status")
def status_cmd(
    job: int = typer.Argument(None, help="job id (default: the latest job)"),
    all_jobs: bool = typer.Option(False, "--all", help="one line per recent job instead"),
) -> None:
    """Counts of a job's videos by state, and every failed video with its reason."""
    from rich.console import Console

    from tubesum.db import session_scope
    from tubesum.errors import BadInput
    from tubesum.jobs import all_jobs_table, all_job_statuses, job_status, status_tables

    console = Console()
    try:
        with session_scope() as session:
            if all_jobs:
                console.print(all_jobs_table(all_job_statuses(session)))
                return
            status = job_status(session, job)
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for table in status_tables(status):
        console.print(table)


@app.command("export")
def export_cmd(
    job: int = typer.Argument(..., help="job id"),
    output: str = typer.Option(..., "--output", "-o", help="file ending in .csv or .jsonl"),
) -> None:
    """Write one row per video (transcript facts, summary, batch timings) to CSV or JSON Lines."""
    from pathlib import Path

    from tubesum.db import session_scope
    from tubesum.errors import BadInput
    from tubesum.jobs import export_job

    try:
        with session_scope() as session:
            rows = export_job(session, job, Path(output))
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {rows} rows to {output}")


@app.command("run")
def run_cmd(
    sources: list[str] = typer.Argument(None, help="playlist URLs, video URLs or 11-character video ids"),
    from_file: str = typer.Option(None, "--from-file", help="file with one source per line (# comments)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of video_id,transcript[,title]"),
    model: str = typer.Option(None, "--model", help="Hugging Face model id or path (default TUBESUM_MODEL)"),
    chunk_size: str = typer.Option(None, "--chunk-size", help="prompts per batched generation, or 'auto'"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="summary length limit in tokens"),
    output: str = typer.Option(None, "--output", "-o", help="export file (.csv or .jsonl); default tubesum-job-<id>.csv"),
    fetch_concurrency: int = typer.Option(2, "--fetch-concurrency", help="parallel transcript fetches"),
    fetch_only: bool = typer.Option(False, "--fetch-only", help="start no summarise worker; stop once transcripts are in"),
    timeout: float = typer.Option(None, "--timeout", help="give up waiting after this many seconds"),
) -> None:
    """Do a whole job on this machine: start local workers, submit, show progress, export, stop.

    Needs no service by default (SQLite file and a filesystem broker in the working directory);
    with TUBESUM_BROKER_URL / TUBESUM_DATABASE_URL set it uses those instead."""
    from pathlib import Path

    from tubesum.embedded import run_job, run_settings
    from tubesum.errors import BadInput, TubesumError

    try:
        settings = run_settings(model=model, chunk_size=chunk_size, max_new_tokens=max_new_tokens)
        result = run_job(sources or [], from_file=from_file, transcripts_csv=transcripts, settings=settings,
                         export_path=Path(output) if output else None, fetch_only=fetch_only,
                         fetch_concurrency=fetch_concurrency, timeout_s=timeout)
    except KeyboardInterrupt:
        typer.echo("interrupted: workers stopped; unfinished videos stay on the queue for the next workers "
                   "on this broker (another `tubesum run` here picks them up)", err=True)
        raise typer.Exit(130) from None
    except (BadInput, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except TubesumError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    c = result.counts
    typer.echo(f"job {result.job_id}: {c.summarised} summarised, {c.fetched} awaiting summary, "
               f"{c.failed} failed of {c.total}; exported to {result.export_path}")
    raise typer.Exit(1 if c.failed or not (c.finished or fetch_only) else 0)


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


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(..., "--model", help="hub id, local path, or dummy:<arch> (dummy:tiny, dummy:llama-3-8b)"),
    chunk_sizes: str = typer.Option("1,2,4,8,16,32,64", "--chunk-sizes", help="comma-separated sizes to sweep; 'auto' adds the size --chunk-size auto picks"),
    prompts: int = typer.Option(64, "--prompts", help="prompts per chunk size (reused for larger chunks)"),
    new_tokens: int = typer.Option(150, "--new-tokens", help="tokens generated per prompt (EOS suppressed)"),
    transcripts: str = typer.Option(None, "--transcripts", help="CSV of real transcripts to build prompts from"),
    job: int = typer.Option(None, "--job", help="build prompts from this job's stored transcripts"),
    device: str = typer.Option("cuda", "--device", help="cuda, cpu or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype"),
    baseline: bool = typer.Option(False, "--baseline", help="also time plain model.generate() on the same prompts"),
    baseline_sizes: str = typer.Option("1,64", "--baseline-chunk-sizes", help="chunk sizes for the baseline"),
    max_chunks: int = typer.Option(3, "--max-chunks", help="timed chunks per size at most"),
    extend: bool = typer.Option(True, "--extend/--no-extend", help="after the list, double the size until memory runs out"),
    output: str = typer.Option("bench-out", "--output", "-o", help="directory for bench.json and the plots"),
) -> None:
    """The batching study: throughput and speedup against chunk size, on the worker's engine."""
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress

    from tubesum.workers.gpu.bench import run_bench
    from tubesum.workers.gpu.bench_table import print_report

    console = Console()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("loading model", total=None)
        report = run_bench(
            model=model, chunk_sizes=_int_list(chunk_sizes), prompts=prompts, new_tokens=new_tokens,
            transcripts=transcripts, job=job, device=device, baseline=baseline,
            baseline_sizes=_int_list(baseline_sizes), max_chunks=max_chunks, extend=extend,
            out_dir=Path(output), dtype=dtype,
            progress=lambda text: bar.update(task, description=text))
    print_report(report, console)
    console.print(f"wrote {Path(output) / 'bench.json'}, throughput.png, speedup.png")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
