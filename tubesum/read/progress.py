"""Watch a job's videos in the database until each one is done or failed (``submit --wait``, ``run``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tubesum.display import clean
from tubesum.read.queries import JobCounts, job_counts, latest_problem

# How often the database is polled for the job's counts, seconds.
DEFAULT_POLL_S = 1.0
# How often the optional ``hint`` (e.g. "no worker consumes the summarise queue") is asked, seconds.
HINT_EVERY_S = 10.0
# How long a worker may take to answer "which queues do you consume?", seconds.
INSPECT_TIMEOUT_S = 2.0
# Which command starts a consumer of each queue, for the hint.
WORKER_COMMANDS = {"transcripts": "tubesum worker fetch", "summarise": "tubesum worker summarise"}
# Characters of the bar itself, so the bar, counts, rate and times fit 80 columns.
BAR_WIDTH = 24
# Longest problem text shown in the progress line, characters.
PROBLEM_CHARS = 160


class JobProgress(Progress):
    """The bar on one line, and under it the counts and the latest problem, which may wrap: at 80
    columns they would not fit beside the bar, rate and ETA."""

    def get_renderables(self):  # type: ignore[no-untyped-def]
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            if task.fields.get("detail"):
                yield Text(task.fields["detail"], overflow="fold")


class RateColumn(ProgressColumn):
    """Finished videos per second (rich's own estimate over its sampling window, else the mean)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:  # too few samples yet: the mean so far
            speed = task.completed / task.elapsed
        return Text("" if speed is None else f"{speed:.2f} videos/s", style="progress.data.speed")


def missing_worker_hint(celery_app, *, timeout_s: float = INSPECT_TIMEOUT_S) -> Callable[[JobCounts], str | None]:  # type: ignore[no-untyped-def]
    """A ``hint`` for ``wait_for_job``: names the queue the job waits on that no live worker
    consumes (asked with Celery's remote control), and the command that starts one."""

    def hint(counts: JobCounts) -> str | None:
        needed = [
            queue for queue, waiting in (("transcripts", counts.queued), ("summarise", counts.fetched)) if waiting
        ]
        if not needed:
            return None
        replies = celery_app.control.inspect(timeout=timeout_s).active_queues() or {}
        consumed = {q["name"] for queues in replies.values() for q in queues or []}
        missing = [queue for queue in needed if queue not in consumed]
        if not missing:
            return None
        return "; ".join(
            f"no live worker consumes the {queue} queue: start one with `{WORKER_COMMANDS[queue]}`" for queue in missing
        )

    return hint


# Units of a submit's phases: (divisor, unit) for the amount and rate shown.
PHASE_UNITS = {"reading": (1e6, "MB"), "sending": (1.0, "messages")}


@contextmanager
def submit_progress(console: Console | None = None) -> Iterator[Callable[[str, int, int | None], None]]:
    """Bars for a submit's two phases on stderr: reading the CSV (MB, MB/s, time left) and sending
    the messages (count, messages/s, time left). Drawn only on a terminal."""
    console = console or Console(stderr=True)
    columns = (
        TextColumn("{task.description:<8}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks: dict[str, tuple[TaskID, float]] = {}

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = (bar.add_task(phase, total=total, amount="", rate=""), time.monotonic())
            task, started = tasks[phase]
            scale, unit = PHASE_UNITS.get(phase, (1.0, ""))
            elapsed = max(time.monotonic() - started, 1e-6)
            amount = f"{done / scale:,.0f}/{(total or 0) / scale:,.0f} {unit}"
            bar.update(task, completed=done, total=total, amount=amount, rate=f"{done / scale / elapsed:,.0f} {unit}/s")

        yield report


def wait_for_job(
    job_id: int,
    *,
    database_url: str | None = None,
    poll_s: float = DEFAULT_POLL_S,
    timeout_s: float | None = None,
    show: bool = True,
    console: Console | None = None,
    check: Callable[[], None] | None = None,
    phase: Callable[[], str | None] | None = None,
    hint: Callable[[JobCounts], str | None] | None = None,
) -> JobCounts:
    """Poll until every video of the job is done or failed (or ``timeout_s`` passes); returns the counts.
    With ``show``, draws a live bar: queued / fetched / summarised / failed, rate and ETA, and the
    latest problem of a video still being fetched. ``check`` runs every poll and may raise to end
    the wait (a dead worker); ``phase`` names what happens before videos move ("loading model");
    ``hint`` is asked every HINT_EVERY_S and a new answer is printed once, as a line of its own."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=BAR_WIDTH),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
    )
    shown_hint, hint_due = None, time.monotonic() + HINT_EVERY_S
    with JobProgress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task(f"job {job_id}", total=None, detail="")
        while True:
            if check is not None:
                check()
            counts = job_counts(job_id, database_url=database_url)
            detail = (
                f"queued {counts.queued} · fetched {counts.fetched} · "
                f"summarised {counts.summarised} · failed {counts.failed}"
            )
            problem = latest_problem(job_id, database_url=database_url) if counts.queued else None
            if problem:
                detail += f" · {clean(problem)[:PROBLEM_CHARS]}"
            now_doing = phase() if phase is not None else None
            bar.update(
                task,
                total=counts.total or None,
                completed=counts.summarised + counts.failed,
                detail=detail,
                description=f"job {job_id}" + (f" · {now_doing}" if now_doing else ""),
            )
            if counts.finished or (deadline is not None and time.monotonic() >= deadline):
                return counts
            if hint is not None and time.monotonic() >= hint_due:
                hint_due = time.monotonic() + HINT_EVERY_S
                text = hint(counts)
                if text and text != shown_hint:
                    bar.console.print(Text(clean(text), style="yellow"), soft_wrap=True)
                shown_hint = text
            time.sleep(poll_s)
