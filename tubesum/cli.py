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
    from producer.progress import wait_for_job
    from producer.submit import submit
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

    celery_app.worker_main(["worker", "-Q", TRANSCRIPTS_QUEUE, "-n", "fetch@%h", "-E",
                            f"--concurrency={concurrency}", f"--loglevel={loglevel}"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
