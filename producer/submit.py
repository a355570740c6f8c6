"""Record a job and its videos, commit, then enqueue one message per video (ids only).

Order matters: rows are committed before any message is sent, so a worker never receives an id
it cannot find. This module never imports torch.

Big submissions (a 50,000-row CSV of 139 MB) stay fast and small:
- **Reading** streams the CSV and inserts its rows a thousand at a time in one transaction: memory
  stays flat, and bad input anywhere (a malformed row, a wrong encoding) leaves nothing recorded.
- **Sending** goes out in batches (kombu's ``Producer.batch``: one Redis round trip per batch), in
  position order; after each batch the job records how far it got (its ``send_*`` columns).
- The job id is known, and handed to ``on_job`` (the CLI prints it), before the first message.
- **An interrupted submit** (Ctrl-C, a crash) leaves its unsent videos ``queued``. Its record says
  so: ``tubesum reconcile`` sends the rest once the submit has been silent for ``SEND_STALE_S``,
  and submitting the same CSV again finishes that job instead of making a new one.

The same CSV (by SHA-256) submitted again while an earlier job of it exists is warned about; with
``reuse`` a video whose summary already exists for the same video id, model and prompt (and, for
CSV rows, the same transcript) takes that summary instead of being summarised again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy import Table, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from tubesum.celery_app import FETCH_TASK, SUMMARISE_TASK, celery_config
from tubesum.celery_app import app as default_celery_app
from tubesum.db import session_scope
from tubesum.errors import BadInput
from tubesum.models import Job, Summary, Transcript, Video, VideoStatus
from tubesum.models.base import utcnow
from tubesum.preflight import check_broker
from tubesum.producer.sources import (
    CsvFile,
    CsvTranscript,
    VideoRef,
    YdlFactory,
    default_ydl,
    expand_sources,
    inspect_transcripts_csv,
    iter_transcripts_csv,
    parse_source,
    read_sources_file,
)
from tubesum.read.queries import JobCounts
from tubesum.read.task_labels import video_label
from tubesum.settings import Settings, get_settings

log = logging.getLogger(__name__)

EMPTY_CSV_TRANSCRIPT = "empty transcript in CSV"
# A job's source that is a transcripts CSV: "csv:PATH" (its videos' transcripts come from there).
CSV_SOURCE_PREFIX = "csv:"
# Duplicate ids named in the warning, at most.
DUPLICATES_SHOWN = 5
# CSV rows inserted per statement while reading (memory holds about this many transcripts).
RECORD_BATCH_ROWS = 1000
# Messages per broker round trip while sending (kombu Producer.batch), and per progress record.
SEND_BATCH = 1000
# A submit whose send record has not moved for this long is taken for dead: `tubesum reconcile`
# or a resubmit of the same CSV finishes its sends. Seconds; one batch takes well under one.
SEND_STALE_S = 120.0
# A job with more messages than this is sent without a task-sent event per message (Flower lists
# those tasks from the moment a worker receives them): the events double the time a big send takes.
SENT_EVENTS_MAX_MESSAGES = 1000
# Videos in these states wait for a message from the submit.
UNSENT_TASK = {VideoStatus.queued.value: FETCH_TASK, VideoStatus.fetched.value: SUMMARISE_TASK}

# progress(phase, done, total): phase "reading" counts bytes of the CSV, "sending" messages.
Progress = Callable[[str, int, int | None], None]


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


@dataclass(frozen=True)
class SendState:
    """How far a job's submit got in sending its messages (the job's ``send_*`` columns)."""

    total: int  # messages the job needs
    sent: int  # messages sent so far, in position order
    through: int  # position of the last video sent, -1 before the first
    at: datetime  # when ``sent`` last moved
    stopped: bool = False  # the submit was interrupted (Ctrl-C, an error) while sending

    @property
    def complete(self) -> bool:
        return self.sent >= self.total

    def resumable(self, now: datetime) -> bool:
        """Unsent messages and nobody sending them: interrupted, or silent for SEND_STALE_S (killed)."""
        return not self.complete and (self.stopped or now - self.at > timedelta(seconds=SEND_STALE_S))

    def columns(self) -> dict[str, object]:
        """The job's columns that hold this state."""
        return {
            "send_total": self.total,
            "send_sent": self.sent,
            "send_through": self.through,
            "send_at": self.at,
            "send_stopped": self.stopped,
        }

    @classmethod
    def of(cls, job: Job) -> SendState | None:
        if job.send_total is None or job.send_sent is None or job.send_through is None or job.send_at is None:
            return None  # still reading, or a job from before send records (sent in one go)
        # SQLite hands timestamps back without their zone; every timestamp tubesum writes is UTC.
        at = job.send_at if job.send_at.tzinfo else job.send_at.replace(tzinfo=UTC)
        return cls(job.send_total, job.send_sent, job.send_through, at, job.send_stopped)


