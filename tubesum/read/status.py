"""``tubesum status``: a job's counts, leases and failures, or the recent jobs, as rich tables."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from rich import box
from rich.table import Table
from rich.text import Text

from tubesum.display import plain
from tubesum.read.queries import JobCounts, JobLine, JobStatus

# The rows of the counts table, in the order a video moves through them.
STATUS_ORDER = ("queued", "fetching", "fetched", "summarising", "done", "failed")


def status_tables(status: JobStatus) -> list[Table | Text]:
    """The counts table, a line with its date and model, then (if any) the failed videos."""
    counts = Table(title=plain(f"job {status.job_id}"))
    counts.add_column("status")
    counts.add_column("videos", justify="right")
    by_status = status.counts.by_status
    for name in (*STATUS_ORDER, *sorted(set(by_status) - set(STATUS_ORDER))):
        counts.add_row(name, str(by_status.get(name, 0)))
    counts.add_row("total", str(status.counts.total), style="bold")
    if status.truncated:  # of the done ones: cut back to their last full sentence (finish.py)
        counts.add_row("truncated", str(status.truncated), style="dim")
    facts = plain(f"created {status.created_at:%Y-%m-%d %H:%M} · model {status.model_shown}")
    tables: list[Table | Text] = [counts, facts]
    if status.holders or status.expired_leases:
        tables.append(leases_table(status))
    if status.long_videos:
        long = Table(title=f"{len(status.long_videos)} long transcripts in map-reduce")
        for column in ("video", "title", "where it stands"):
            long.add_column(column, overflow="fold")
        for v in status.long_videos:
            long.add_row(plain(v.video_id), plain(v.title), plain(v.error))
        tables.append(long)
    if status.failures:
        failed = Table(title=f"{len(status.failures)} failed")
        failed.add_column("video_id", overflow="fold")
        failed.add_column("title", overflow="fold")
        failed.add_column("reason", overflow="fold")
        for f in status.failures:  # ids, titles and reasons come from outside: plain text only
            failed.add_row(plain(f.video_id), plain(f.title), plain(f.error))
        tables.append(failed)
    return tables


def leases_table(status: JobStatus) -> Table:
    """Who holds the job's videos now, and how often a lease ran out (its worker died)."""
    table = Table(
        title="held by workers", caption=f"{status.expired_leases} returned to the queue after a lease ran out"
    )
    for column in ("worker", "videos", "since (UTC)", "lease until (UTC)"):
        table.add_column(column, justify="right" if column == "videos" else "left")
    for h in status.holders:
        table.add_row(h.worker, str(h.videos), _clock(h.since), _clock(h.until))
    return table


def _clock(value: datetime | None) -> str:
    return f"{value.astimezone(UTC):%H:%M:%S}" if value else ""


# `status --all` columns: the progress bar's four groups (queued = queued + fetching, fetched =
# fetched + summarising) so a line fits 80 columns beside the model.
ALL_JOBS_COUNTS = ("queued", "fetched", "done", "failed", "total")


# The narrowest model column before the table gives up fitting the terminal, characters.
MIN_MODEL_WIDTH = 12


def all_jobs_table(jobs: Sequence[JobLine], *, width: int = 80) -> Table:
    """One line per job in ``width`` columns: the counts keep their width, the model is cut."""
    table = Table(
        title="recent jobs",
        caption="queued includes fetching; fetched includes summarising",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("job", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for column in ALL_JOBS_COUNTS:
        table.add_column(column, justify="right", no_wrap=True)
    cells = [
        [str(line.job_id), f"{line.created_at:%m-%d %H:%M}", *map(str, _count_cells(line.counts))] for line in jobs
    ]
    headers = ["job", "created", *ALL_JOBS_COUNTS]
    fixed = sum(max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers))
    separators = 3 * len(headers)  # " │ " between columns (padding 1 + rule + padding 1)
    table.add_column(
        "model", overflow="ellipsis", no_wrap=True, max_width=max(MIN_MODEL_WIDTH, width - fixed - separators)
    )
    for row, line in zip(cells, jobs, strict=True):
        table.add_row(*row, plain(line.model))
    return table


def _count_cells(c: JobCounts) -> tuple[int, ...]:
    return (c.queued, c.fetched, c.summarised, c.failed, c.total)
