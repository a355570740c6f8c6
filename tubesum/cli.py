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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