def submit(
    sources: Sequence[str],
    *,
    from_file: str | Path | None = None,
    transcripts_csv: str | Path | None = None,
    encoding: str | None = None,
    reuse: bool = False,
    settings: Settings | None = None,
    celery_app: Celery | None = None,
    make_ydl: YdlFactory = default_ydl,
    on_job: Callable[[int], None] | None = None,
    progress: Progress = _no_progress,
) -> int:
    """Create a job for the given sources and enqueue its videos. Returns the job id."""
    settings = settings or get_settings()
    all_sources = list(sources) + (read_sources_file(from_file) if from_file else [])
    csv_file = inspect_transcripts_csv(transcripts_csv, encoding=encoding) if transcripts_csv else None
    if not all_sources and csv_file is None:
        raise BadInput("nothing to submit: give a video or playlist, --from-file or --transcripts")
    videos = expand_sources(all_sources, make_ydl=make_ydl)
    warn_duplicates([v.video_id for v in videos], what="sources")
    app = celery_app or default_celery_app
    if csv_file is not None and not all_sources:
        unfinished = interrupted_job(csv_file, settings=settings)
        if unfinished is not None:
            log.warning(
                "job %d was submitted from the same CSV and its submit stopped before sending every "
                "message: finishing that job's sends instead of making a new job",
                unfinished,
            )
            check_broker(app)
            if on_job is not None:
                on_job(unfinished)
            send_job(unfinished, settings=settings, celery_app=app, progress=progress)
            return unfinished
        warn_same_csv(csv_file, settings=settings, reuse=reuse)
    check_broker(app)  # a broker that is down: one line, and no job recorded
    job_id = record_job(videos, csv_file, sources=all_sources, settings=settings, reuse=reuse, progress=progress)
    try:
        if on_job is not None:
            on_job(job_id)
        sent = send_job(job_id, settings=settings, celery_app=app, progress=progress)
    except BaseException:  # Ctrl-C even before the first message: the rest is for a resubmit or the reconciler
        mark_send_stopped(job_id, settings=settings)
        raise
    log.info("job %s: %d messages sent", job_id, sent)
    return job_id


def queued_line(job_id: int, counts: JobCounts) -> str:
    """What `tubesum submit` says once a job is recorded: `job N: M videos queued`, and the videos
    that need no message (refused at submit, or summarised already with --reuse)."""
    waiting = counts.queued + counts.fetched
    line = f"job {job_id}: {waiting} video{'s' if waiting != 1 else ''} queued"
    if counts.failed:
        line += f"; {counts.failed} refused (`tubesum status {job_id}` says why)"
    if counts.summarised:
        line += f"; {counts.summarised} already summarised (--reuse)"
    return line


def check_input(
    sources: Sequence[str],
    *,
    from_file: str | Path | None = None,
    transcripts_csv: str | Path | None = None,
    encoding: str | None = None,
) -> None:
    """What can be checked of the input without the network, in seconds: every source parses, the
    sources file reads, the CSV decodes, has its columns and every row parses. `tubesum run` calls this before it
    checks the model or starts anything, so bad input is named first. Raises BadInput."""
    all_sources = list(sources) + (read_sources_file(from_file) if from_file else [])
    if not all_sources and not transcripts_csv:
        raise BadInput("nothing to submit: give a video or playlist, --from-file or --transcripts")
    for text in all_sources:
        parse_source(text)
    if transcripts_csv:
        # Every row, not only the first: a broken row further down is named here, before `run`
        # starts a worker (streamed: 2 s for 390 MB here).
        for _ in iter_transcripts_csv(inspect_transcripts_csv(transcripts_csv, encoding=encoding)):
            pass


def warn_duplicates(video_ids: Iterable[str], *, what: str) -> None:
    """Say which video ids appeared more than once (each is summarised once, at its first place)."""
    repeated = sorted(v for v, n in Counter(video_ids).items() if n > 1)
    _warn_repeated(repeated, what=what)


def _warn_repeated(repeated: Sequence[str], *, what: str) -> None:
    if repeated:
        shown = ", ".join(repeated[:DUPLICATES_SHOWN]) + (" ..." if len(repeated) > DUPLICATES_SHOWN else "")
        log.warning(
            "%s: %d video id(s) given more than once, kept once at the first place: %s", what, len(repeated), shown
        )


# --- the same CSV again ---------------------------------------------------------------------------


def jobs_of_csv(session: Session, csv_file: CsvFile) -> list[Job]:
    """Earlier jobs made from a file with the same bytes, newest first."""
    return list(session.scalars(select(Job).where(Job.csv_sha256 == csv_file.sha256).order_by(Job.id.desc())))


def interrupted_job(csv_file: CsvFile, *, settings: Settings) -> int | None:
    """The newest job of this CSV whose submit died before sending everything, if any."""
    with session_scope(settings.database_url) as session:
        for job in jobs_of_csv(session, csv_file):
            state = SendState.of(job)
            if state is not None and state.resumable(utcnow()):
                return job.id
    return None


def warn_same_csv(csv_file: CsvFile, *, settings: Settings, reuse: bool) -> None:
    """Two jobs of one CSV summarise every video twice: say so, and how to avoid it."""
    with session_scope(settings.database_url) as session:
        earlier = jobs_of_csv(session, csv_file)
        if not earlier:
            return
        job = earlier[0]
        send = SendState.of(job)
        counts = Counter(session.scalars(select(Video.status).where(Video.job_id == job.id)).all())
    unfinished = sum(n for status, n in counts.items() if status not in ("done", "failed"))
    if send is None and not counts:
        state = "still being read"
    elif send is not None and not send.complete:
        state = f"sending: {send.sent} of {send.total} messages sent"
    else:
        state = f"{unfinished} of {sum(counts.values())} videos unfinished" if unfinished else "finished"
    advice = (
        "--reuse: summaries that already exist for the same video, model and prompt are taken over"
        if reuse
        else "this job summarises every video again; --reuse takes over the summaries that "
        f"exist for the same video, model and prompt, or see `tubesum export {job.id}`"
    )
    log.warning(
        "the same CSV %r (sha256 %s…) was already submitted as job %d (%s, created %s); %s",
        csv_file.name,
        csv_file.sha256[:12],
        job.id,
        state,
        f"{job.created_at:%Y-%m-%d %H:%M:%S}",
        advice,
    )


# --- reading: record the job and its videos -------------------------------------------------------


@dataclass
class _Recorder:
    """Inserts one job's videos (and CSV transcripts) in batches, inside the caller's transaction."""

    session: Session
    job_id: int
    now: datetime
    reuse_from: _Reuse | None
    position: int = 0
    rows: list[tuple[dict, str | None]] = field(default_factory=list)  # (video row, CSV transcript)

    def add(self, video_id: str, title: str | None, transcript: str | None) -> None:
        # Every row has the same keys: one executemany statement per batch.
        row = {
            "job_id": self.job_id,
            "video_id": video_id,
            "title": title,
            "position": self.position,
            "queued_at": self.now,
            "status": VideoStatus.queued.value,
            "error": None,
            "failed_at": None,
            "fetched_at": None,
            "done_at": None,
        }
        if transcript == "":
            row.update(status=VideoStatus.failed.value, error=EMPTY_CSV_TRANSCRIPT, failed_at=self.now)
        elif transcript is not None:
            row.update(status=VideoStatus.fetched.value, fetched_at=self.now)
        self.rows.append((row, transcript or None))
        self.position += 1
        if len(self.rows) >= RECORD_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        reused = self.reuse_from.find(self.session, rows) if self.reuse_from else {}
        for row, _ in rows:
            if row["video_id"] in reused:
                row.update(status=VideoStatus.done.value, done_at=self.now, fetched_at=self.now)
        ids = insert_videos(self.session, [row for row, _ in rows])
        transcripts = [
            {"video_pk": ids[row["video_id"]], "text": text, "source": "csv", "created_at": self.now}
            for row, text in rows
            if text is not None
        ]
        copied = [{"video_pk": ids[vid], **old.transcript} for vid, old in reused.items() if old.transcript is not None]
        if transcripts:
            insert_rows(self.session, Transcript.__table__, transcripts)
        if copied:
            self.session.execute(insert(Transcript), copied)
        if reused:
            self.session.execute(
                insert(Summary),
                [{**old.summary, "video_pk": ids[vid], "created_at": self.now} for vid, old in reused.items()],
            )


def insert_videos(session: Session, rows: list[dict]) -> dict[str, int]:
    """Insert video rows (all with the same keys); their ids by YouTube id."""
    if not is_postgresql(session):
        return dict(session.execute(insert(Video).returning(Video.video_id, Video.id), rows).all())
    # COPY cannot return the ids it made: take them from the id sequence first.
    sequence = func.pg_get_serial_sequence(Video.__table__.name, Video.id.key)
    ids = session.scalars(select(func.nextval(sequence)).select_from(func.generate_series(1, len(rows)))).all()
    defaults = {"attempts": 0, "summarise_attempts": 0, "reconciles": 0}
    insert_rows(
        session,
        Video.__table__,
        [{**defaults, **row, "id": pk, "updated_at": row["queued_at"]} for row, pk in zip(rows, ids, strict=True)],
    )
    return {row["video_id"]: pk for row, pk in zip(rows, ids, strict=True)}


def insert_rows(session: Session, table: Table, rows: list[dict]) -> None:
    """Insert rows that all have the same keys: PostgreSQL's COPY (one stream; the SQL-per-batch
    of executemany costs several times more on 50,000 transcripts), a plain executemany elsewhere."""
    if not is_postgresql(session):
        session.execute(insert(table), rows)
        return
    from psycopg import sql  # the PostgreSQL driver's own composition of identifiers

    columns = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    driver = session.connection().connection.driver_connection  # same connection, same transaction
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def record_job(
    videos: Sequence[VideoRef],
    csv_file: CsvFile | None,
    *,
    sources: Sequence[str],
    settings: Settings,
    reuse: bool = False,
    progress: Progress = _no_progress,
) -> int:
    """Insert the job (committed at once), then its videos and CSV transcripts in one transaction;
    on any error the job row is deleted again. Returns the job id. Sources come first, in order; a CSV row gives its transcript to the source video of the same
    id, or becomes a video of its own after them. Repeated ids are kept once, at the first place."""
    now = utcnow()
    options = {"transcript_languages": settings.transcript_languages, "max_new_tokens": settings.max_new_tokens}
    if csv_file is not None:
        options.update(csv_encoding=csv_file.encoding)
    # The job row is committed first, so that a second submit of the same CSV sees this one at once.
    with session_scope(settings.database_url) as session:
        job = Job(
            sources=list(sources) + ([f"{CSV_SOURCE_PREFIX}{csv_file.name}"] if csv_file else []),
            model=settings.model,
            options=options,
            prompt=settings.prompt,
            csv_sha256=csv_file.sha256 if csv_file else None,
        )
        session.add(job)
        session.flush()
        job_id = job.id
    try:
        with session_scope(settings.database_url) as session:
            _record_videos(
                session,
                session.get(Job, job_id),
                videos,
                csv_file,
                settings=settings,
                reuse=reuse,
                now=now,
                progress=progress,
            )
    except BaseException:  # bad input half-way, Ctrl-C: the videos were rolled back; the job goes too
        with session_scope(settings.database_url) as session:
            session.execute(delete(Job).where(Job.id == job_id))
        raise
    return job_id


def _record_videos(
    session: Session,
    job: Job,
    videos: Sequence[VideoRef],
    csv_file: CsvFile | None,
    *,
    settings: Settings,
    reuse: bool,
    now: datetime,
    progress: Progress,
) -> None:
    recorder = _Recorder(session, job.id, now, _Reuse.for_job(session, job, settings) if reuse else None)
    csv_rows = _by_id(
        iter_transcripts_csv(csv_file, on_bytes=lambda n: progress("reading", n, csv_file.size))
        if csv_file
        else iter(()),
        what=f"transcripts CSV {csv_file.name!r}" if csv_file else "",
    )
    source_ids = list(dict.fromkeys(v.video_id for v in videos))
    titles = {v.video_id: v.title for v in reversed(videos)}  # the first title given wins
    from_csv: dict[str, CsvTranscript] = {}
    if source_ids and csv_file is not None:
        # A CSV row may supply the transcript of any source video: find those rows first.
        wanted = set(source_ids)
        from_csv = {r.video_id: r for r in _by_id(iter_transcripts_csv(csv_file), what="") if r.video_id in wanted}
    for vid in source_ids:
        row = from_csv.get(vid)
        recorder.add(vid, titles[vid] or (row.title if row else None), row.transcript if row else None)
    for row in csv_rows:
        if row.video_id not in from_csv:
            recorder.add(row.video_id, row.title, row.transcript)
    recorder.flush()
    # The send record exists from the commit on: an interrupted submit is recognisable at once.
    total = session.scalar(
        select(func.count()).select_from(Video).where(Video.job_id == job.id, Video.status.in_(list(UNSENT_TASK)))
    )
    _record_send(session, job, SendState(total, 0, -1, now))
    if recorder.reuse_from and recorder.reuse_from.taken:
        log.warning(
            "job %d: %d video(s) took over an existing summary of the same video, model and prompt (--reuse)",
            job.id,
            recorder.reuse_from.taken,
        )


def _by_id(rows: Iterable[CsvTranscript], *, what: str) -> Iterable[CsvTranscript]:
    """Each video id's first row; the repeated ones are named in a warning once the file is read."""
    seen: set[str] = set()
    repeated: list[str] = []
    for row in rows:
        if row.video_id in seen:
            repeated.append(row.video_id)
            continue
        seen.add(row.video_id)
        yield row
    if what:
        _warn_repeated(sorted(set(repeated)), what=what)


# --- --reuse: take over summaries of the same video, model and prompt ----------------------------------


@dataclass(frozen=True)
class _Found:
    summary: dict  # the Summary row's columns to copy (all but id, video_pk, created_at)
    transcript: dict | None  # the Transcript's columns to copy for a video that had none here
    text: str


@dataclass
class _Reuse:
    """Finds, for a batch of new videos, a finished summary in an earlier job with the same
    model and prompt; a CSV row's transcript must also be the very same text."""

    job_ids: list[int]
    model: str
    taken: int = 0

    @classmethod
    def for_job(cls, session: Session, job: Job, settings: Settings) -> _Reuse:
        earlier = session.scalars(select(Job.id).where(Job.id != job.id, Job.prompt == settings.prompt)).all()
        return cls(list(earlier), settings.model)

    def find(self, session: Session, rows: Sequence[tuple[dict, str | None]]) -> dict[str, _Found]:
        wanted = {row["video_id"]: text for row, text in rows if row["status"] != VideoStatus.failed.value}
        if not wanted or not self.job_ids:
            return {}
        summary_columns = [c for c in Summary.__table__.columns if c.name not in ("id", "video_pk", "created_at")]
        transcript_columns = [c for c in Transcript.__table__.columns if c.name not in ("id", "video_pk", "created_at")]
        found_rows = session.execute(
            select(Video.video_id, Transcript.text, *summary_columns, *transcript_columns)
            .join(Summary, Summary.video_pk == Video.id)
            .join(Transcript, Transcript.video_pk == Video.id)
            .where(
                Video.video_id.in_(list(wanted)),
                Video.job_id.in_(self.job_ids),
                Video.status == VideoStatus.done.value,
                Summary.model == self.model,
            )
            .order_by(Video.id.desc())
        ).all()
        found: dict[str, _Found] = {}
        n_summary = len(summary_columns)
        for vid, text, *values in found_rows:
            if vid in found or (wanted[vid] is not None and wanted[vid] != text):
                continue
            summary = {c.name: v for c, v in zip(summary_columns, values[:n_summary], strict=True)}
            transcript = {c.name: v for c, v in zip(transcript_columns, values[n_summary:], strict=True)}
            found[vid] = _Found(summary, None if wanted[vid] is not None else transcript, text)
        self.taken += len(found)
        return found


# --- sending --------------------------------------------------------------------------------------


def send_job(job_id: int, *, settings: Settings, celery_app: Celery, progress: Progress = _no_progress) -> int:
    """Send the messages of every video of the job still waiting for one, in position order and in
    batches, recording after each batch how far it got. Starts after the last position a previous
    (interrupted) send recorded. Returns the number of messages sent."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        state = SendState.of(job)
        through = state.through if state else -1
        done_before = state.sent if state else 0
        waiting = select(Video.id, Video.video_id, Video.status, Video.position).where(
            Video.job_id == job_id, Video.status.in_(list(UNSENT_TASK)), Video.position > through
        )
        remaining = session.scalar(select(func.count()).select_from(waiting.subquery()))
        total = done_before + remaining
        _record_send(session, job, SendState(total, done_before, through, utcnow()))
    sent = 0
    progress("sending", done_before, total)
    celery_app = bulk_sender(celery_app, settings=settings, messages=remaining)
    # Celery declares a message's queue with every message (kombu copies and binds the entities
    # each time: a quarter of the sending time); the first message of each task declares it here.
    declared: set[str] = set()
    try:
        while True:
            with session_scope(settings.database_url) as session:
                batch = session.execute(
                    waiting.where(Video.position > through).order_by(Video.position).limit(SEND_BATCH)
                ).all()
            if not batch:
                return sent
            # Up to two Redis commands a message (the message, its task-sent event): one flush per batch.
            with celery_app.producer_or_acquire() as producer, producer.batch(max_size=2 * SEND_BATCH):
                for pk, video_id, status, _ in batch:
                    task = UNSENT_TASK[status]
                    celery_app.send_task(
                        task,
                        args=[pk],
                        argsrepr=video_label(job_id, video_id),
                        producer=producer,
                        declare=[] if task in declared else None,
                    )
                    declared.add(task)
            sent += len(batch)
            through = batch[-1].position
            with session_scope(settings.database_url) as session:
                _record_send(session, session.get(Job, job_id), SendState(total, done_before + sent, through, utcnow()))
            progress("sending", done_before + sent, total)
    except BaseException:  # Ctrl-C, broker gone: say so, so the rest is sent without waiting SEND_STALE_S
        with session_scope(settings.database_url) as session:
            _record_send(
                session, session.get(Job, job_id), SendState(total, done_before + sent, through, utcnow(), stopped=True)
            )
        raise


def mark_send_stopped(job_id: int, *, settings: Settings) -> None:
    """Record that this job's submit stopped before sending everything (nothing if it had finished)."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        state = SendState.of(job) if job else None
        if state is not None and not state.complete and not state.stopped:
            _record_send(session, job, SendState(state.total, state.sent, state.through, utcnow(), stopped=True))


def bulk_sender(app: Celery, *, settings: Settings, messages: int) -> Celery:
    """``app``, or for a big send the same configuration without task-sent events."""
    if messages <= SENT_EVENTS_MAX_MESSAGES or not app.conf.task_send_sent_event:
        return app
    quiet = Celery(app.main, set_as_current=False)
    quiet.conf.update(
        {
            **celery_config(settings),
            "broker_url": app.conf.broker_url,
            "broker_transport_options": app.conf.broker_transport_options,
            "task_send_sent_event": False,
        }
    )
    return quiet


def _record_send(session: Session, job: Job, state: SendState) -> None:
    session.execute(update(Job).where(Job.id == job.id).values(**state.columns()))


def stale_sends(session: Session, *, now: datetime) -> list[int]:
    """Jobs whose sends ``SendState.resumable`` says to finish, found in SQL (the reconcile pass of
    every worker asks every few seconds): only jobs in ``ix_jobs_unsent`` are looked at."""
    silent_since = now - timedelta(seconds=SEND_STALE_S)
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.send_sent < Job.send_total, or_(Job.send_stopped, Job.send_at < silent_since))
            .order_by(Job.id)
        )
    )


def resume_stale_sends(*, settings: Settings, celery_app: Celery) -> list[int]:
    """Finish the sends of every job whose submit stopped half-way (``tubesum reconcile``)."""
    with session_scope(settings.database_url) as session:
        stale = stale_sends(session, now=utcnow())
    for job_id in stale:
        sent = send_job(job_id, settings=settings, celery_app=celery_app)
        log.warning("job %d: its submit stopped before sending every message; sent the other %d", job_id, sent)
    return stale
